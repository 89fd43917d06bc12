"""The BentoML service: input handling without a server, then a real `bentoml serve` of a real Bento over HTTP."""

import gzip
import http.client
import io
import json
import re
import socket
import threading
import urllib.error
import urllib.request
import uuid
from importlib import resources

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mri_platform.data import load_builtin
from mri_platform.metrics import psnr_per_image
from mri_platform.noise import NoiseConfig, fixed_noisy
from service import imaging
from service.imaging import InputError, Limits

EXAMPLE_4D = resources.files("nibabel") / "tests/data/example4d.nii.gz"


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """Real held-out MRI slices (EPI volumes of nibabel and dipy, a T1 slice), (N, 64, 64) in [0, 1]."""
    return load_builtin()[1].images


def _noisy(clean: np.ndarray, seed: int = 7) -> np.ndarray:
    return fixed_noisy(torch.from_numpy(clean).unsqueeze(1), NoiseConfig(), seed).squeeze(1).clamp(0, 1).numpy()


def _psnr(pred: np.ndarray, clean: np.ndarray) -> float:
    return float(psnr_per_image(torch.from_numpy(pred)[:, None], torch.from_numpy(clean)[:, None]).mean())


def _png(pixels: np.ndarray, mode: str = "L", size: tuple[int, int] | None = None, fmt: str = "PNG") -> bytes:
    image = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8)).convert(mode)
    if size:
        image = image.resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------- without a server


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.zeros((2, 32, 32), np.float32), "expected slices of shape (N, 64, 64)"),
        (np.zeros((0, 64, 64), np.float32), "no slices"),
        (np.full((1, 64, 64), np.nan, np.float32), "NaN or infinite"),
        (np.full((1, 64, 64), 255.0, np.float32), "must lie in [0, 1]"),
        (np.zeros((9, 64, 64), np.float32), "more than the limit of 8"),
        (np.array([["a"]]), "expected numbers"),
    ],
)
def test_slice_arrays_are_checked_with_a_message(array, message):
    with pytest.raises(InputError, match=re.escape(message)):
        imaging.check_slices(array, 64, max_slices=8)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(bomb, "PNG")  # 400 Mpixel, ~400 kB compressed
    with pytest.raises(InputError, match="more than the limit") as caught:
        imaging.read_image(bomb.getvalue(), Limits(max_image_pixels=4096 * 4096))
    assert caught.value.status == 413


def test_a_gzip_bomb_volume_stops_at_the_voxel_limit():
    header = nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)).to_bytes()
    bomb = gzip.compress(header + b"\0" * (50 << 20))  # 50 MB of zeros in ~50 kB
    with pytest.raises(InputError, match="decompresses to more than") as caught:
        imaging.read_volume(bomb, Limits(max_volume_voxels=64**3))
    assert caught.value.status == 413


def test_a_volume_keeps_its_geometry_through_slicing(tmp_path):
    content = EXAMPLE_4D.read_bytes()
    volume = imaging.read_volume(content, Limits())
    slices, window = imaging.volume_to_slices(volume, 64)
    assert slices.shape == (24 * 2, 64, 64) and slices.min() >= 0 and slices.max() <= 1
    out = nib.Nifti1Image.from_bytes(gzip.decompress(imaging.slices_to_volume(volume, slices, window)))
    source = nib.load(EXAMPLE_4D)
    assert out.shape == source.shape
    np.testing.assert_allclose(out.affine, source.affine)
    assert out.header.get_zooms() == source.header.get_zooms()
    # Slices only resized down and back: the intensities stay close to the input's (same window, same place).
    assert np.corrcoef(out.get_fdata().ravel(), source.get_fdata().ravel())[0, 1] > 0.9


# --------------------------------------------------------------------------------------- a real bentoml serve


def _request(url: str, path: str, body: bytes | None = None, content_type: str = "application/json"):
    request = urllib.request.Request(url + path, data=body, headers={"Content-Type": content_type} if body else {})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers.get("Content-Type", ""), error.read()


