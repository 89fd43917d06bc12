"""The BentoML service: the registry's champion denoiser behind HTTP, with adaptive batching and a web page.

APIs (all POST, as BentoML serves them; see http://127.0.0.1:3000 for the OpenAPI page):
- ``/denoise``: ``{"slices": [[...64 x 64...], ...]}`` -> the denoised slices in the same order. Batchable:
  concurrent requests are merged into one forward pass (``max_batch_size``, ``max_latency_ms``).
- ``/denoise_image``: a PNG/JPEG of any size and mode (multipart field ``image``) -> a denoised PNG, at the
  original size (``size=original``) or the model's 64 x 64 (``size=model``).
- ``/denoise_volume``: a ``.nii``/``.nii.gz`` (field ``volume``) -> the volume denoised slice by slice along its
  third axis, with the input's affine and header.
- ``/preview``: what the page shows: original / noisy / denoised PNGs and PSNR / SSIM when a clean reference is
  known (``add_noise=true`` adds the noise the model was trained against to a clean image).
GET ``/info`` describes the model (registry version, kind, width, noise, held-out metrics); GET ``/ui`` is the
page; ``/livez``, ``/readyz`` and ``/metrics`` are BentoML's.

Settings come from the environment, read when the service is imported (``MRI_SERVICE_*``, see ``Settings``).
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import pydantic_core
from _bentoml_sdk.io_models import ensure_io_descriptor  # BentoML 1.4 exports no public name for it
from bentoml.validators import ContentType, DType
from pydantic import AfterValidator, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from service import imaging
from service.build import BENTO_NAME, MODEL_ENV, MODEL_NAME
from service.denoiser import Denoiser, configure_threads
from service.imaging import InputError, Limits

UI_FILE = Path(__file__).parent / "ui" / "index.html"


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Settings:
    """Serving settings, from ``MRI_SERVICE_*`` environment variables."""

    model: str = f"{MODEL_NAME}:latest"
    """MRI_SERVICE_MODEL: the BentoML model tag to load (`mri-platform build` pins it to the imported version)."""
    batching: bool = True
    """MRI_SERVICE_BATCHING: 'off' serves /denoise one request at a time (to measure what batching brings)."""
    max_batch_size: int = 32
    """MRI_SERVICE_MAX_BATCH_SIZE: most requests merged into one forward pass (AE1 on 2 cores is fastest per slice
    at 8-16 and slower beyond 32, see the serving benchmark)."""
    max_latency_ms: int = 3000
    """MRI_SERVICE_MAX_LATENCY_MS: the latency budget of a batched request; beyond it BentoML answers 503."""
    precision: str = "fp32"
    """MRI_SERVICE_PRECISION: fp32, or bf16 autocast (faster on CPUs with bf16 units)."""
    limits: Limits = field(default_factory=Limits)
    """MRI_SERVICE_MAX_REQUEST_MB, MRI_SERVICE_MAX_IMAGE_PIXELS, MRI_SERVICE_MAX_SLICES, MRI_SERVICE_MAX_VOXELS."""

    @classmethod
    def from_env(cls) -> Settings:
        defaults, limits = cls(), Limits()
        batching = os.environ.get("MRI_SERVICE_BATCHING", "on").strip().lower()
        if batching not in ("on", "off", "true", "false", "1", "0"):
            raise ValueError(f"MRI_SERVICE_BATCHING must be 'on' or 'off', got {batching!r}")
        return cls(
            model=os.environ.get(MODEL_ENV) or defaults.model,
            batching=batching in ("on", "true", "1"),
            max_batch_size=_env_int("MRI_SERVICE_MAX_BATCH_SIZE", defaults.max_batch_size),
            max_latency_ms=_env_int("MRI_SERVICE_MAX_LATENCY_MS", defaults.max_latency_ms),
            precision=os.environ.get("MRI_SERVICE_PRECISION", defaults.precision),
            limits=Limits(
                max_request_bytes=_env_int("MRI_SERVICE_MAX_REQUEST_MB", limits.max_request_bytes >> 20) << 20,
                max_image_pixels=_env_int("MRI_SERVICE_MAX_IMAGE_PIXELS", limits.max_image_pixels),
                max_slices=_env_int("MRI_SERVICE_MAX_SLICES", limits.max_slices),
                max_volume_voxels=_env_int("MRI_SERVICE_MAX_VOXELS", limits.max_volume_voxels),
            ),
        )


SETTINGS = Settings.from_env()


def _valid_slices(array: np.ndarray) -> np.ndarray:
    """Runs per request, before batching, so one bad request is refused alone (400) and never joins a batch."""
    return imaging.check_slices(array, 64, SETTINGS.limits.max_slices)


Slices = Annotated[np.ndarray, DType("float32"), AfterValidator(_valid_slices)]


class SlicesJSON(ensure_io_descriptor(np.ndarray)):
    """/denoise's answer, written by pydantic-core (Rust): BentoML 1.4 writes root outputs with the standard
    library's `json.dumps`, which took 1.2-2 ms per 64 x 64 slice, more than AE1's forward pass
    (``benchmarks/serve_throughput.py``). pydantic-core writes the same JSON 5-8x faster."""

    def model_dump_json(self, **kwargs: Any) -> str:
        return pydantic_core.to_json(self.model_dump(mode="json", **kwargs)).decode()


# --------------------------------------------------------------------------------------------------- the page


_instance: MRIDenoiser | None = None  # set by the service's __init__, read by the page's routes


async def _info(_: Request) -> Response:
    if _instance is None:
        return JSONResponse({"error": "the model is still loading"}, status_code=503)
    return JSONResponse(_instance.info)


async def _page(_: Request) -> Response:
    return FileResponse(UI_FILE, media_type="text/html")


async def _to_page(_: Request) -> Response:
    return RedirectResponse("/ui")


pages = Starlette(
    routes=[Route("/info", _info), Route("/ui", _page), Route("/ui/", _to_page)],
)


# ----------------------------------------------------------------------------------------------- request size


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413 before reading them (Content-Length) or while reading.

    BentoML 1.4 has no request size limit of its own: without this a client could make the server buffer
    gigabytes of JSON.
    """

    def __init__(self, app: Any, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        received, started, over = 0, False, False

        async def counted_receive() -> dict:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    return {"type": "http.disconnect"}
            return message

        async def watched_send(message: dict) -> None:
            nonlocal started
            if over and not started:
                return  # the app is answering a request we cut short; the 413 below replaces its answer
            started = started or message["type"] == "http.response.start"
            await send(message)

        await self.app(scope, counted_receive, watched_send)
        if over and not started:
            await self._refuse(send, received)

    async def _refuse(self, send: Any, size: int) -> None:
        body = json.dumps(
            {
                "error": f"request body of {size:,} bytes is over the limit of {self.max_bytes:,} bytes; "
                "send fewer slices per request or a smaller file (limit: MRI_SERVICE_MAX_REQUEST_MB)"
            }
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": body})


# ------------------------------------------------------------------------------------------------ the service


def _bad_input(error: InputError) -> Response:
    return JSONResponse({"error": str(error)}, status_code=error.status)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@bentoml.asgi_app(pages, path="/")
@bentoml.service(
    name=BENTO_NAME,
    workers=1,
    traffic={"timeout": 120, "max_concurrency": 256},
    metrics={"enabled": True},
    logging={"access": {"enabled": False}},  # a log line per request costs more than AE1's forward pass
)
class MRIDenoiser:
    """Denoises brain MRI slices, images and volumes with the model imported from the MLflow registry."""

    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        global _instance
        self.threads = configure_threads()
        self.denoiser = Denoiser(self.model_ref.path, precision=SETTINGS.precision)
        self.size = self.denoiser.size
        stored = bentoml.models.get(self.model_ref.tag)
        self.info = {
            "service": BENTO_NAME,
            "model_tag": str(stored.tag),
            **{k: v for k, v in stored.info.metadata.items() if k != "tracking_uri"},
            "serving": {
                **self.denoiser.describe(),
                "threads": self.threads,
                "batching": SETTINGS.batching,
                "max_batch_size": SETTINGS.max_batch_size,
                "max_latency_ms": SETTINGS.max_latency_ms,
                "limits": asdict(SETTINGS.limits),
            },
        }
        _instance = self

    @bentoml.api(
        batchable=SETTINGS.batching,
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
        output_spec=SlicesJSON,
    )
    def denoise(self, slices: Slices) -> np.ndarray:
        """Denoise (N, 64, 64) float32 slices in [0, 1]; returns them in the same order and shape."""
        # Rounded to 1e-5 (far below an 8-bit step, 4e-3) as float64, whose JSON is short: a float32 prints 17
        # digits once in Python, and writing that JSON cost more than the forward pass.
        return np.round(self.denoiser(slices).astype(np.float64), 5)

    @bentoml.api
    def denoise_image(
        self,
        image: Path,
        size: Annotated[str, Field(pattern="^(original|model)$")] = "original",
    ) -> Annotated[Path, ContentType("image/png")]:
        """Denoise a PNG/JPEG: gray, resized to the model's 64 x 64 and back (``size=original``), as PNG."""
        try:
            pixels = imaging.read_image(image.read_bytes(), SETTINGS.limits)
        except InputError as error:
            return _bad_input(error)
        restored = self.denoiser(imaging.resize(pixels, (self.size, self.size))[None])[0]
        if size == "original":
            restored = imaging.resize(restored, pixels.shape)
        return Response(imaging.encode_png(restored), media_type="image/png")

    @bentoml.api
    def denoise_volume(self, volume: Path) -> Annotated[Path, ContentType("application/octet-stream")]:
        """Denoise a NIfTI volume slice by slice along its third axis (every volume of a 4D file); geometry and
        header kept, data float32."""
        try:
            parsed = imaging.read_volume(volume.read_bytes(), SETTINGS.limits)
            slices, window = imaging.volume_to_slices(parsed, self.size)
        except InputError as error:
            return _bad_input(error)
        denoised = np.concatenate([self.denoiser(slices[i : i + 64]) for i in range(0, len(slices), 64)])
        content = imaging.slices_to_volume(parsed, denoised, window)
        name = "denoised.nii.gz" if parsed.gzipped else "denoised.nii"
        return Response(
            content,
            media_type="application/gzip" if parsed.gzipped else "application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @bentoml.api
    def preview(self, file: Path, add_noise: bool = False, seed: int = 0) -> dict[str, Any]:
        """For the page: original / noisy / denoised as PNG data URLs, and PSNR / SSIM against a clean reference.

        An image is shown at the model's 64 x 64. A volume shows its middle slice along the third axis. With
        ``add_noise`` the upload is taken as the clean reference and the model's own training noise is added.
        """
        content = file.read_bytes()
        try:
            original = self._preview_slice(content)
        except InputError as error:
            return _bad_input(error)
        noisy = imaging.add_report_noise(original, self.denoiser.noise, seed) if add_noise else original
        restored = self.denoiser(noisy[None])[0]
        result: dict[str, Any] = {
            "original": _data_url(imaging.encode_png(original)),
            "noisy": _data_url(imaging.encode_png(noisy)) if add_noise else None,
            "denoised": _data_url(imaging.encode_png(restored)),
            "noise": self.denoiser.noise.describe() if add_noise else None,
            "model": self.info["model_tag"],
        }
        if add_noise:
            import torch

            from mri_platform.metrics import score

            def scores(pred: np.ndarray) -> dict[str, float]:
                return score(torch.from_numpy(pred)[None, None], torch.from_numpy(original)[None, None])

            result["metrics"] = {"noisy": scores(noisy), "denoised": scores(restored)}
        return result

    def _preview_slice(self, content: bytes) -> np.ndarray:
        if imaging.looks_like_nifti(content):
            volume = imaging.read_volume(content, SETTINGS.limits)
            slices, _ = imaging.volume_to_slices(volume, self.size)
            return slices[volume.data.shape[2] // 2]  # the middle slice of the first 3D volume
        return imaging.resize(imaging.read_image(content, SETTINGS.limits), (self.size, self.size))


MRIDenoiser.add_asgi_middleware(BodyLimit, max_bytes=SETTINGS.limits.max_request_bytes)
