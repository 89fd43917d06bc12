"""Serving at native resolution against the 64 x 64 round trip: quality and time per slice on real held-out MRI.

Until the model zoo, the service shrank every image to 64 x 64, denoised it and enlarged it back; a model that
applies natively now denoises each image at its own size (``service/denoiser.py``). This compares the two on real
MRI the built-in training data never holds, each at its own resolution: dipy's T1 coronal slice (256 x 256), and
the slices along the third axis of nibabel's example4d EPI (128 x 96, both volumes) and dipy's S0_10slices
(128 x 128) and aniso_vox (58 x 58), windowed as /denoise_volume does. The model's own training noise is added
with a fixed seed. Per source it prints PSNR / SSIM of (a) the noisy input, (b) the 64 x 64 round trip (what the
service did before, and still does for the report's autoencoders), (c) native denoising, the milliseconds per
slice of (b) and (c) in this process with the service's own `Denoiser` (best of --repeats, the whole source in
one call, as /denoise_volume does), and (c) - (b) in dB.

Then, unless --no-serve, one real `bentoml serve` of the same checkpoint answers /denoise with the T1 slice at
256 x 256: its wall time, and whether its answer is the in-process one.

Run inside a loopback-only namespace: ``scripts/isolated .venv/bin/python benchmarks/serve_native.py --checkpoint
PATH`` (a checkpoint file or a run's folder; any model of the zoo: a report model, served resized, is also applied
natively here to show what it would give).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import psutil
import torch

from mri_platform.data import intensity_window
from mri_platform.metrics import psnr_per_image, ssim_per_image
from mri_platform.noise import fixed_noisy
from service import imaging
from service.denoiser import Denoiser, configure_threads, default_passes

ROOT = Path(__file__).resolve().parent.parent
"""Where `bentoml serve` runs, so that it imports the service from this checkout."""
ROUND_TRIP = 64
"""The side every image was resized to before the model zoo."""
T1_SLICE = ("dipy", "data/files/t1_coronal_slice.npy")
VOLUMES = (
    ("nibabel", "tests/data/example4d.nii.gz"),
    ("dipy", "data/files/S0_10slices.nii.gz"),
    ("dipy", "data/files/aniso_vox.nii.gz"),
)
HEAD_FRACTION = 0.15
"""A volume slice is used when at least this share of its pixels is head (above 0.1 after windowing)."""
SEED = 1234
OTHER_CPU_WARNING = 0.2
"""Cores used by other processes during the timings above which the report says they are distorted."""


@dataclass
class Source:
    name: str
    clean: np.ndarray
    """(N, H, W) in [0, 1]."""


@dataclass
class Row:
    source: str
    size: str
    slices: int
    scores: dict[str, tuple[float, float]]
    """'noisy' / 'round trip' / 'native' -> (PSNR dB, SSIM), means over the slices."""
    ms: dict[str, float]
    """'round trip' / 'native' -> milliseconds per slice."""


def _package_file(package: str, relative: str) -> Path:
    return Path(str(resources.files(package).joinpath(relative)))


def load_sources(per_volume: int) -> list[Source]:
    """The T1 slice, and up to `per_volume` evenly spaced head slices of each volume, at their own sizes."""
    t1 = np.load(_package_file(*T1_SLICE)).astype(np.float32)
    low, high = intensity_window(t1)
    sources = [Source("t1_coronal_slice", np.clip((t1 - low) / (high - low), 0, 1)[None])]
    for package, relative in VOLUMES:
        path = _package_file(package, relative)
        volume = imaging.read_volume(path.read_bytes(), imaging.Limits())
        slices, _ = imaging.volume_to_slices(volume)  # the service's own windowing, at the in-plane size
        heads = slices[(slices > 0.1).mean(axis=(1, 2)) >= HEAD_FRACTION]
        pick = np.linspace(0, len(heads) - 1, min(per_volume, len(heads))).round().astype(int)
        sources.append(Source(path.name.removesuffix(".nii.gz"), heads[pick]))
    return sources


def _scores(pred: np.ndarray, clean: np.ndarray) -> tuple[float, float]:
    p, c = torch.from_numpy(pred)[:, None], torch.from_numpy(clean)[:, None]
    return float(psnr_per_image(p, c).mean()), float(ssim_per_image(p, c).mean())


def _timed(denoisers: dict[str, Denoiser], noisy: np.ndarray, repeats: int) -> dict[str, tuple[np.ndarray, float]]:
    """Each denoiser's output and best wall time in ms per slice, over `repeats` rounds that call them in turn (so
    that a burst of other work on the machine slows a round of both rather than one of them), after one untimed
    call each (the first pass at a new shape allocates)."""
    results = {name: (denoiser(noisy), float("inf")) for name, denoiser in denoisers.items()}
    for _ in range(repeats):
        for name, denoiser in denoisers.items():
            started = time.perf_counter()
            out = denoiser(noisy)
            elapsed = 1000 * (time.perf_counter() - started) / len(noisy)
            results[name] = (out, min(results[name][1], elapsed))
    return results


def measure(source: Source, native: Denoiser, round_trip: Denoiser, repeats: int, seed: int) -> Row:
    noisy = fixed_noisy(torch.from_numpy(source.clean)[:, None], native.noise, seed).clamp(0, 1)[:, 0].numpy()
    timed = _timed({"round trip": round_trip, "native": native}, noisy, repeats)
    height, width = source.clean.shape[1:]
    return Row(
        source=source.name,
        size=f"{width} x {height}",
        slices=len(noisy),
        scores={
            "noisy": _scores(noisy, source.clean),
            **{k: _scores(out, source.clean) for k, (out, _) in timed.items()},
        },
        ms={k: ms for k, (_, ms) in timed.items()},
    )


def _busy_cpu() -> float:
    """CPU seconds the machine's processes have spent running (user + system, nice included)."""
    times = psutil.cpu_times()
    return times.user + times.nice + times.system