def _multipart(**fields) -> tuple[bytes, str]:
    """multipart/form-data: a (filename, bytes) tuple is a file, a str a plain field."""
    boundary = uuid.uuid4().hex
    body = io.BytesIO()
    for name, value in fields.items():
        body.write(f"--{boundary}\r\n".encode())
        if isinstance(value, tuple):
            filename, content = value
            body.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'.encode())
            body.write(b"Content-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")
        else:
            body.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    body.write(f"--{boundary}--\r\n".encode())
    return body.getvalue(), f"multipart/form-data; boundary={boundary}"


def _denoise(url: str, slices: np.ndarray) -> np.ndarray:
    status, _, body = _request(url, "/denoise", json.dumps({"slices": slices.tolist()}).encode())
    assert status == 200, body
    return np.asarray(json.loads(body), dtype=np.float32)


def _error(body: bytes) -> str:
    return json.dumps(json.loads(body))  # whichever shape BentoML chose, the message is in it


@pytest.mark.slow
def test_build_names_the_registry_version_and_info_describes_it(built_bento, bento_server):
    assert f"built Bento {built_bento['tag']}" in built_bento["output"]
    assert built_bento["tag"] == f"mri-denoiser:v{built_bento['version']}"
    status, _, body = _request(bento_server.url, "/info")
    info = json.loads(body)
    assert status == 200
    assert info["model_uri"] == f"models:/mri-denoiser/{built_bento['version']}"
    assert info["requested_uri"] == "models:/mri-denoiser@champion"
    assert info["filters"] == 16 and info["noise"] == {"kind": "gaussian", "variance": 0.2, "clip": True}
    assert info["psnr"] == pytest.approx(built_bento["psnr"], abs=1e-3)
    assert info["serving"]["batching"] is True


@pytest.mark.slow
def test_denoise_restores_real_mri_slices_in_order(bento_server, built_bento, held_out):
    clean = held_out[:12]
    noisy = _noisy(clean)
    restored = _denoise(bento_server.url, noisy)
    assert restored.shape == clean.shape
    assert _psnr(restored, clean) > _psnr(noisy, clean) + 5
    with torch.inference_mode():  # the same numbers as the model in-process: nothing lost or reordered on the way
        expected = built_bento["model"](torch.from_numpy(noisy)[:, None]).squeeze(1).numpy()
    np.testing.assert_allclose(restored, expected, atol=1e-4)
    single = _denoise(bento_server.url, noisy[3])  # one (64, 64) slice is a batch of one
    np.testing.assert_allclose(single[0], restored[3], atol=1e-4)


def _batch_sizes(url: str) -> tuple[float, float]:
    """(sum, count) of BentoML's adaptive batch size histogram for /denoise."""
    _, _, body = _request(url, "/metrics")
    total = count = 0.0
    for line in body.decode().splitlines():
        if "adaptive_batch_size" in line and 'method_name="denoise"' in line:
            if re.match(r"\S*adaptive_batch_size_sum\{", line):
                total += float(line.rsplit(" ", 1)[1])
            elif re.match(r"\S*adaptive_batch_size_count\{", line):
                count += float(line.rsplit(" ", 1)[1])
    return total, count


@pytest.mark.slow
def test_concurrent_requests_form_batches_and_each_gets_its_own_answer(bento_server, held_out):
    noisy = _noisy(held_out[:48])
    before = _batch_sizes(bento_server.url)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def client(index: int) -> None:
        try:
            for k in range(index, len(noisy), 16):
                results[k] = _denoise(bento_server.url, noisy[k : k + 1])[0]
        except BaseException as error:  # noqa: BLE001  (reported below, with the failing client's error)
            errors.append(error)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and len(results) == len(noisy)
    sequential = _denoise(bento_server.url, noisy)
    np.testing.assert_allclose(np.stack([results[k] for k in range(len(noisy))]), sequential, atol=1e-4)
    after = _batch_sizes(bento_server.url)
    slices, batches = after[0] - before[0], after[1] - before[1]
    assert slices >= len(noisy) and batches >= 1
    assert slices / batches > 1.5, f"48 concurrent requests ran in {batches:.0f} batches: no batching happened"


