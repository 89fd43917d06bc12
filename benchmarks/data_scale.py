"""Driver memory and training speed as the data set grows 10x: Ray Data from S3 against the in-memory path.

Cohorts of N volumes are made from the built-in data's four real volumes (the MNI152 T1 template, nibabel's EPI,
dipy's b0 and anisotropic EPI) by resampling each copy with random per-axis zooms (0.5-0.8, trilinear) and a random
left-right flip: resampled real MRI, not new scans. Each cohort is written to a SeaweedFS S3 bucket (and to local
disk for the in-memory path); the `prepared` path first slices it once with `mri-platform prepare` into Parquet on
S3 (timed apart: "prepare s") and trains on those slices. Every cell is one `train` run of AE1 in its own driver
process (2 workers x 1 CPU, the same steps per epoch, so every cell does the same training work): its driver's peak
RSS, its images/s (mean of the epochs after the first) and its wall time. Each cell runs --repeats times, the
paths taken in turn; the table shows the mean and each run. Run inside a loopback-only namespace:

    scripts/isolated .venv/bin/python benchmarks/data_scale.py --sizes 20,200
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import nibabel as nib
import numpy as np
from scipy import ndimage

from mri_platform import data, servers, supervisor

ONE_RUN = """
import json, resource, sys, time
from mri_platform.config import build_config
from mri_platform.train import fit
settings = json.loads(sys.argv[1])
started = time.perf_counter()
result = fit(build_config(None, **settings))
print("RESULT " + json.dumps({"rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "images_per_s": result.metrics["images_per_s"], "psnr": result.metrics["psnr"],
                              "wall_s": time.perf_counter() - started}))