def overall(rows: list[Row]) -> Row:
    """Means over every slice of every source (each slice counts once)."""
    weights = np.array([row.slices for row in rows], dtype=float)

    def mean(values: list[float]) -> float:
        return float(np.average(values, weights=weights))

    keys = rows[0].scores
    return Row(
        source="all slices",
        size="-",
        slices=int(weights.sum()),
        scores={k: (mean([r.scores[k][0] for r in rows]), mean([r.scores[k][1] for r in rows])) for k in keys},
        ms={k: mean([r.ms[k] for r in rows]) for k in rows[0].ms},
    )


def print_table(rows: list[Row]) -> None:
    print(
        "\n| source | W x H | slices | noisy PSNR / SSIM | (b) 64 x 64 round trip | (c) native | (c) - (b) dB "
        "| ms/slice (b) | ms/slice (c) |\n|---|---|---|---|---|---|---|---|---|"
    )
    for row in [*rows, overall(rows)]:
        cells = [f"{row.scores[k][0]:.2f} / {row.scores[k][1]:.3f}" for k in ("noisy", "round trip", "native")]
        gain = row.scores["native"][0] - row.scores["round trip"][0]
        print(
            f"| {row.source} | {row.size} | {row.slices} | {' | '.join(cells)} | {gain:+.2f} "
            f"| {row.ms['round trip']:.1f} | {row.ms['native']:.1f} |"
        )


# ------------------------------------------------------------------------------------------- one real server


@contextlib.contextmanager
def served(checkpoint: Path, folder: Path, precision: str):
    """`bentoml serve` of the service with this checkpoint stored as a BentoML model, computing in `precision` as the
    in-process `Denoiser` does (the service's own default, 'auto', is bf16 on a CPU with native bf16); yields its
    URL."""
    os.environ["BENTOML_HOME"] = str(folder / "bentoml")  # read when BentoML is first imported, below
    os.environ["BENTOML_DO_NOT_TRACK"] = "true"
    import bentoml

    from mri_platform import supervisor
    from mri_platform.servers import start_bento

    tag = "mri-denoiser:bench"
    with bentoml.models.create(tag, metadata={"source": str(checkpoint)}) as stored:
        shutil.copy2(checkpoint, Path(stored.path) / "checkpoint.pt")
    server = start_bento(
        folder / "serve", "service.service:MRIDenoiser", bentoml_home=folder / "bentoml",
        env={"MRI_SERVICE_MODEL": tag, "MRI_SERVICE_PRECISION": precision}, cwd=ROOT,
    )  # fmt: skip
    try:
        yield server.url
    finally:
        supervisor.stop(server)