@pytest.mark.slow
def test_denoise_image_keeps_the_size_or_gives_64(bento_server, held_out):
    clean = held_out[20]
    noisy = _noisy(clean[None])[0]
    upload = _png(noisy, mode="RGB", size=(200, 180), fmt="JPEG")  # colour JPEG, not square, not 64 x 64
    status, content_type, body = _request(bento_server.url, "/denoise_image", *_multipart(image=("scan.jpg", upload)))
    assert status == 200 and content_type == "image/png"
    assert Image.open(io.BytesIO(body)).size == (200, 180)
    status, _, body = _request(
        bento_server.url, "/denoise_image", *_multipart(image=("s.png", _png(noisy)), size="model")
    )
    restored = np.asarray(Image.open(io.BytesIO(body)), dtype=np.float32) / 255
    assert status == 200 and restored.shape == (64, 64)
    assert _psnr(restored[None], clean[None]) > _psnr(noisy[None], clean[None]) + 3


@pytest.mark.slow
def test_denoise_volume_keeps_geometry(bento_server):
    status, content_type, body = _request(
        bento_server.url, "/denoise_volume", *_multipart(volume=("example4d.nii.gz", EXAMPLE_4D.read_bytes()))
    )
    assert status == 200 and content_type == "application/gzip", body[:300]
    out, source = nib.Nifti1Image.from_bytes(gzip.decompress(body)), nib.load(EXAMPLE_4D)
    assert out.shape == source.shape and out.get_data_dtype() == np.float32
    np.testing.assert_allclose(out.affine, source.affine)
    assert np.isfinite(out.get_fdata()).all()