"""


def make_cohort(n: int, folder: Path, seed: int = 0) -> list[Path]:
    """n resampled copies of the four real built-in volumes (first 3D volume of each), as .nii.gz."""
    rng = np.random.default_rng(seed)
    sources = []
    for package, relative in (data._MNI, *data._HELD_OUT_VOLUMES):
        image = nib.as_closest_canonical(nib.load(data._package_file(package, relative)))
        volume = np.asarray(image.dataobj, dtype=np.float32)
        sources.append((volume[..., 0] if volume.ndim == 4 else volume, image.affine))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        volume, affine = sources[i % len(sources)]
        zoom = rng.uniform(0.5, 0.8, 3)
        zoom[np.array(volume.shape) < 16] = 1.0  # keep thin slabs' few slices
        resampled = ndimage.zoom(volume, zoom, order=1)
        if rng.random() < 0.5:
            resampled = resampled[::-1]
        scaled = affine @ np.diag([*(1 / zoom), 1.0])
        path = folder / f"vol{i:04d}.nii.gz"
        nib.save(nib.Nifti1Image(np.ascontiguousarray(resampled), scaled), path)
        paths.append(path)
    return paths


def run(settings: dict, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", ONE_RUN, json.dumps(settings)], env=env, capture_output=True,
                          text=True, timeout=1800)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"run failed ({done.returncode}): {done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def prepare(source: str, destination: str, env: dict) -> tuple[str, float]:
    """`mri-platform prepare SOURCE DESTINATION` (its own driver process); returns the destination and its wall s."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mri_platform", "prepare", source, destination], env=env,
                          capture_output=True, text=True, timeout=1800)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"prepare failed ({done.returncode}): {done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return destination, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="20,200", help="cohort sizes in volumes, smallest first")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per epoch (global batch 32)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each cell, taken in turn over the paths")
    parser.add_argument(
        "--paths",
        default="ray-data,memory,prepared",
        help="ray-data (volumes on S3), memory (on local disk), prepared (slices on S3 from `mri-platform prepare`)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    work = Path(tempfile.mkdtemp(prefix="data-scale-"))
    s3 = servers.start_seaweedfs(work / "s3")
    try:
        env = {**os.environ, "AWS_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": s3.extra["access_key"],
               "AWS_SECRET_ACCESS_KEY": s3.extra["secret_key"], "AWS_DEFAULT_REGION": "us-east-1",
               "MRI_PLATFORM_HOME": str(work / "state"),
               # Ray's own folder: a driver without RAY_ADDRESS joins the cluster of the last `ray start` it finds in
               # RAY_TMPDIR (another job's on a shared machine), which refuses a local cluster's options.
               "RAY_TMPDIR": str(work)}  # fmt: skip
        client = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.extra["access_key"],
                              aws_secret_access_key=s3.extra["secret_key"], region_name="us-east-1")  # fmt: skip
        rows = []
        for n in sizes:
            started = time.perf_counter()
            paths = make_cohort(n, work / f"cohort{n}")
            for path in paths:
                client.upload_file(str(path), s3.extra["bucket"], f"cohort{n}/{path.name}")
            megabytes = sum(p.stat().st_size for p in paths) / 2**20
            print(f"cohort of {n} volumes: {megabytes:.0f} MB gzipped, made and uploaded in "
                  f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip
            sources, prepare_s = {}, {}
            for loading in args.paths.split(","):
                source = str(work / f"cohort{n}") if loading == "memory" else f"s3://{s3.extra['bucket']}/cohort{n}"
                prepare_s[loading] = 0.0
                if loading == "prepared":
                    source, prepare_s[loading] = prepare(source, f"s3://{s3.extra['bucket']}/prepared{n}", env)
                sources[loading] = source
            for repeat in range(args.repeats):  # in turn, so that a slow spell of the machine lowers no one path
                for loading, source in sources.items():
                    settings = {"model": "ae1", "epochs": args.epochs, "steps_per_epoch": args.steps, "workers": 2,
                                "data": source, "loading": "memory" if loading == "memory" else "ray-data",
                                "registered_model": "", "tracking_uri": f"sqlite:///{work / 'mlflow.db'}",
                                "storage": str(work / "ckpt")}  # fmt: skip
                    result = run(settings, env)
                    rows.append({"volumes": n, "loading": loading, "prepare_s": prepare_s[loading],
                                 "repeat": repeat, **result})  # fmt: skip
                    print(rows[-1], flush=True)
    finally:
        supervisor.stop(s3, timeout=3)
        shutil.rmtree(work, ignore_errors=True)  # the cohorts, S3's files and Ray's session: ~375 MB at 200 volumes

    cells: dict[tuple[int, str], list[dict]] = {}
    for r in rows:
        cells.setdefault((r["volumes"], r["loading"]), []).append(r)
    print(f"\n{'volumes':>7} {'path':>9} {'driver peak RSS MB':>18} {'img/s (each run)':>22} {'wall s':>7} "
          f"{'prepare s':>9} {'PSNR dB':>8}")  # fmt: skip
    mean = {key: float(np.mean([r["images_per_s"] for r in runs])) for key, runs in cells.items()}
    for (n, loading), runs in cells.items():
        each = " / ".join(f"{r['images_per_s']:.0f}" for r in runs)
        print(
            f"{n:7d} {loading:>9} {max(r['rss_mb'] for r in runs):18.0f} {f'{mean[n, loading]:.0f} ({each})':>22} "
            f"{np.mean([r['wall_s'] for r in runs]):7.0f} {runs[0]['prepare_s']:9.0f} "
            f"{np.mean([r['psnr'] for r in runs]):8.2f}"
        )
    for loading in args.paths.split(","):
        peaks = [max(r["rss_mb"] for r in cells[n, loading]) for n in sizes if (n, loading) in cells]
        if len(peaks) >= 2:
            print(f"{loading}: driver peak RSS x{peaks[-1] / peaks[0]:.2f} for {sizes[-1] / sizes[0]:.0f}x the volumes")
    for n in sizes:
        for loading in ("ray-data", "prepared"):
            if (n, loading) in mean and (n, "memory") in mean:
                pairs = zip(cells[n, loading], cells[n, "memory"], strict=False)
                each = " / ".join(f"{a['images_per_s'] / b['images_per_s']:.0%}" for a, b in pairs)
                print(f"{n} volumes: {loading} / in-memory training img/s = {mean[n, loading] / mean[n, 'memory']:.0%} "
                      f"(each run: {each})")  # fmt: skip


if __name__ == "__main__":
    main()
