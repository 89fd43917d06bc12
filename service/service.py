"""The BentoML service: the registry's champion denoiser behind HTTP, with adaptive batching and a web page.

APIs (all POST, as BentoML serves them; see http://127.0.0.1:3000 for the OpenAPI page):
- ``/denoise``: ``{"slices": [[...H x W...], ...]}`` -> the denoised slices in the same order and shape. Any
  H x W within the pixel limit; one (H, W) slice is a request of one. Batched: concurrent requests share forward
  calls (``max_batch_size`` slices, ``max_latency_ms``), whatever their sizes (see below).
- ``/denoise_image``: a PNG/JPEG of any size and mode (multipart field ``image``) -> a denoised PNG at the
  original size (``size=original``), or at the model's 64 x 64 for a report model (``size=model``).
- ``/denoise_volume``: a ``.nii``/``.nii.gz`` (field ``volume``) -> the volume denoised slice by slice along its
  third axis, with the input's affine and header.
- ``/preview``: what the page shows: original / noisy / denoised PNGs and PSNR / SSIM when a clean reference is
  known (``add_noise=true`` adds the noise the model was trained against to a clean image).
GET ``/info`` describes the model (registry version, architecture, resolution, noise, held-out metrics); GET
``/ui`` is the page; ``/livez``, ``/readyz`` and ``/metrics`` are BentoML's.

**Resolution.** A model that applies natively (the residual networks, and models trained on patches) denoises
every image, slice and volume at its own resolution, tiled above ``MRI_SERVICE_TILE``; a report autoencoder
(trained on whole 64 x 64 slices) gets every input resized to 64 x 64 and back, as the report's app did, and
/info says which (:class:`service.denoiser.Denoiser`). /denoise accepts any size for a report model too, rather
than refusing what is not 64 x 64: it is what /denoise_image does for the same model, and a caller cannot always
resize as the training data was (Lanczos, clipped); sending 64 x 64 slices skips the resizing.

**Batching.** /denoise's requests go through :class:`service.batcher.GreedyBatcher`: whenever the model is free, one
forward call takes every waiting request, whatever their sizes; the call groups its slices by size and runs each group
as one forward pass (:meth:`Denoiser.denoise_list`), so same-size requests batch exactly, and hands each request its own
slices back. A ``.npy`` request reaches the same batcher before BentoML's router (:class:`service.binary.Direct`). The
batcher replaced BentoML's adaptive dispatcher (still there with MRI_SERVICE_BATCHING=bentoml, to compare:
``benchmarks/serve_throughput.py``), which holds requests back to fill the batch its latency model predicts, and whose
latency model a burst once taught to refuse every request for minutes. /denoise takes a *list* of (H, W) slices (its
JSON is the same as an (N, H, W) array's) because BentoML's dispatcher merges a list whatever its elements, and an
ndarray with ``np.concatenate``, which fails a whole batch as soon as two sizes meet. Measured before the change:
validating, merging, splitting and writing the JSON of 16 one-slice 64 x 64 requests cost 0.46 ms of CPU per request
with the list as with the ndarray. Cutting every request into fixed-size tiles instead would pad a 64 x 64 slice to a
whole tile (16 slices padded to tiles of 128: 68 against 12 ms for a U-Net of 8 filters, 1 thread). A batch's cost grows
with its pixels, not its slice count, so a few huge slices in a busy batch can push queued requests past
``max_latency_ms`` (503, worth retrying); /denoise_image and /denoise_volume suit big images better.

Settings come from the environment, read when the service is imported (``MRI_SERVICE_*``, see ``Settings``).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any

import bentoml
import numpy as np
import pydantic_core
from _bentoml_sdk.io_models import ensure_io_descriptor  # BentoML 1.4 exports no public name for it
from bentoml.validators import ContentType, DType
from pydantic import AfterValidator, BeforeValidator, Field, WithJsonSchema
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from mri_platform import heap
from service import binary, errors, imaging
from service.admission import (
    Admission,
    AdmissionSettings,
    Cancelled,
    LaneLimit,
    arm_header_timeout,
    release_request_timers,
    return_freed_memory,
)
from service.batcher import GreedyBatcher, batch_histogram
from service.build import BENTO_NAME, MODEL_ENV, MODEL_NAME
from service.denoiser import TILE, Denoiser, configure_threads, default_passes
from service.imaging import InputError, Limits
from service.openapi import OpenAPIErrors

UI_FILE = Path(__file__).parent / "ui" / "index.html"
PREVIEW_MAX_SIDE = 512
"""The page previews an image at its own size up to this side, downscaled beyond (three data-URL PNGs per answer);
/denoise_image and /denoise_volume are never capped."""


def _env_int(name: str, default: int | None) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


BATCHINGS = ("on", "bentoml", "off")
TRACINGS = ("bulk", "all")


@dataclass(frozen=True)
class Settings:
    """Serving settings, from ``MRI_SERVICE_*`` environment variables."""

    model: str = f"{MODEL_NAME}:latest"
    """MRI_SERVICE_MODEL: the BentoML model tag to load (`mri-platform build` pins it to the imported version)."""
    batching: str = "on"
    """MRI_SERVICE_BATCHING: 'on' batches /denoise greedily (:mod:`service.batcher`: whenever the model is free, one
    forward call takes every waiting request); 'bentoml' uses BentoML's adaptive (CORK) dispatcher instead, as the
    service did before (the serving benchmark compares them); 'off' serves one request at a time."""
    max_batch_size: int = 32
    """MRI_SERVICE_MAX_BATCH_SIZE: most requests merged into one forward pass (AE1 on 2 cores is fastest per slice
    at 8-16 and slower beyond 32, see the serving benchmark)."""
    max_latency_ms: int = 3000
    """MRI_SERVICE_MAX_LATENCY_MS: the latency budget of a batched request: one that has waited this long for the
    model is answered 503 rather than run."""
    passes: int = 0
    """MRI_SERVICE_PASSES: forward passes at once; 0 runs one per core the server may use on a CPU (each on one
    thread: see :mod:`service.denoiser`), one on a GPU. 1 runs one pass at a time on every core, as before."""
    torch_threads: int = 0
    """MRI_SERVICE_TORCH_THREADS: threads of one forward pass; 0 shares the cores the server may use among the
    passes run at once."""
    precision: str = "auto"
    """MRI_SERVICE_PRECISION: 'auto' (bf16 autocast where the CPU or GPU computes bf16 natively, else fp32), fp32 or
    bf16. bf16 served AE1 1.3x faster on a CPU with AVX-512 BF16 and moved PSNR by at most 0.003 dB."""
    tile: int = TILE
    """MRI_SERVICE_TILE: a native model denoises slices up to tile x tile whole, bigger ones in tiles of that size
    (bounds the memory of a forward pass)."""
    tile_overlap: int | None = None
    """MRI_SERVICE_TILE_OVERLAP: pixels shared by neighbouring tiles; each keeps the half away from its edge. None:
    the model's own (`denoiser.default_overlap`: 64 px for the 4-level U-Net, 32 for smaller strides)."""
    limits: Limits = field(default_factory=Limits)
    """MRI_SERVICE_MAX_REQUEST_MB, MRI_SERVICE_MAX_IMAGE_PIXELS, MRI_SERVICE_MAX_SLICES, MRI_SERVICE_MAX_VOXELS: upper
    bounds; the service lowers the image and volume limits to what its work ceiling allows (see ``work_limits``)."""
    work_memory_mb: int = 1024
    """MRI_SERVICE_WORK_MEMORY_MB: memory one image or volume request may take beyond the loaded model."""
    work_seconds: int = 90
    """MRI_SERVICE_WORK_S: the longest one image or volume request may compute; the limits are set so that it takes
    at most half of this on an idle server, and work still running past it is stopped with 503."""
    tracing: str = "bulk"
    """MRI_SERVICE_TRACING: 'bulk' leaves /denoise out of BentoML's OpenTelemetry spans (its other APIs keep them):
    a span per one-slice request took a fifth of the event loop's samples (py-spy), and with no exporter configured,
    BentoML's default, they go nowhere (with httptools and uvloop, AE1 .npy at 64 clients served 1.12-1.27x the
    req/s of before, 4 pairs of servers in turn). 'all' traces every API, for a server whose BentoML configuration
    exports spans."""
    admission: AdmissionSettings = field(default_factory=AdmissionSettings)
    """MRI_SERVICE_BODY_BUFFER_MB, MRI_SERVICE_BODY_IDLE_S, MRI_SERVICE_BODY_TOTAL_S, MRI_SERVICE_HEADER_S."""

    @classmethod
    def from_env(cls) -> Settings:
        defaults, limits, admission = cls(), Limits(), AdmissionSettings()
        batching = os.environ.get("MRI_SERVICE_BATCHING", "on").strip().lower()
        batching = {"true": "on", "1": "on", "false": "off", "0": "off"}.get(batching, batching)
        if batching not in BATCHINGS:
            raise ValueError(f"MRI_SERVICE_BATCHING must be one of {', '.join(BATCHINGS)}, got {batching!r}")
        request_bytes = _env_int("MRI_SERVICE_MAX_REQUEST_MB", limits.max_request_bytes >> 20) << 20
        tracing = os.environ.get("MRI_SERVICE_TRACING", defaults.tracing).strip().lower()
        if tracing not in TRACINGS:
            raise ValueError(f"MRI_SERVICE_TRACING must be one of {', '.join(TRACINGS)}, got {tracing!r}")
        return cls(
            model=os.environ.get(MODEL_ENV) or defaults.model,
            batching=batching,
            max_batch_size=_env_int("MRI_SERVICE_MAX_BATCH_SIZE", defaults.max_batch_size),
            max_latency_ms=_env_int("MRI_SERVICE_MAX_LATENCY_MS", defaults.max_latency_ms),
            passes=_env_int("MRI_SERVICE_PASSES", defaults.passes),
            torch_threads=_env_int("MRI_SERVICE_TORCH_THREADS", defaults.torch_threads),
            precision=os.environ.get("MRI_SERVICE_PRECISION", defaults.precision),
            tile=_env_int("MRI_SERVICE_TILE", defaults.tile),
            tile_overlap=_env_int("MRI_SERVICE_TILE_OVERLAP", defaults.tile_overlap),
            limits=Limits(
                max_request_bytes=request_bytes,  # what /info reports; admission enforces it
                max_image_pixels=_env_int("MRI_SERVICE_MAX_IMAGE_PIXELS", limits.max_image_pixels),
                max_slices=_env_int("MRI_SERVICE_MAX_SLICES", limits.max_slices),
                max_volume_voxels=_env_int("MRI_SERVICE_MAX_VOXELS", limits.max_volume_voxels),
            ),
            work_memory_mb=_env_int("MRI_SERVICE_WORK_MEMORY_MB", defaults.work_memory_mb),
            work_seconds=_env_int("MRI_SERVICE_WORK_S", defaults.work_seconds),
            tracing=tracing,
            admission=AdmissionSettings(
                max_request_bytes=request_bytes,
                body_buffer_bytes=_env_int("MRI_SERVICE_BODY_BUFFER_MB", admission.body_buffer_bytes >> 20) << 20,
                body_idle_s=_env_int("MRI_SERVICE_BODY_IDLE_S", int(admission.body_idle_s)),
                body_total_s=_env_int("MRI_SERVICE_BODY_TOTAL_S", int(admission.body_total_s)),
                header_s=_env_int("MRI_SERVICE_HEADER_S", int(admission.header_s)),
            ),
        )