@pytest.mark.slow
def test_preview_scores_the_denoised_image_against_the_clean_one(bento_server, held_out):
    status, _, body = _request(bento_server.url, "/preview", *_multipart(file=("clean.png", _png(held_out[5])),
                                                                        add_noise="true"))  # fmt: skip
    result = json.loads(body)
    assert status == 200
    assert all(result[k].startswith("data:image/png;base64,") for k in ("original", "noisy", "denoised"))
    assert result["metrics"]["denoised"]["psnr"] > result["metrics"]["noisy"]["psnr"] + 3


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_INPUTS = {
    "slices of the wrong shape": ("/denoise", {"slices": np.zeros((2, 32, 32)).tolist()}, 400, "shape (N, 64, 64)"),
    "strings instead of numbers": ("/denoise", {"slices": [["a"] * 64] * 64}, 400, "could not convert"),
    "NaN intensities": ("/denoise", {"slices": np.full((1, 64, 64), np.nan).tolist()}, 400, "NaN"),
    "8-bit intensities": ("/denoise", {"slices": np.full((1, 64, 64), 200.0).tolist()}, 400, "[0, 1]"),
    "too many slices": ("/denoise", {"slices": np.zeros((513, 64, 64)).tolist()}, 400, "more than the limit"),
    "no slices field": ("/denoise", {}, 400, "Field required"),
    "not JSON": ("/denoise", b"{nope", 400, "Invalid JSON"),
    "not an image": ("/denoise_image", {"image": ("notes.png", b"just some text")}, 400, "not an image"),
    "an empty file": ("/denoise_image", {"image": ("empty.png", b"")}, 400, "empty"),
    "a truncated JPEG": ("/denoise_image", {"image": ("cut.jpg", _png(np.eye(64), fmt="JPEG")[:300])}, 400, "corrupt"),
    "a decompression bomb": ("/denoise_image", {"image": ("bomb.png", _bomb())}, 413, "more than the limit"),
    "a bad size option": ("/denoise_image", {"image": ("a.png", _png(np.eye(64))), "size": "huge"}, 400, "pattern"),
    "a PNG as a volume": ("/denoise_volume", {"volume": ("x.nii", _png(np.eye(64)))}, 400, "not a NIfTI volume"),
    "a corrupt .nii.gz": ("/denoise_volume", {"volume": ("x.nii.gz", b"\x1f\x8b" + b"\0" * 50)}, 400, "gzip"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_that_says_why_and_the_service_goes_on(bento_server, held_out, case):
    path, payload, expected_status, message = BAD_INPUTS[case]
    if isinstance(payload, bytes):
        args = (payload, "application/json")
    elif path == "/denoise":
        args = (json.dumps(payload).encode(), "application/json")
    else:
        args = _multipart(**payload)
    status, _, body = _request(bento_server.url, path, *args)
    assert status == expected_status, body[:500]
    assert message in _error(body)
    assert _denoise(bento_server.url, held_out[:1]).shape == (1, 64, 64)  # still answering, same worker


def _raw_http(url: str, head: bytes, chunks: list[bytes]) -> tuple[int, bytes]:
    """Send a request by hand (the client may be cut off mid-body) and read the status line and body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before reading everything, as it should
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


@pytest.mark.slow
def test_a_huge_body_gets_413_before_or_while_it_is_read(bento_server, held_out):
    declared = (b"POST /denoise HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 200000000\r\n\r\n")  # fmt: skip
    status, body = _raw_http(bento_server.url, declared, [b"{"])
    assert status == 413 and b"over the limit" in body
    chunked = (
        b"POST /denoise HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"0" * (1 << 20)
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 80 + [b"0\r\n\r\n"]  # 80 MB, no length announced
    status, body = _raw_http(bento_server.url, chunked, chunks)
    assert status == 413 and b"over the limit" in body
    assert _denoise(bento_server.url, held_out[:1]).shape == (1, 64, 64)


@pytest.mark.slow
def test_health_readiness_and_metrics(bento_server):
    for path in ("/livez", "/readyz"):
        assert _request(bento_server.url, path)[0] == 200
    status, _, body = _request(bento_server.url, "/metrics")
    assert status == 200 and b"bentoml_service_request_total" in body


@pytest.mark.slow
def test_the_python_client_round_trips_and_reports_errors(bento_server, held_out):
    from service.client import Client, ServiceError

    client = Client(bento_server.url)
    assert client.info()["model_uri"].startswith("models:/mri-denoiser/")
    noisy = _noisy(held_out[:4])
    np.testing.assert_allclose(client.denoise(noisy), _denoise(bento_server.url, noisy), atol=1e-6)
    png = client.denoise_image(_png(noisy[0], size=(96, 80)))
    assert Image.open(io.BytesIO(png)).size == (96, 80)
    with pytest.raises(ServiceError) as caught:
        client.denoise_image(b"not an image at all")
    assert caught.value.status == 400 and "not an image" in caught.value.message


@pytest.mark.slow
def test_mri_platform_serve_serves_the_latest_bento_on_the_port_asked(built_bento, tmp_path):
    import os
    import subprocess
    import sys
    import time

    from mri_platform import services

    port = services.free_port()
    env = {**os.environ, "MRI_PLATFORM_HOME": str(built_bento["state"] / "home"),
           "BENTOML_HOME": str(built_bento["bentoml_home"])}  # fmt: skip
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115  (closed below, after the server stops)
    proc = subprocess.Popen([sys.executable, "-m", "mri_platform", "serve", "--port", str(port)], env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    server = services.Service("bento", f"http://127.0.0.1:{port}", proc.pid, tmp_path / "serve.log")
    try:
        deadline = time.monotonic() + 90
        while services._http_status(f"{server.url}/readyz") != 200 and proc.poll() is None:
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-2000:]
            time.sleep(0.5)
        info = json.loads(_request(server.url, "/info")[2])
        assert info["model_tag"] == built_bento["tag"]
        assert f"serving {built_bento['tag']} on http://127.0.0.1:{port}" in (tmp_path / "serve.log").read_text()
    finally:
        services.stop(server)
        log.close()