def serve_once(checkpoint: Path, clean: np.ndarray, native: Denoiser, repeats: int) -> None:
    noisy = fixed_noisy(torch.from_numpy(clean)[None, None], native.noise, SEED).clamp(0, 1)[0, 0].numpy()
    body = json.dumps({"slices": noisy.tolist()}).encode()
    expected = native(noisy[None])
    with (
        tempfile.TemporaryDirectory(prefix="serve-native-") as tmp,
        served(checkpoint, Path(tmp), native.precision) as url,
    ):
        with urllib.request.urlopen(f"{url}/info", timeout=30) as response:
            info = json.load(response)
        best, answer = float("inf"), None
        for _ in range(repeats):
            request = urllib.request.Request(f"{url}/denoise", body, {"Content-Type": "application/json"})
            started = time.perf_counter()
            with urllib.request.urlopen(request, timeout=120) as response:
                answer = np.asarray(json.load(response), dtype=np.float32)
            best = min(best, time.perf_counter() - started)
    height, width = noisy.shape
    diff = float(np.abs(answer - expected).max()) if answer.shape == expected.shape else float("nan")
    print(
        f"\nbentoml serve ({info['architecture']}, resolution {info['resolution']}): /denoise of the {width} x "
        f"{height} T1 slice as JSON answered {answer.shape} in {1000 * best:.0f} ms (best of {repeats}, JSON both "
        f"ways included); largest difference from the in-process native answer: {diff:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint file or a run's folder")
    parser.add_argument("--per-volume", type=int, default=6, help="head slices taken from each volume")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per source (the best kept)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads of a forward pass (default: the cores shared among the passes, as the service); 1 gives "
        "steadier figures on a machine busy with other work, where 2 threads on 2 shared cores stalled up to 40x",
    )
    parser.add_argument(
        "--passes", type=int, default=0, help="forward passes at once (default: the service's, one per core)"
    )
    parser.add_argument("--no-serve", action="store_true", help="skip the real `bentoml serve` request")
    args = parser.parse_args()
    began = time.perf_counter()
    checkpoint = args.checkpoint / "checkpoint.pt" if args.checkpoint.is_dir() else args.checkpoint
    passes = args.passes or default_passes("cpu")
    threads = configure_threads(args.threads or 0, passes=passes)  # as the service does
    native = Denoiser(checkpoint, args.precision, native=True, passes=passes)
    round_trip = Denoiser(checkpoint, args.precision, native=False, size=ROUND_TRIP, passes=passes)
    served_as = Denoiser(checkpoint, args.precision).resolution
    sources = load_sources(args.per_volume)
    busy, own, started = _busy_cpu(), time.process_time(), time.perf_counter()
    rows = [measure(source, native, round_trip, args.repeats, SEED + k) for k, source in enumerate(sources)]
    other = max(0.0, _busy_cpu() - busy - (time.process_time() - own)) / (time.perf_counter() - started)
    config = native.meta["model"]
    print(
        f"checkpoint {checkpoint}: {config['name']} ({native.architecture}, {config['filters']} filters), trained "
        f"against {native.noise.describe()} on {native.meta.get('data', {})}; the service serves it "
        f"{'at native resolution' if served_as == 'native' else served_as}. Column (c) applies it natively, in tiles "
        f"of {native.tile} x {native.tile} (overlap {native.overlap}) above that; {passes} forward pass(es) at once "
        f"of {threads} torch thread(s) each, {args.precision}."
    )
    print_table(rows)
    print(f"\nother processes used {other:.2f} of {psutil.cpu_count()} cores meanwhile", end="")
    print(": the timings are distorted, compare (b) and (c) only" if other > OTHER_CPU_WARNING else "")
    if not args.no_serve:
        serve_once(checkpoint, sources[0].clean[0], native, args.repeats)
    print(f"\nwhole run: {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