SETTINGS = Settings.from_env()
LANES = {
    "/denoise": LaneLimit(running=512, waiting=0),  # its batcher queues these, and 503s past the latency budget
    "/denoise_volume": LaneLimit(running=1, waiting=63),
    "/denoise_image": LaneLimit(running=2, waiting=62),
    "/preview": LaneLimit(running=2, waiting=62),
}
"""Requests of each endpoint handled at once, and queued behind them; beyond, 503 with Retry-After at once. Each lane
holds 64 requests, so that 64 clients of mixed traffic wait rather than being refused: with 8 volumes queued, a
10-minute soak of 64 clients (benchmarks/serve_soak.py) had 1,168 of 2,056 volumes refused once /denoise served
twice as fast, since its clients then came back for volumes twice as often. Their memory is bounded by
MRI_SERVICE_BODY_BUFFER_MB, which counts queued bodies too, and their wait by BentoML's 120 s request timeout
(504), which stops a request's work at its next forward pass."""
VOLUME_BYTES_PER_VOXEL = 24
"""Peak memory of /denoise_volume per voxel (the upload's data as float32, windowed slices, the output, the file
written back): 2.4 GB were measured for a 512^3 uint8 volume, 18 bytes per voxel, before the limits existed."""
IMAGE_BYTES_PER_PIXEL = 48
"""Peak memory of /denoise_image per pixel (decoded, gray float32, tiles, output, PNG), with room to spare."""
arm_header_timeout(SETTINGS.admission.header_s)
release_request_timers()
return_freed_memory()


