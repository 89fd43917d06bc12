"""A small Python client for the MRI denoising service (stdlib and NumPy only, so pipelines need nothing else).

From Python::

    from service.client import Client
    client = Client("http://127.0.0.1:3000")
    denoised = client.denoise(slices)                  # (N, H, W) or (H, W) float32 in [0, 1] -> (N, H, W)
    png = client.denoise_image("scan.png")             # any size and mode -> denoised PNG at the original size
    nifti = client.denoise_volume("brain.nii.gz")      # -> denoised NIfTI, same affine and header
    client.info()                                      # the model's version, architecture, resolution, metrics

From the command line (the endpoint is picked by file type)::

    python -m service.client scan.png -o denoised.png
    python -m service.client brain.nii.gz -o denoised.nii.gz --url http://127.0.0.1:3000

The same calls with curl::

    curl -X POST http://127.0.0.1:3000/denoise -H 'Content-Type: application/json' \\
         -d '{"slices": [[[0.0, 0.1, ...64 values...], ...64 rows...]]}'
    curl -X POST http://127.0.0.1:3000/denoise -H 'Content-Type: application/x-npy' \\
         --data-binary @slices.npy -o denoised.npy         # np.save'd (N, H, W) float32 in [0, 1], or uint8
    curl -X POST http://127.0.0.1:3000/denoise_image -F image=@scan.png -o denoised.png
    curl -X POST http://127.0.0.1:3000/denoise_image -F image=@scan.jpg -F size=model -o denoised64.png
    curl -X POST http://127.0.0.1:3000/denoise_volume -F volume=@brain.nii.gz -o denoised.nii.gz
    curl http://127.0.0.1:3000/info

Errors come back as a 4xx or 5xx with a JSON body; :class:`ServiceError` carries the status and the server's
message, so a pipeline can tell bad input (400, 413) from an overloaded server (503, worth retrying).
"""

from __future__ import annotations

import argparse
import io
import json
import mimetypes
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_URL = "http://127.0.0.1:3000"
VOLUME_SUFFIXES = (".nii", ".nii.gz")


class ServiceError(RuntimeError):
    """The service answered with an error status; ``message`` is what it said was wrong."""

    def __init__(self, status: int, message: str):
        super().__init__(f"HTTP {status}: {message}")
        self.status, self.message = status, message


class Client:
    """Calls the service's HTTP APIs; one instance per server, safe to reuse (one connection per call)."""

    def __init__(self, url: str = DEFAULT_URL, timeout: float = 120.0):
        self.url, self.timeout = url.rstrip("/"), timeout

    def denoise(self, slices: np.ndarray, binary: bool = True) -> np.ndarray:
        """Denoise (N, H, W) or (H, W) slices with intensities in [0, 1]; returns (N, H, W) float32. A native model
        works at H x W; a report model resizes to its 64 x 64 and back (``info()["resolution"]`` says which).

        ``binary``: send and receive NumPy's .npy format (``application/x-npy``) rather than JSON, which costs more
        than the model for small slices; the answer is the same."""
        array = np.asarray(slices, dtype=np.float32)
        if binary:
            buffer = io.BytesIO()
            np.save(buffer, array, allow_pickle=False)
            answer = self._post("/denoise", buffer.getvalue(), "application/x-npy")
            return np.load(io.BytesIO(answer), allow_pickle=False)
        body = json.dumps({"slices": array.tolist()}).encode()
        answer = self._post("/denoise", body, "application/json")
        return np.asarray(json.loads(answer), dtype=np.float32)

    def denoise_image(self, image: str | Path | bytes, size: str = "original") -> bytes:
        """Denoise a PNG or JPEG (a path or its bytes); returns a PNG at the original size or, with
        ``size="model"``, at a report model's 64 x 64 (a native model has no other size)."""
        if size not in ("original", "model"):
            raise ValueError(f"size must be 'original' or 'model', got {size!r}")
        content, name = _read(image, "image.png")
        body, content_type = _multipart({"size": size}, "image", name, content)
        return self._post("/denoise_image", body, content_type)

    def denoise_volume(self, volume: str | Path | bytes) -> bytes:
        """Denoise a NIfTI volume (``.nii`` or ``.nii.gz``, a path or its bytes) slice by slice; returns the
        NIfTI bytes (gzipped when the input was)."""
        content, name = _read(volume, "volume.nii.gz")
        body, content_type = _multipart({}, "volume", name, content)
        return self._post("/denoise_volume", body, content_type)

    def info(self) -> dict[str, Any]:
        """The served model: registry version, kind, architecture, width, resolution ('native' or 'resized to
        64 x 64'), noise, held-out metrics and serving settings."""
        return json.loads(self._request(urllib.request.Request(f"{self.url}/info")))

    def _post(self, path: str, body: bytes, content_type: str) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", body, {"Content-Type": content_type}, method="POST")
        return self._request(request)

    def _request(self, request: urllib.request.Request) -> bytes:
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.read()
        except urllib.error.HTTPError as error:
            raise ServiceError(error.code, error_message(error.read(), error.reason)) from None


