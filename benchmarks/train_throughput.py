"""Training throughput: plain single-process PyTorch vs Ray Train with 2 workers, fp32 vs the fast CPU path.

The same pipeline in every cell (built-in slices, augmentation, fresh noise per batch, Adam, global batch 32);
the fast path is channels_last + bf16 autocast. Run with `make bench` (inside a loopback-only namespace).
Each cell is bounded in time; Ray cells report the mean images/s of the epochs after the first (warm-up).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

from mri_platform.config import build_config
from mri_platform.data import SliceDataset, load_builtin
from mri_platform.models import ModelConfig, build_model
from mri_platform.noise import NoiseConfig
from mri_platform.train import fit, train_step

PATHS = {"fp32": {"precision": "fp32", "channels_last": False}, "fast": {"precision": "bf16", "channels_last": True}}


def plain(model_name: str, path: str, seconds: float, threads: int = 2) -> float:
    """Images/s of single-process PyTorch using every core, after 3 warm-up steps."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    settings = PATHS[path]
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    amp = torch.bfloat16 if settings["precision"] == "bf16" else None
    model = build_model(ModelConfig.named(model_name)).to(memory_format=memory_format)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(
        SliceDataset(load_builtin()[0].images, augment=True), batch_size=32, shuffle=True, drop_last=True
    )
    generator = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield from loader

    stream = batches()
    for _ in range(3):
        train_step(model, next(stream).to(memory_format=memory_format), optimizer, NoiseConfig(), generator, amp)
    seen, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        clean = next(stream).to(memory_format=memory_format)
        train_step(model, clean, optimizer, NoiseConfig(), generator, amp)
        seen += clean.shape[0]
    return seen / (time.perf_counter() - started)


def with_ray(model_name: str, path: str, epochs: int, workers: int = 2) -> tuple[float, float, float]:
    """(images/s after warm-up, time to the first epoch's end, total wall time) of a real Ray Train run."""
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MRI_PLATFORM_HOME"] = folder
        config = build_config(
            None, model=model_name, epochs=epochs, workers=workers, registered_model="",
            tracking_uri=f"sqlite:///{folder}/mlflow.db", **PATHS[path],
        )  # fmt: skip
        started = time.perf_counter()
        result = fit(config)
        total = time.perf_counter() - started
    first_epoch = result.history[0]["epoch_time_s"]
    return result.metrics["images_per_s"], first_epoch, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ae1,ae2")
    parser.add_argument("--seconds", type=float, default=20.0, help="time per plain-PyTorch cell")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    for name in args.models.split(","):
        epochs = 3 if name == "ae1" else 2
        for path in PATHS:
            single = plain(name, path, args.seconds)
            distributed, _, _ = with_ray(name, path, epochs)
            rows.append((name, path, single, distributed))
            print(f"{name} {path}: plain {single:.0f} img/s, Ray Train 2 workers {distributed:.0f} img/s", flush=True)
    ray.shutdown()

    header = ("model", "path", "plain img/s", "Ray 2w img/s", "Ray/plain", "fast/fp32")
    print("\n{:6s} {:5s} {:>12s} {:>13s} {:>10s} {:>10s}".format(*header))
    for name, path, single, distributed in rows:
        base = next(r for r in rows if r[0] == name and r[1] == "fp32")
        speedup = f"{distributed / base[3]:.2f}x" if path == "fast" else ""
        print(f"{name:6s} {path:5s} {single:12.0f} {distributed:13.0f} {distributed / single:9.2f}x {speedup:>10s}")
    print(f"\ncpu: {torch.get_num_threads()} threads visible; fast = channels_last + bf16 autocast; batch 32")


if __name__ == "__main__":
    main()