def work_limits(settings: Settings, seconds_per_megapixel: float) -> tuple[Limits, dict[str, Any]]:
    """The image and volume limits the work ceiling allows: the configured limits, lowered so that one request
    fits in ``work_memory_mb`` and in half of ``work_seconds`` at the measured speed; and how they were derived."""
    by_time = int(settings.work_seconds / 2 / max(seconds_per_megapixel, 1e-9) * 1e6)
    voxels_by_memory = settings.work_memory_mb * 2**20 // VOLUME_BYTES_PER_VOXEL
    pixels_by_memory = settings.work_memory_mb * 2**20 // IMAGE_BYTES_PER_PIXEL
    limits = replace(
        settings.limits,
        max_volume_voxels=max(1, min(settings.limits.max_volume_voxels, voxels_by_memory, by_time)),
        max_image_pixels=max(1, min(settings.limits.max_image_pixels, pixels_by_memory, by_time)),
    )
    return limits, {
        "memory_mb": settings.work_memory_mb,
        "seconds": settings.work_seconds,
        "seconds_per_megapixel": round(seconds_per_megapixel, 4),
        "max_volume_voxels_by_memory": voxels_by_memory,
        "max_pixels_by_time": by_time,
        "configured": asdict(settings.limits),
    }


def _valid_slices(slices: list[np.ndarray]) -> list[np.ndarray]:
    """Runs per request, before batching, so one bad request is refused alone (400) and never joins a batch."""
    return imaging.check_slices(slices, SETTINGS.limits.max_slices, SETTINGS.limits.max_image_pixels)