def error_message(body: bytes, fallback: str = "") -> str:
    """The message in an error answer: ``{"error": message, "detail": [...]}`` (the service's one shape, whose
    message already says what ``detail`` lists), a list of those, or the raw text when it is not JSON."""
    try:
        payload = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip() or str(fallback)
    items = payload if isinstance(payload, list) else [payload]
    messages = []
    for item in items:
        if not isinstance(item, dict):
            messages.append(str(item))
            continue
        details = [d.get("msg", str(d)) if isinstance(d, dict) else str(d) for d in item.get("detail") or []]
        text = str(item.get("error") or item.get("message") or "")
        messages.append(text or "; ".join(details))
    return "; ".join(m for m in messages if m) or str(fallback)


def _read(source: str | Path | bytes, default_name: str) -> tuple[bytes, str]:
    if isinstance(source, bytes | bytearray):
        return bytes(source), default_name
    path = Path(source)
    return path.read_bytes(), path.name


def _multipart(fields: dict[str, str], file_field: str, filename: str, content: bytes) -> tuple[bytes, str]:
    """A multipart/form-data body (the stdlib has no encoder for one) and its Content-Type."""
    boundary = uuid.uuid4().hex
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    file_type = mimetypes.guess_type(filename)[0] or "application/octet-stream"
    safe_name = filename.replace('"', "_").replace("\r", "_").replace("\n", "_")
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{safe_name}"\r\n'
        f"Content-Type: {file_type}\r\n\r\n".encode()
        + content
        + b"\r\n"
    )
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.client",
        description="Denoise an MRI image (PNG/JPEG -> PNG) or volume (.nii/.nii.gz -> NIfTI) with the service.",
    )
    parser.add_argument("input", type=Path, help="an image (.png, .jpg, ...) or a NIfTI volume (.nii, .nii.gz)")
    parser.add_argument("-o", "--output", type=Path, required=True, help="where to write the denoised file")
    parser.add_argument("--url", default=DEFAULT_URL, help=f"the service (default {DEFAULT_URL})")
    parser.add_argument("--size", choices=("original", "model"), default="original", help="images: output size")
    args = parser.parse_args(argv)
    client = Client(args.url)
    try:
        if args.input.name.lower().endswith(VOLUME_SUFFIXES):
            result = client.denoise_volume(args.input)
        else:
            result = client.denoise_image(args.input, size=args.size)
    except ServiceError as error:
        print(f"error: {args.url} refused {args.input}: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # unreachable server, timeout or unreadable file (URLError is an OSError)
        print(f"error: {error}", file=sys.stderr)
        return 2
    args.output.write_bytes(result)
    print(f"wrote {args.output} ({len(result):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
