"""The model as the service runs it: a checkpoint in, slices in [0, 1] in and out, at their own resolution where
the model allows it.

Kept apart from BentoML so that the benchmarks measure the same code in-process (the ceiling for served
throughput) and the tests can check it without a server.

A model is applied in one of two ways, as its checkpoint says (:func:`mri_platform.checkpoints.applies_natively`):

- **native** (the residual networks, and any model trained on patches): a slice is denoised at its own H x W,
  never resized. Up to ``tile`` x ``tile`` it goes through the network whole. A bigger slice is cut into tiles of
  that size overlapping by ``overlap`` pixels; each tile's output is kept away from its cut edges (neighbours split
  their overlap in the middle), so that the memory of a forward pass is bounded by the tile whatever the image
  size. Cropping the margins matched whole-image inference better than blending the overlap with linear ramps
  (a trained U-Net on a real 256 x 256 slice, tiles of 128: 67 dB against 52 dB at a 32 px overlap; identical at
  64 px): a ramp still gives weight to the pixels next to a cut edge, whose context was padding.
- **resized** (the report's autoencoders, which learned whole 64 x 64 slices through a 16 x 16 bottleneck): every
  slice is shrunk to the trained size, denoised and enlarged back, as the report's app did. A slice of the trained
  size passes as it is.

Either way a forward pass holds at most ``pass_pixels`` pixels: several slices (or tiles) of one size per pass.

On a CPU ``passes`` forward passes run at once, one per core, each on one thread (:func:`configure_threads`), rather
than one pass at a time on every core's threads: a pass whose threads span the cores waits, at every layer, for
the slowest of them, and the HTTP side of the server takes a core now and then. Measured in one process on 2 cores
(AMD EPYC, bf16), with another process busy 40 % of the time on one core: AE1 in passes of 16 ran 1,810-1,987
slices/s in 2 passes at once of 1 thread, 1,114-1,207 in one pass of 2 threads; AE2 in passes of 8, 209-217 against
155-167 (on quiet cores: 2,382-2,503 against 1,901-2,082, and 264-270 against 249-250). A call with several passes
(a volume, a big batch) runs that many of them at once, so one request alone still takes every core.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_platform.checkpoints import FILENAME, applies_natively, checkpoint_noise, load_checkpoint, trained_size
from mri_platform.noise import NoiseConfig
from mri_platform.steps import autocast_dtype
from service.admission import Cancelled, ModelGate
from service.imaging import resize

PRECISIONS = ("auto", "fp32", "bf16")
"""'auto': bf16 autocast where the device computes bf16 natively (a CPU with AVX-512 BF16 or AMX, a GPU from Ampere
on), else fp32. Measured on the built-in held-out slices: bf16 changes PSNR by at most 0.003 dB (AE1, U-Net)."""
CGROUP = Path("/sys/fs/cgroup")
"""Where a container's CPU limit is read (`cpu_quota`): the process's own cgroup in a container's namespace."""
TILE = 256
"""Default side of the largest slice passed whole; bigger slices are tiled (MRI_SERVICE_TILE)."""
OVERLAP = 32
"""Smallest default overlap of neighbouring tiles in pixels: every kept pixel is at least 16 px from a cut edge.
A model's own default (`default_overlap`) grows with its stride; MRI_SERVICE_TILE_OVERLAP sets one for all."""

PASS_ACTIVATIONS = 2**22
"""Most values of the model's full-resolution feature maps (its width x the pixels) in one forward pass on a CPU:
bigger passes are slower per pixel once the activations outgrow the caches (8 MB in bf16, a quarter of this
machine's L3). So a pass holds 16 slices of 64 x 64 for a model 64 filters wide (AE1, DnCNN), 4 for AE2 (256), 32
for a U-Net of 32, and never less than one tile (native models) or one slice (the report's models). Measured on 2
cores (AMD EPYC, bf16), slices/s at 4 / 8 / 16 / 32 slices a pass: AE1 2144-2303 / 2216-2463 / 2145-2476 /
1241-1729; AE2 246-256 / 180-250 / 164-194 / 156-179; U-Net (32) 670 / 724 / 760 / 763. Earlier, against passes of
4 x 256 x 256: 32 and 64 slices of 64 x 64 and a 512 x 512 image in tiles ran 1.4x / 2.2x / 1.75x faster in passes
of one tile (AE1, U-Net)."""
PASS_PIXELS_CUDA = 16 * 256 * 256
"""Most pixels in one forward pass on a GPU, which runs bigger batches faster."""