Slices = Annotated[
    list[Annotated[np.ndarray, DType("float32")]],  # a list, so that BentoML merges requests of any sizes
    BeforeValidator(imaging.as_slice_list),
    AfterValidator(_valid_slices),
    WithJsonSchema(imaging.slices_schema(SETTINGS.limits.max_slices)),  # not BentoML's 2-D list: (N, H, W) or (H, W)
]


class SlicesJSON(ensure_io_descriptor(Annotated[list[np.ndarray], WithJsonSchema(imaging.slices_output_schema())])):
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


# ------------------------------------------------------------------------------------------------ the service


BULK_THREADS = ThreadPoolExecutor(8, thread_name_prefix="bulk")
"""Where /denoise_image, /denoise_volume and /preview run (their lanes let 5 run at once): reading, decoding and
their forward passes, which take the model gate as bulk work."""
_work = threading.local()
"""``cancelled``: the Event of the request the thread works for (see `_in_thread`)."""


async def _in_thread(work: Callable[..., Any], *args: Any) -> Any:
    """``work(*args)`` on a bulk thread. If its request is given up meanwhile (the client left, or BentoML's
    ``traffic.timeout`` answered 504), the work stops at its next forward pass: before, its thread computed on for
    up to MRI_SERVICE_WORK_S, and in benchmarks/serve_hostile.py two volumes answered 504 at 120 s went on taking
    passes from /denoise after the burst (81 % of its throughput for the 20 s measured)."""
    cancelled = threading.Event()

    def run() -> Any:
        _work.cancelled = cancelled
        try:
            return work(*args)
        finally:
            _work.cancelled = None

    try:
        return await asyncio.get_running_loop().run_in_executor(BULK_THREADS, run)
    except asyncio.CancelledError:
        cancelled.set()
        raise


