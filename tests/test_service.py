"""The BentoML service: input handling and the Denoiser without a server, then a real `bentoml serve` of a real
Bento (a small residual U-Net, served at every image's own resolution) over HTTP."""

import base64
import gzip
import http.client
import io
import json
import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from importlib import resources

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

from mri_platform.checkpoints import save_checkpoint
from mri_platform.data import intensity_window, load_builtin
from mri_platform.metrics import psnr_per_image
from mri_platform.models import ModelConfig, build_model
from mri_platform.noise import NoiseConfig, fixed_noisy
from service import imaging
from service.admission import Cancelled
from service.batcher import BATCH_METRIC
from service.denoiser import PASS_ACTIVATIONS, Denoiser, configure_threads, default_passes, tile_spans, usable_cores
from service.imaging import InputError, Limits

EXAMPLE_4D = resources.files("nibabel") / "tests/data/example4d.nii.gz"
T1_SLICE = resources.files("dipy") / "data/files/t1_coronal_slice.npy"


@pytest.fixture(scope="module")
def held_out() -> np.ndarray:
    """Real held-out MRI slices (EPI volumes of nibabel and dipy, a T1 slice), (N, 64, 64) in [0, 1]."""
    return load_builtin()[1].images


@pytest.fixture(scope="module")
def t1_slice() -> np.ndarray:
    """dipy's real T1 coronal slice at its own 256 x 256 (never trained on), in [0, 1] by training's window."""
    image = np.load(T1_SLICE).astype(np.float32)
    low, high = intensity_window(image)
    return np.clip((image - low) / (high - low), 0.0, 1.0)


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
    ("slices", "message"),
    [
        ([np.zeros((64, 64)), np.zeros((32, 32))], "must share one size"),
        (np.zeros(5, np.float32), "expected slices of shape (N, H, W)"),
        (np.zeros((0, 64, 64), np.float32), "no slices"),
        (np.full((1, 64, 64), np.nan, np.float32), "NaN or infinite"),
        (np.full((1, 64, 64), 255.0, np.float32), "must lie in [0, 1]"),
        (np.zeros((9, 64, 64), np.float32), "more than the limit of 8"),
        (np.zeros((1, 128, 128), np.float32), "over the limit of 10,000 pixels"),
        (np.array([["a"]]), "expected numbers"),
    ],
)
def test_slice_arrays_are_checked_with_a_message(slices, message):
    with pytest.raises(InputError, match=re.escape(message)):
        imaging.check_slices(slices, max_slices=8, max_pixels=100 * 100)


def test_slices_of_any_size_are_accepted_and_one_slice_is_a_request_of_one():
    checked = imaging.check_slices(np.full((2, 96, 80), 0.5), max_slices=8, max_pixels=100 * 100)
    assert len(checked) == 2 and checked[0].shape == (96, 80) and checked[0].dtype == np.float32
    one = [[0.5] * 80] * 96  # the JSON of one (H, W) slice
    assert [image.shape for image in imaging.as_slice_list(one)] == [(96, 80)]
    assert [image.shape for image in imaging.as_slice_list([one, one])] == [(96, 80), (96, 80)]  # (N, H, W)


# ----------------------------------------------------------------------------------- the Denoiser, in-process