def default_overlap(stride: int) -> int:
    """Tile overlap for a model of this stride: 8 px per unit, at least `OVERLAP` (32 for a 3-level U-Net or DnCNN,
    64 for the 4-level U-Net), because each level down doubles how far a pixel's output reaches.

    Measured on a real 256 x 256 T1 slice in tiles of 128, tiled output against whole-image output: 3-level U-Net
    (32 filters) 77 dB at 32 px, 111 at 48; 4-level (16 filters) 56 dB at 32 px, 65 at 48, 70 at 64. Against the
    clean slice every overlap scored within 0.005 dB of the whole image. In the service's tiles of 256 an image
    costs about (256 / 192)^2 = 1.8x the work of untiled inference at 64 px, (256 / 224)^2 = 1.3x at 32."""
    return max(OVERLAP, 8 * stride)


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles of side ``tile`` start along an axis of ``length`` pixels: every ``tile - overlap`` pixels, the
    last one flush with the end (so it may overlap its neighbour by more)."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int, int]]:
    """(tile start, first, last + 1) along an axis: the pixels each tile's output is kept for. Neighbours split
    their overlap in the middle, so every pixel comes from exactly one tile, at least ``overlap // 2`` pixels away
    from that tile's cut edges (where the network saw padding instead of the image around it)."""
    starts = tile_starts(length, tile, overlap)
    cuts = [0, *((a + tile + b) // 2 for a, b in zip(starts, starts[1:], strict=False)), length]
    return [(start, cuts[k], cuts[k + 1]) for k, start in enumerate(starts)]


@dataclass(frozen=True)
class _Call:
    """How one call's forward passes take the gate: ``bulk`` work yields to urgent work and stops at its deadline or
    when its request is given up."""

    bulk: bool = False
    deadline: float | None = None
    cancelled: threading.Event | None = None


class Denoiser:
    """A trained denoiser in eval mode on the CPU (or a GPU), channels_last, fp32 or bf16 autocast.

    ``native`` and ``size`` override what the checkpoint says (None): ``native=False`` forces the resize path on
    any model, to ``size`` x ``size`` (what the service did for every model before the zoo, at 64; the benchmark
    compares both); ``native=True`` applies even a report model at every image's own size.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        precision: str = "fp32",
        device: str | None = None,
        *,
        tile: int = TILE,
        overlap: int | None = None,
        pass_pixels: int | None = None,
        native: bool | None = None,
        size: int | None = None,
        gate: ModelGate | None = None,
        passes: int = 1,
    ):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        path = Path(checkpoint)
        if path.is_dir():
            path = path / FILENAME
        self.model, self.meta = load_checkpoint(path)
        if overlap is None:
            overlap = min(default_overlap(self.model.config.stride), tile // 2)
        if tile < 32 or not 0 <= overlap <= tile // 2:
            raise ValueError(
                f"tile {tile} with overlap {overlap} is not usable: the tile must be at least 32 pixels and the "
                "overlap between 0 and half the tile (MRI_SERVICE_TILE, MRI_SERVICE_TILE_OVERLAP)"
            )
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.native = applies_natively(self.meta) if native is None else native
        self.size = size or trained_size(self.meta)
        """The side a report model is fed (resized to it and back); what a native model learned from."""
        smallest = tile * tile if self.native else self.size * self.size  # a pass holds one tile, or one slice
        if pass_pixels is None:
            width = max(1, int(self.model.config.filters))
            pass_pixels = PASS_PIXELS_CUDA if self.device.type == "cuda" else PASS_ACTIVATIONS // width
            pass_pixels = max(pass_pixels, smallest)
        if pass_pixels < smallest:
            what = f"one tile ({tile} x {tile})" if self.native else f"one slice ({self.size} x {self.size})"
            raise ValueError(f"pass_pixels ({pass_pixels:,}) must hold at least {what}")
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        if precision == "auto":
            precision = "bf16" if autocast_dtype("auto", self.device) == torch.bfloat16 else "fp32"
        self.precision = precision
        """What the forward passes run in: fp32 or bf16 ('auto' resolved)."""
        self.tile, self.overlap, self.pass_pixels = tile, overlap, pass_pixels
        self.passes = gate.passes if gate else passes
        """Forward passes at once (see the module's docstring); one call runs that many of its passes at once."""
        self.gate = gate or ModelGate(passes=passes)
        """Taken around every forward pass: `passes` at once, urgent calls before bulk ones (service.admission)."""
        self._pools = {
            bulk: ThreadPoolExecutor(self.passes, thread_name_prefix="bulk-pass" if bulk else "pass")
            for bulk in (False, True)
        }
        """Threads that run one call's passes side by side: urgent and bulk apart, so that urgent passes never queue
        behind bulk ones here (the gate orders them)."""

    @property
    def noise(self) -> NoiseConfig:
        """The noise the model was trained against (what the page adds to a clean image)."""
        return checkpoint_noise(self.meta)

    @property
    def architecture(self) -> str:
        return str(self.model.config.architecture)

    @property
    def resolution(self) -> str:
        """'native', or 'resized to 64 x 64': how every image is fed to the model."""
        return "native" if self.native else f"resized to {self.size} x {self.size}"

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.meta["model"],
            "architecture": self.architecture,
            "noise": self.meta["noise"],
            "resolution": self.resolution,
            "native": self.native,
            "trained_size": self.size,
            "tile": self.tile if self.native else None,
            "tile_overlap": self.overlap if self.native else None,
            "pass_pixels": self.pass_pixels,
            "passes": self.passes,
            "precision": self.precision,
            "device": str(self.device),
        }

    def explain(self, height: int, width: int) -> str:
        """One line for people: how a height x width image is (or was) denoised."""
        if not self.native:
            return (
                f"resized from {width} x {height} to the model's {self.size} x {self.size}, "
                "as the report's models require"
            )
        if height <= self.tile and width <= self.tile:
            return f"denoised at the image's own {width} x {height}"
        return (
            f"denoised at the image's own {width} x {height}, in tiles of {self.tile} x {self.tile} "
            f"overlapping by {self.overlap} px"
        )

    @torch.inference_mode()
    def __call__(
        self,
        slices: np.ndarray,
        *,
        bulk: bool = False,
        deadline: float | None = None,
        cancelled: threading.Event | None = None,
    ) -> np.ndarray:
        """Denoise (N, H, W) float32 slices in [0, 1]; returns (N, H, W) float32 in [0, 1].

        ``bulk`` work (a volume, a big image) lets urgent work (the batched slice API) go first between any two of
        its forward passes; with a ``deadline`` (time.monotonic) it raises :class:`Cancelled` once that has
        passed, or once ``cancelled`` is set (its request was given up), between two passes, rather than holding
        the cores for an answer nobody waits for any more.
        """
        array = np.asarray(slices, dtype=np.float32)
        if array.ndim != 3 or 0 in array.shape:
            raise ValueError(f"expected (N, H, W) slices with N, H, W >= 1, got shape {array.shape}")
        call = _Call(bulk, deadline, cancelled)
        height, width = array.shape[1:]
        if not self.native:
            return self._resized(array, call)
        if height <= self.tile and width <= self.tile:
            return self._whole(array, call)
        return self._tiled(array, call)

    def denoise_list(self, slices: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Slices of any sizes, each (H, W), in order: the slices of one size are denoised together (urgent)."""
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(slices):
            by_shape.setdefault(tuple(image.shape), []).append(index)
        out: list[np.ndarray] = [np.empty(0)] * len(slices)
        for indices in by_shape.values():
            for index, restored in zip(indices, self(np.stack([slices[i] for i in indices])), strict=True):
                out[index] = restored
        return out

    def _forward(self, batch: np.ndarray, call: _Call) -> np.ndarray:
        """One forward pass of (n, h, w) slices or tiles, through the gate."""
        if call.bulk:
            if (call.deadline is not None and time.monotonic() > call.deadline) or (
                call.cancelled and call.cancelled.is_set()
            ):
                raise Cancelled
            with self.gate.bulk(call.deadline):
                return self._pass(batch)
        with self.gate.urgent():
            return self._pass(batch)

    def _each_pass(self, work: Callable[[slice], np.ndarray], parts: list[slice], call: _Call) -> list[np.ndarray]:
        """``work(part)`` for every part (one forward pass each), in order, up to ``passes`` of them at once. The
        first error is raised once the passes under way are done; passes not started are dropped."""
        if self.passes == 1 or len(parts) == 1:
            return [work(part) for part in parts]
        pool, results = self._pools[call.bulk], [np.empty(0)] * len(parts)
        waiting = iter(enumerate(parts))
        running: dict[Future, int] = {}
        try:
            for index, part in itertools.islice(waiting, self.passes):
                running[pool.submit(work, part)] = index
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    results[running.pop(future)] = future.result()
                    for index, part in itertools.islice(waiting, 1):
                        running[pool.submit(work, part)] = index
        finally:
            wait(running)  # an error: let the passes under way end before the call's arrays go
        return results

    @torch.inference_mode()  # per thread: a pass may run on one of the pools' threads
    def _pass(self, batch: np.ndarray) -> np.ndarray:
        tensor = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).unsqueeze(1)  # (n, 1, h, w)
        tensor = tensor.to(self.device).contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision == "bf16"):
            out = self.model(tensor)
        return out.float().clamp_(0, 1).squeeze(1).cpu().numpy()

    def _chunks(self, count: int, height: int, width: int) -> Iterator[slice]:
        """Passes of at most `pass_pixels`, and at least `passes` of them where there are as many images: a batch of
        10 slices runs as two passes of 5 on 2 cores, not one of 10 on one core."""
        per_pass = max(1, min(self.pass_pixels // (height * width), math.ceil(count / self.passes)))
        for start in range(0, count, per_pass):
            yield slice(start, start + per_pass)

    def _whole(self, array: np.ndarray, call: _Call) -> np.ndarray:
        n, height, width = array.shape
        parts = list(self._chunks(n, height, width))
        return np.concatenate(self._each_pass(lambda part: self._forward(array[part], call), parts, call))

    def _resized(self, array: np.ndarray, call: _Call) -> np.ndarray:
        shape = array.shape[1:]
        side = (self.size, self.size)
        if shape == side:
            return self._whole(array, call)
        restored = self._whole(np.stack([resize(image, side) for image in array]), call)
        return np.stack([resize(image, shape) for image in restored])

    def _tiled(self, array: np.ndarray, call: _Call) -> np.ndarray:
        """Overlapping tiles of at most tile x tile; each kept for the pixels away from its cut edges."""
        n, height, width = array.shape
        tile_h, tile_w = min(self.tile, height), min(self.tile, width)
        rows = tile_spans(height, tile_h, self.overlap)
        cols = tile_spans(width, tile_w, self.overlap)
        jobs = [(k, row, col) for k in range(n) for row in rows for col in cols]
        out = np.empty_like(array)

        def one_pass(part: slice) -> np.ndarray:  # each pass writes its tiles' kept pixels, which no other pass does
            chunk = jobs[part]
            tiles = np.stack([array[k, r : r + tile_h, c : c + tile_w] for k, (r, _, _), (c, _, _) in chunk])
            for (k, (r, top, bottom), (c, left, right)), restored in zip(
                chunk, self._forward(tiles, call), strict=True
            ):
                out[k, top:bottom, left:right] = restored[top - r : bottom - r, left - c : right - c]
            return out[:0]

        self._each_pass(one_pass, list(self._chunks(len(jobs), tile_h, tile_w)), call)
        return out


def usable_cores(cgroup: Path = CGROUP) -> int:
    """The cores this process may use: its CPU affinity, lowered to its cgroup's CPU quota.

    A container's CPU limit is a quota, not an affinity: a Bento pod limited to 2 CPUs on a 64-core node sees 64
    cores, and 64 threads sharing 2 cores' worth of time make every forward pass wait on the slowest of them.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = cpu_quota(cgroup)
    return min(cores, max(1, int(quota))) if quota else cores


def default_passes(device: str | None = None, cgroup: Path = CGROUP) -> int:
    """Forward passes at once when MRI_SERVICE_PASSES is 0: one per usable core on a CPU (each pass on one thread,
    see the module's docstring), one on a GPU."""
    cuda = device.startswith("cuda") if device else torch.cuda.is_available()
    return 1 if cuda else usable_cores(cgroup)


def configure_threads(requested: int = 0, cgroup: Path = CGROUP, passes: int = 1) -> int:
    """Threads of one forward pass: `requested`, or with 0 the usable cores (`usable_cores`) shared among `passes`
    passes at once, at least one each."""
    threads = requested or max(1, usable_cores(cgroup) // passes)
    torch.set_num_threads(threads)
    return threads


def cpu_quota(cgroup: Path = CGROUP) -> float | None:
    """The cores' worth of CPU time this process's cgroup may use (cgroup v2 `cpu.max`, else v1 `cpu.cfs_quota_us`
    over `cpu.cfs_period_us`), or None where there is no limit or no cgroup file to read."""
    try:
        if (cgroup / "cpu.max").exists():
            quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        else:
            quota = (cgroup / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup / "cpu" / "cpu.cfs_period_us").read_text().strip()
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)