def _bad_input(error: InputError) -> Response:
    return JSONResponse({"error": str(error)}, status_code=error.status)


def _data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


@bentoml.asgi_app(pages, path="/")
@bentoml.service(
    name=BENTO_NAME,
    workers=1,
    # No sync APIs, so no BentoML threads: /denoise runs on its batcher's thread, the others on BULK_THREADS.
    # A backstop only: service.admission bounds each endpoint, after a request's body is in.
    traffic={"timeout": 120, "max_concurrency": 2048},
    metrics={"enabled": True},
    # matched as a regular expression against the URL: /denoise alone, not /denoise_image
    **({"tracing": {"excluded_urls": ["/denoise$"]}} if SETTINGS.tracing == "bulk" else {}),
    logging={"access": {"enabled": False}},  # a log line per request costs more than AE1's forward pass
)
class MRIDenoiser:
    """Denoises brain MRI slices, images and volumes with the model imported from the MLflow registry."""

    model_ref = bentoml.models.BentoModel(SETTINGS.model)

    def __init__(self) -> None:
        global _instance
        passes = SETTINGS.passes or default_passes()
        self.threads = configure_threads(SETTINGS.torch_threads, passes=passes)
        self.denoiser = Denoiser(
            self.model_ref.path,
            precision=SETTINGS.precision,
            tile=SETTINGS.tile,
            overlap=SETTINGS.tile_overlap,
            passes=passes,
        )
        self.size = self.denoiser.size
        self.batcher = GreedyBatcher(
            self.denoiser.denoise_list,
            max_batch_size=SETTINGS.max_batch_size if SETTINGS.batching == "on" else 1,
            # BentoML's dispatcher keeps its own budget; its merged batch arrives here as one job
            max_latency_s=SETTINGS.max_latency_ms / 1000 if SETTINGS.batching != "bentoml" else float("inf"),
            observe=batch_histogram().observe if SETTINGS.batching == "on" else None,
            concurrency=passes,
        )
        """Every /denoise forward call goes through it, on its own threads (JSON and .npy, service.binary)."""
        self.limits, work = work_limits(SETTINGS, self._seconds_per_megapixel())
        stored = bentoml.models.get(self.model_ref.tag)
        described = self.denoiser.describe()
        self.info = {
            "service": BENTO_NAME,
            "model_tag": str(stored.tag),
            **{k: v for k, v in stored.info.metadata.items() if k != "tracking_uri"},
            # From the checkpoint itself, so that a Bento built before the model zoo is described right too.
            "architecture": described["architecture"],
            "native": described["native"],
            "resolution": described["resolution"],
            "serving": {
                **described,
                "threads": self.threads,
                "batching": SETTINGS.batching,
                "tracing": SETTINGS.tracing,
                "max_batch_size": SETTINGS.max_batch_size,
                "max_latency_ms": SETTINGS.max_latency_ms,
                "preview_max_side": PREVIEW_MAX_SIDE,
                "limits": asdict(self.limits),
                "work": work,
                "concurrency": {path: asdict(limit) for path, limit in LANES.items()},
                "connections": SETTINGS.admission.describe(),
            },
        }
        _instance = self
        # Everything loaded so far (torch, BentoML, the model: millions of objects) lives as long as the server;
        # left to the collector, each of its full passes walked it all, stopping the server for 150 ms about every
        # 1.4 s under load (p99 of /denoise 230 ms against p50 55 ms, benchmarks/serve_throughput.py).
        gc.freeze()

    @bentoml.api(
        batchable=SETTINGS.batching == "bentoml",
        batch_dim=0,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
        output_spec=SlicesJSON,
    )
    async def denoise(self, slices: Slices) -> list[np.ndarray]:
        """Denoise (N, H, W) float32 slices in [0, 1], or one (H, W) slice; returns them in the same order and
        shape (N, H, W). A native model works at H x W; a report model resizes to its 64 x 64 and back."""
        # The batcher merges this request with the others waiting (of any sizes: see the module's docstring).
        # Rounded to 1e-5 (far below an 8-bit step, 4e-3) as float64, whose JSON is short: a float32 prints 17
        # digits once in Python, and writing that JSON cost more than the forward pass.
        return [np.round(image.astype(np.float64), 5) for image in await self.batcher(slices)]

    @bentoml.api
    async def denoise_image(
        self,
        image: Path,
        size: Annotated[str, Field(pattern="^(original|model)$")] = "original",
    ) -> Annotated[Path, ContentType("image/png")]:
        """Denoise a PNG/JPEG (gray) and return a PNG at the original size. A native model denoises it at that
        size (tiled above MRI_SERVICE_TILE); a report model resizes it to its 64 x 64 and back, or, with
        ``size=model``, returns its 64 x 64 output (a native model has no other size: ``model`` is the original)."""
        return await _in_thread(self._denoise_image, image, size)

    def _denoise_image(self, image: Path, size: str) -> Response:
        try:
            pixels = imaging.read_image(image.read_bytes(), self.limits)
        except InputError as error:
            return _bad_input(error)
        if size == "model" and not self.denoiser.native:
            pixels = imaging.resize(pixels, (self.size, self.size))
        try:
            restored = self._bulk(pixels[None])[0]
        except Cancelled:
            return self._too_long("image")
        return Response(imaging.encode_png(restored), media_type="image/png")

    @bentoml.api
    async def denoise_volume(self, volume: Path) -> Annotated[Path, ContentType("application/octet-stream")]:
        """Denoise a NIfTI volume slice by slice along its third axis (every volume of a 4D file), each slice at
        its own in-plane size for a native model; geometry and header kept, data float32."""
        return await _in_thread(self._denoise_volume, volume)

    def _denoise_volume(self, volume: Path) -> Response:
        try:
            parsed = imaging.read_volume(volume.read_bytes(), self.limits)
            slices, window = imaging.volume_to_slices(parsed)
        except InputError as error:
            return _bad_input(error)
        try:
            restored = self._bulk(slices)
        except Cancelled:
            return self._too_long("volume")
        del slices
        content = imaging.slices_to_volume(parsed, restored, window)
        name = "denoised.nii.gz" if parsed.gzipped else "denoised.nii"
        return Response(
            content,
            media_type="application/gzip" if parsed.gzipped else "application/octet-stream",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    @bentoml.api
    async def preview(
        self, file: Path, add_noise: bool = False, seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    ) -> dict[str, Any]:
        """For the page: original / noisy / denoised as PNG data URLs, and PSNR / SSIM against a clean reference.

        A native model shows an image at its own size up to PREVIEW_MAX_SIDE (downscaled beyond); a report model
        at its 64 x 64. A volume shows its middle slice along the third axis. With ``add_noise`` the upload is
        taken as the clean reference and the model's own training noise is added. ``resolution`` says in words
        how the image was denoised.
        """
        return await _in_thread(self._preview, file, add_noise, seed)

    def _preview(self, file: Path, add_noise: bool, seed: int) -> dict[str, Any] | Response:
        content = file.read_bytes()
        try:
            upload = self._upload_slice(content)
            original, resolution = self._preview_size(upload)
            if add_noise:
                imaging.check_scorable(original)
        except InputError as error:
            return _bad_input(error)
        noisy = imaging.add_report_noise(original, self.denoiser.noise, seed) if add_noise else original
        try:
            restored = self._bulk(noisy[None])[0]
        except Cancelled:
            return self._too_long("image")
        height, width = original.shape
        result: dict[str, Any] = {
            "original": _data_url(imaging.encode_png(original)),
            "noisy": _data_url(imaging.encode_png(noisy)) if add_noise else None,
            "denoised": _data_url(imaging.encode_png(restored)),
            "noise": self.denoiser.noise.describe() if add_noise else None,
            "model": self.info["model_tag"],
            "width": width,
            "height": height,
            "resolution": resolution,
        }
        if add_noise:
            import torch

            from mri_platform.metrics import score

            def scores(pred: np.ndarray) -> dict[str, float]:
                return score(torch.from_numpy(pred)[None, None], torch.from_numpy(original)[None, None])

            result["metrics"] = {"noisy": scores(noisy), "denoised": scores(restored)}
        return result

    def _upload_slice(self, content: bytes) -> np.ndarray:
        """The uploaded image, or the middle slice of the first 3D volume of an uploaded NIfTI, at its own size."""
        if imaging.looks_like_nifti(content):
            volume = imaging.read_volume(content, self.limits)
            slices, _ = imaging.volume_to_slices(volume)
            return slices[volume.data.shape[2] // 2]  # the middle slice of the first 3D volume
        return imaging.read_image(content, self.limits)

    def _bulk(self, slices: np.ndarray) -> np.ndarray:
        """Denoise an image's or a volume's slices as bulk work: the batched slice API goes first between any two
        forward passes, and work past MRI_SERVICE_WORK_S stops (:class:`Cancelled`)."""
        try:
            deadline = time.monotonic() + SETTINGS.work_seconds
            return self.denoiser(slices, bulk=True, deadline=deadline, cancelled=getattr(_work, "cancelled", None))
        finally:
            heap.trim()  # the big request's free pages back to the system

    def _too_long(self, what: str) -> Response:
        return JSONResponse(
            {
                "error": f"the {what} took longer than the service's work limit of {SETTINGS.work_seconds} s (the "
                "server is busy); retry later or send a smaller one"
            },
            status_code=503,
            headers={"Retry-After": "10"},
        )

    def _seconds_per_megapixel(self) -> float:
        """Bulk speed of this model here: the best of 3 passes of 4 slices of 256 x 256, after a warm-up pass (the
        best, so that a busy moment at start does not lower the limits for the server's life)."""
        probe = np.full((4, 256, 256), 0.5, dtype=np.float32)
        self.denoiser(probe[:1], bulk=True)
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            self.denoiser(probe, bulk=True)
            best = min(best, time.perf_counter() - started)
        return best / (probe.size / 1e6)

    def _preview_size(self, upload: np.ndarray) -> tuple[np.ndarray, str]:
        """The upload as the page shows and denoises it, and a line that says how."""
        height, width = upload.shape
        if not self.denoiser.native:
            return imaging.resize(upload, (self.size, self.size)), self.denoiser.explain(height, width)
        scale = PREVIEW_MAX_SIDE / max(height, width)
        if scale >= 1:
            return upload, self.denoiser.explain(height, width)
        shown = imaging.resize(upload, (max(1, round(height * scale)), max(1, round(width * scale))))
        line = self.denoiser.explain(*shown.shape)
        return shown, (
            f"{line}: the page shows a {width} x {height} image downscaled to {PREVIEW_MAX_SIDE} px; "
            "the download is denoised at its full size"
        )


def _direct_batcher() -> GreedyBatcher | None:
    """The batch queue that .npy /denoise requests go to past BentoML's router (service.binary.Direct): the service's
    own, unless BentoML's dispatcher batches, or every request is traced (BentoML's endpoint wrapper answers with the
    trace's request id)."""
    if _instance is None or SETTINGS.batching == "bentoml" or SETTINGS.tracing == "all":
        return None
    return _instance.batcher


errors.install(binary={"denoise": _valid_slices})  # refusals without a traceback; /denoise takes .npy too
MRIDenoiser.add_asgi_middleware(errors.Refusals)  # first, so outermost: it logs admission's 408/413/503 too
MRIDenoiser.add_asgi_middleware(Admission, settings=SETTINGS.admission, lanes=LANES)
MRIDenoiser.add_asgi_middleware(binary.Direct, path="/denoise", batcher=_direct_batcher, validate=_valid_slices)
MRIDenoiser.add_asgi_middleware(OpenAPIErrors, batched=["denoise"])  # its batch queue answers 503 past the budget