class _Recording(torch.nn.Module):
    """Wraps a model and records the shape of every batch it is given."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model, self.shapes = model, []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.shapes.append(tuple(x.shape))
        return self.model(x)


def test_tiles_span_every_pixel_once_away_from_the_cut_edges():
    spans = tile_spans(600, 256, 32)
    assert [s[0] for s in spans] == [0, 224, 344]  # every 224 px, the last flush with the end
    assert spans[0][1] == 0 and spans[-1][2] == 600
    assert all(a[2] == b[1] for a, b in zip(spans, spans[1:], strict=False))  # contiguous, no gap, no overlap
    assert all(first - start >= 16 or first == 0 for start, first, _ in spans)  # 16 px from a cut edge
    assert all(start + 256 - last >= 16 or last == 600 for start, _, last in spans)


def test_tiled_and_whole_inference_agree_on_a_real_slice(native_checkpoint, t1_slice):
    noisy = _noisy(t1_slice[None])
    whole = Denoiser(native_checkpoint, tile=256)(noisy)
    denoiser = Denoiser(native_checkpoint, tile=128)  # 3 x 3 tiles of 128 on the same slice
    assert denoiser.overlap == 64  # the 4-level U-Net's own: 32 px margins
    tiled = denoiser(noisy)
    assert tiled.shape == whole.shape == (1, 256, 256)
    assert _psnr(tiled, whole) > 60, "tiles disagree with the whole image: a seam or a misplaced tile"
    assert np.abs(tiled - whole).max() < 0.02
    narrow = Denoiser(native_checkpoint, tile=128, overlap=16)(noisy)  # 8 px margins: well within its reach
    assert _psnr(narrow, whole) < _psnr(tiled, whole)
    assert _psnr(whole, t1_slice[None]) > _psnr(noisy, t1_slice[None]) + 10


def test_memory_is_bounded_by_the_tile_whatever_the_image_size(native_checkpoint, t1_slice):
    denoiser = Denoiser(native_checkpoint, tile=128, overlap=32, pass_pixels=2 * 128 * 128)
    denoiser.model = _Recording(denoiser.model)
    big = np.tile(_noisy(t1_slice[None]), (2, 3, 3))[:, :600, :520]  # 2 slices of 600 x 520
    out = denoiser(big)
    assert out.shape == big.shape and out.min() >= 0 and out.max() <= 1
    assert len(denoiser.model.shapes) > 1
    assert all(h <= 128 and w <= 128 and n * h * w <= 2 * 128 * 128 for n, _, h, w in denoiser.model.shapes)
    assert "in tiles of 128 x 128" in denoiser.explain(600, 520)


def test_passes_run_side_by_side_and_give_what_one_at_a_time_gives(native_checkpoint, t1_slice):
    """With passes=2 (the service's default on 2 cores) one call runs two of its passes at once, urgent or bulk,
    tiled or whole, and the slices come back as one pass at a time gives them; bulk work past its deadline stops."""
    one = Denoiser(native_checkpoint, tile=128, overlap=32, pass_pixels=128 * 128)
    two = Denoiser(native_checkpoint, tile=128, overlap=32, pass_pixels=128 * 128, passes=2)
    assert two.describe()["passes"] == 2 and two.gate.passes == 2
    running, most, lock, forward = [0], [0], threading.Lock(), two._pass

    def counted(batch: np.ndarray) -> np.ndarray:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            time.sleep(0.02)  # long enough for the other pass to start
            return forward(batch)
        finally:
            with lock:
                running[0] -= 1

    two._pass = counted
    big = _noisy(t1_slice[None])  # 256 x 256 in 3 x 3 tiles of 128, one tile a pass
    small = np.stack([imaging.resize(t1_slice, (64, 64))] * 9)  # 9 slices of 64 x 64, 4 a pass
    for images in (big, small):
        for bulk in (False, True):
            np.testing.assert_allclose(two(images, bulk=bulk), one(images, bulk=bulk), atol=1e-5)
    assert most[0] == 2
    with pytest.raises(Cancelled):
        two(big, bulk=True, deadline=time.monotonic() - 1)


def test_a_forward_pass_holds_as_many_slices_as_the_models_width_lets_fit(tmp_path, native_checkpoint, held_out):
    """A pass holds PASS_ACTIVATIONS values of the full-resolution feature maps: 16 slices of 64 x 64 for AE1, 4 for
    AE2 (4x as wide), and at least one tile for a native model; a smaller pass than one slice is refused."""
    passes = {}
    for name in ("ae1", "ae2"):
        path = save_checkpoint(tmp_path / f"{name}.pt", build_model(ModelConfig.named(name)), image_size=64)
        denoiser = Denoiser(path)
        denoiser.model = _Recording(denoiser.model)
        assert denoiser(_noisy(held_out[:20])).shape == (20, 64, 64)
        passes[name] = [n for n, *_ in denoiser.model.shapes]
        with pytest.raises(ValueError, match="one slice"):
            Denoiser(path, pass_pixels=63 * 64)
    assert passes == {"ae1": [16, 4], "ae2": [4] * 5}
    native = Denoiser(native_checkpoint, tile=128)
    assert native.pass_pixels == max(128 * 128, PASS_ACTIVATIONS // native.model.config.filters)


def test_mixed_sizes_are_denoised_each_at_its_own_size_in_order(native_checkpoint, held_out, t1_slice):
    denoiser = Denoiser(native_checkpoint)
    assert denoiser.describe()["resolution"] == "native" and denoiser.describe()["tile"] == 256
    slices = [held_out[0], t1_slice[:100, :90], held_out[1], t1_slice]
    out = denoiser.denoise_list(slices)
    assert [o.shape for o in out] == [s.shape for s in slices]
    for alone, image in zip(out, slices, strict=True):
        np.testing.assert_allclose(alone, denoiser(image[None])[0], atol=1e-5)


def test_a_report_model_is_still_resized_to_64_and_back_and_says_so(tmp_path, t1_slice):
    torch.manual_seed(0)
    model = build_model(ModelConfig.named("ae1", filters=16)).eval()
    data = {"source": "builtin", "size": 64, "patch": None}
    checkpoint = save_checkpoint(tmp_path / "checkpoint.pt", model, noise=NoiseConfig().to_dict(), epoch=1, data=data)
    denoiser = Denoiser(checkpoint)
    described = denoiser.describe()
    assert described["resolution"] == "resized to 64 x 64" and described["native"] is False
    assert described["tile"] is None and described["architecture"] == "autoencoder"
    assert "to the model's 64 x 64, as the report's models require" in denoiser.explain(256, 256)
    with torch.inference_mode():
        small = torch.from_numpy(imaging.resize(t1_slice, (64, 64)))[None, None]
        expected = imaging.resize(model(small)[0, 0].numpy(), (256, 256))
    out = denoiser(t1_slice[None])
    assert out.shape == (1, 256, 256)
    np.testing.assert_allclose(out[0], expected, atol=1e-5)


@pytest.mark.parametrize(
    ("files", "threads"),
    [
        ({"cpu.max": "200000 100000\n"}, 2),  # a pod limited to 2 CPUs (cgroup v2)
        ({"cpu.max": "50000 100000\n"}, 1),  # half a core still runs one thread
        ({"cpu/cpu.cfs_quota_us": "100000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 1),  # cgroup v1
        ({"cpu.max": "max 100000\n"}, None),  # no limit: every core
        ({}, None),  # no cgroup files at all
    ],
)
def test_forward_threads_follow_a_containers_cpu_limit_not_the_nodes_cores(tmp_path, files, threads):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
        usable = min(threads or cores, cores)
        assert usable_cores(tmp_path) == usable
        assert configure_threads(cgroup=tmp_path) == usable == torch.get_num_threads()  # one pass on every core
        assert default_passes("cpu", tmp_path) == usable  # the service's default: a pass per core ...
        assert configure_threads(cgroup=tmp_path, passes=usable) == 1 == torch.get_num_threads()  # ... of one thread
        assert default_passes("cuda", tmp_path) == 1
        assert configure_threads(3, cgroup=tmp_path) == 3  # MRI_SERVICE_TORCH_THREADS wins
    finally:
        torch.set_num_threads(before)


def test_a_decompression_bomb_is_refused_from_its_header():
    bomb = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(bomb, "PNG")  # 400 Mpixel, ~400 kB compressed
    with pytest.raises(InputError, match="more than the limit") as caught:
        imaging.read_image(bomb.getvalue(), Limits(max_image_pixels=4096 * 4096))
    assert caught.value.status == 413


def test_a_gzip_volume_is_inflated_only_as_far_as_its_header_allows():
    import tracemalloc

    header = nib.Nifti1Image(np.zeros((64, 64, 64), np.float32), np.eye(4)).to_bytes()
    bomb = gzip.compress(header + b"\0" * (50 << 20))  # 50 MB of zeros behind a 1 MB volume, in ~50 kB
    tracemalloc.start()
    try:
        volume = imaging.read_volume(bomb, Limits(max_volume_voxels=64**3))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert volume.data.shape == (64, 64, 64, 1)
    assert peak < 10 << 20, f"{peak / 2**20:.0f} MB held: the trailing 50 MB were inflated"

    big = gzip.compress(nib.Nifti1Image(np.zeros((65, 64, 64), np.uint8), np.eye(4)).to_bytes())
    with pytest.raises(InputError, match="more than the limit") as caught:
        imaging.read_volume(big, Limits(max_volume_voxels=64**3))
    assert caught.value.status == 413 and "65, 64, 64" in str(caught.value)


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
    assert info["filters"] == 8 and info["noise"] == {"kind": "gaussian", "variance": 0.2, "clip": True}
    assert info["model_kind"] == "unet" and info["architecture"] == "unet"
    assert info["native"] is True and info["resolution"] == "native" and info["image_size"] == 64
    assert info["serving"]["tile"] == 256 and info["serving"]["tile_overlap"] == 64
    assert info["psnr"] == pytest.approx(built_bento["psnr"], abs=1e-3)
    assert info["scored_on"] == "held-out split of the built-in data at 64 x 64"
    assert info["serving"]["batching"] == "on" and info["serving"]["precision"] == "fp32"


@pytest.mark.slow
def test_one_slice_requests_make_no_tracing_span_and_the_bulk_apis_keep_theirs(bento_server, held_out):
    """MRI_SERVICE_TRACING=bulk (the default) leaves /denoise out of OpenTelemetry: BentoML names a request by its
    span, in the X-BentoML-Request-ID header, so the header shows which requests made one."""

    def request_id(path: str, body: bytes, content_type: str) -> str | None:
        request = urllib.request.Request(bento_server.url + path, data=body, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
            return response.headers.get("X-BentoML-Request-ID")

    slices = json.dumps({"slices": _noisy(held_out[:1]).tolist()}).encode()
    assert request_id("/denoise", slices, "application/json") is None
    assert request_id("/denoise_image", *_multipart(image=("s.png", _png(_noisy(held_out[:1])[0])))), "no span"
    status, _, body = _request(bento_server.url, "/info")
    assert status == 200 and json.loads(body)["serving"]["tracing"] == "bulk"


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
    """(sum, count) of the service's histogram of requests per /denoise forward call (service.batcher)."""
    _, _, body = _request(url, "/metrics")
    totals = {"sum": 0.0, "count": 0.0}
    for kind, value in re.findall(rf"^{BATCH_METRIC}_(sum|count)(?:\{{[^}}]*\}})? (\S+)$", body.decode(), re.M):
        totals[kind] += float(value)
    return totals["sum"], totals["count"]


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


def _concurrently(url: str, requests: list[np.ndarray], clients: int = 16) -> dict[int, tuple[int, object]]:
    """Send each request to /denoise from `clients` threads at once; index -> (status, answer or error body)."""
    answers: dict[int, tuple[int, object]] = {}

    def client(first: int) -> None:
        for k in range(first, len(requests), clients):
            status, _, body = _request(url, "/denoise", json.dumps({"slices": requests[k].tolist()}).encode())
            answers[k] = (status, np.asarray(json.loads(body), dtype=np.float32) if status == 200 else body[:300])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    return answers


@pytest.mark.slow
def test_concurrent_requests_of_mixed_sizes_each_get_their_own_answer(bento_server, built_bento, held_out, t1_slice):
    noisy_t1 = _noisy(t1_slice[None])[0]
    kinds = [
        _noisy(held_out[:1]),  # (1, 64, 64)
        np.stack([noisy_t1[:96, :80], noisy_t1[100:196, 120:200]]),  # (2, 96, 80)
        imaging.resize(noisy_t1, (300, 260))[None],  # (1, 300, 260): over the 256 tile, so tiled
        _noisy(held_out[2:5]),  # (3, 64, 64)
        noisy_t1[None, 60:100, 30:86],  # (1, 40, 56)
    ]
    requests = [kinds[k % len(kinds)] for k in range(40)]  # each of the 16 clients sends sizes in turn
    denoiser = Denoiser(built_bento["checkpoint"])
    expected = [denoiser(kind) for kind in kinds]
    before = _batch_sizes(bento_server.url)
    answers = _concurrently(bento_server.url, requests)
    after = _batch_sizes(bento_server.url)
    failed = {k: answer for k, answer in answers.items() if answer[0] != 200}
    assert len(answers) == len(requests) and not failed, f"{len(failed)} requests failed: {failed}"
    for k, (_, answer) in answers.items():
        np.testing.assert_allclose(answer, expected[k % len(kinds)], atol=1e-4, err_msg=f"request {k}")
    jobs, batches = after[0] - before[0], after[1] - before[1]
    assert jobs / batches > 1.5, f"{len(requests)} concurrent requests ran in {batches:.0f} batches: none were mixed"


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255


@pytest.mark.slow
def test_a_256_image_is_denoised_at_256_and_beats_the_64_round_trip(bento_server, built_bento, t1_slice):
    noisy = _pixels(_png(_noisy(t1_slice[None])[0]))  # what the upload holds: 8-bit pixels
    status, _, body = _request(bento_server.url, "/denoise_image", *_multipart(image=("t1.png", _png(noisy))))
    native = _pixels(body)
    assert status == 200 and native.shape == (256, 256)
    in_process = Denoiser(built_bento["checkpoint"])(noisy[None])[0]  # denoised at 256 x 256, not resized
    np.testing.assert_allclose(native, in_process, atol=1 / 255 + 1e-4)
    small = _denoise(bento_server.url, imaging.resize(noisy, (64, 64)))[0]  # what the service did before
    round_trip = imaging.resize(small, (256, 256))
    scores = {name: _psnr(image[None], t1_slice[None]) for name, image in
              [("noisy", noisy), ("native", native), ("round trip", round_trip)]}  # fmt: skip
    assert scores["native"] > scores["round trip"] + 1, scores  # 2.4 dB for this model when written
    assert scores["native"] > scores["noisy"] + 10, scores


@pytest.mark.slow
def test_denoise_image_keeps_the_size(bento_server, held_out):
    clean = held_out[20]
    noisy = _noisy(clean[None])[0]
    upload = _png(noisy, mode="RGB", size=(200, 180), fmt="JPEG")  # colour JPEG, not square, not 64 x 64
    status, content_type, body = _request(bento_server.url, "/denoise_image", *_multipart(image=("scan.jpg", upload)))
    assert status == 200 and content_type == "image/png"
    assert Image.open(io.BytesIO(body)).size == (200, 180)
    status, _, body = _request(
        bento_server.url, "/denoise_image", *_multipart(image=("s.png", _png(noisy)), size="model")
    )
    restored = _pixels(body)
    assert status == 200 and restored.shape == (64, 64)
    assert _psnr(restored[None], clean[None]) > _psnr(noisy[None], clean[None]) + 3
    # A native model has no size of its own: size=model is the original size too.
    upload = _png(noisy, size=(96, 80))
    status, _, body = _request(bento_server.url, "/denoise_image", *_multipart(image=("s.png", upload), size="model"))
    assert status == 200 and Image.open(io.BytesIO(body)).size == (96, 80)


@pytest.mark.slow
def test_denoise_volume_keeps_geometry_and_denoises_at_the_slices_own_size(bento_server, built_bento):
    status, content_type, body = _request(
        bento_server.url, "/denoise_volume", *_multipart(volume=("example4d.nii.gz", EXAMPLE_4D.read_bytes()))
    )
    assert status == 200 and content_type == "application/gzip", body[:300]
    out, source = nib.Nifti1Image.from_bytes(gzip.decompress(body)), nib.load(EXAMPLE_4D)
    assert out.shape == source.shape and out.get_data_dtype() == np.float32
    np.testing.assert_allclose(out.affine, source.affine)
    assert np.isfinite(out.get_fdata()).all()
    slices, (low, high) = imaging.volume_to_slices(imaging.read_volume(EXAMPLE_4D.read_bytes(), Limits()))
    assert slices.shape == (48, 128, 96)  # 24 slices x 2 volumes, each at its own 128 x 96
    expected = Denoiser(built_bento["checkpoint"])(slices)
    served = (out.get_fdata(dtype=np.float32) - low) / (high - low)  # (X, Y, Z, T) back to (T*Z, X, Y)
    np.testing.assert_allclose(served.transpose(3, 2, 0, 1).reshape(slices.shape), expected, atol=1e-4)


@pytest.mark.slow
def test_preview_scores_the_denoised_image_against_the_clean_one(bento_server, held_out):
    status, _, body = _request(bento_server.url, "/preview", *_multipart(file=("clean.png", _png(held_out[5])),
                                                                        add_noise="true"))  # fmt: skip
    result = json.loads(body)
    assert status == 200
    assert all(result[k].startswith("data:image/png;base64,") for k in ("original", "noisy", "denoised"))
    assert result["metrics"]["denoised"]["psnr"] > result["metrics"]["noisy"]["psnr"] + 3
    assert (result["width"], result["height"]) == (64, 64)
    assert result["resolution"] == "denoised at the image's own 64 x 64"


@pytest.mark.slow
def test_preview_shows_a_big_image_at_its_own_size_up_to_a_cap(bento_server, t1_slice):
    upload = _png(t1_slice, size=(600, 520))  # 600 wide, 520 high
    status, _, body = _request(bento_server.url, "/preview", *_multipart(file=("big.png", upload)))
    result = json.loads(body)
    assert status == 200 and (result["width"], result["height"]) == (512, 444)
    shown = Image.open(io.BytesIO(base64.b64decode(result["denoised"].split(",", 1)[1])))
    assert shown.size == (512, 444)
    assert "denoised at the image's own 512 x 444, in tiles of 256 x 256" in result["resolution"]
    assert "600 x 520 image downscaled to 512 px" in result["resolution"]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buffer, "PNG")
    return buffer.getvalue()


BAD_INPUTS = {
    "a flat list": ("/denoise", {"slices": [0.5] * 64}, 400, "expected slices of shape (N, H, W)"),
    "slices of two sizes": (
        "/denoise",
        {"slices": [np.zeros((64, 64)).tolist(), np.zeros((32, 32)).tolist()]},
        400,
        "must share one size",
    ),  # fmt: skip
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
    # .npy answers carry the float32 output; JSON rounds it to 1e-5
    np.testing.assert_allclose(client.denoise(noisy), _denoise(bento_server.url, noisy), atol=5.1e-6)
    assert client.denoise(noisy[0, :40, :56]).shape == (1, 40, 56)  # any size, one slice
    png = client.denoise_image(_png(noisy[0], size=(96, 80)))
    assert Image.open(io.BytesIO(png)).size == (96, 80)
    with pytest.raises(ServiceError) as caught:
        client.denoise_image(b"not an image at all")
    assert caught.value.status == 400 and "not an image" in caught.value.message


def test_denoise_takes_npy_bodies_and_refuses_what_is_not_one(bento_server, held_out):
    def post(body: bytes) -> tuple[int, bytes]:
        request = urllib.request.Request(f"{bento_server.url}/denoise", body, {"Content-Type": "application/x-npy"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                assert response.headers["Content-Type"] == "application/x-npy"
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def npy(array: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        np.save(buffer, array)
        return buffer.getvalue()

    noisy = _noisy(held_out[:3])
    status, body = post(npy(noisy))
    assert status == 200
    np.testing.assert_allclose(np.load(io.BytesIO(body)), _denoise(bento_server.url, noisy), atol=5.1e-6)  # JSON: 1e-5
    pixels = np.round(noisy[0] * 255).astype(np.uint8)  # uint8 is taken as 0-255
    status, body = post(npy(pixels))
    assert status == 200 and np.load(io.BytesIO(body)).shape == (1, 64, 64)
    for bad, says in ((b"not numpy", "not a NumPy .npy"), (npy(np.array([{"a": 1}], dtype=object)), "readable"),
                      (npy(noisy.astype(np.int64)), "dtype int64"), (npy(noisy[0, 0]), "shape")):  # fmt: skip
        status, body = post(bad)
        assert status == 400 and says in json.loads(body)["error"], body


@pytest.mark.slow
def test_mri_platform_serve_serves_the_latest_bento_on_the_port_asked(built_bento, tmp_path):
    import os
    import sys

    from mri_platform import supervisor

    port = supervisor.free_port()
    env = {**os.environ, "MRI_PLATFORM_HOME": str(built_bento["state"] / "home"),
           "BENTOML_HOME": str(built_bento["bentoml_home"])}  # fmt: skip
    cmd = [sys.executable, "-m", "mri_platform", "serve", "--port", str(port)]
    url = f"http://127.0.0.1:{port}"
    server = supervisor.spawn("serve", cmd, tmp_path, env=env, cwd=tmp_path, url=url)
    try:
        supervisor.await_ready(
            server, lambda: supervisor.http_status(f"{url}/readyz") == 200, 90,
            what=f"GET {url}/readyz to answer 200", hint="see the log",
        )  # fmt: skip
        info = json.loads(_request(server.url, "/info")[2])
        assert info["model_tag"] == built_bento["tag"]
        assert f"serving {built_bento['tag']} on {url}" in server.log_path.read_text()
    finally:
        supervisor.stop(server)
