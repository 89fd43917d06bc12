"""Training images/s of every model of the zoo, fp32 against AMP + channels_last, on a GPU (or a CPU for a check).

Runs the Ray worker's own code without Ray: the same `pipeline.SliceDataset` and `make_loader` (pinned batches and
loader processes on a GPU), the same `steps.run_epoch` (noise drawn on the device, `train_step`, validation, and the
all-reduce of the epoch's sums), inside a real process group of world size 1: NCCL on a GPU, so a CPU-tensor
collective fails here as it would on the cluster ("No backend type associated with device type cpu"); gloo on a CPU.
Imports nothing heavier than torch and numpy (no Ray, MLflow, BentoML, nibabel), so a bare CUDA machine runs it:

    mri-platform export-slices slices.npy             # here: the built-in 64 x 64 training slices
    python benchmarks/gpu_train.py --slices slices.npy   # there (under 5 minutes on one GPU)
    python benchmarks/gpu_train.py --slices slices.npy --quick   # a few steps, to check it runs (CPU: gloo)

Each model and mode trains one warm-up epoch (cuDNN autotuning, loader start) and one timed epoch; images/s is the
worker's own `images_per_s` of the timed epoch. The residual nets train on patches with intensity augmentation and
the report's autoencoders on whole slices with its affine augmentation (where torchvision is installed), as the
presets do.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, without installing it

from mri_platform.models import NAMED, ModelConfig, build_model  # noqa: E402
from mri_platform.noise import NoiseConfig, fixed_noisy  # noqa: E402
from mri_platform.pipeline import SliceDataset, make_loader  # noqa: E402
from mri_platform.steps import Step, autocast_dtype, grad_scaler, lr_schedule, prepare_device, run_epoch  # noqa: E402

REPORT_MODELS = ("ae1", "ae2")


def _has_torchvision() -> bool:
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return False
    return True


def process_group(device: torch.device) -> str:
    """A real process group of world size 1 on this machine: NCCL on a GPU, gloo on a CPU."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, rank=0, world_size=1, **kwargs)
    return backend


def measure(name: str, images: np.ndarray, device: torch.device, fast: bool, args) -> dict[str, float | str]:
    """One warm-up and one timed epoch of `name` through the worker's pipeline and epoch logic."""
    torch.manual_seed(0)
    report = name in REPORT_MODELS
    augment = not report or _has_torchvision()
    dataset = SliceDataset(images, augment=augment, patch=None if report else args.patch, intensity=not report,
                           length=args.steps * args.batch)  # fmt: skip
    workers = args.loader_workers if args.loader_workers is not None else (4 if device.type == "cuda" else 0)
    loader = make_loader(dataset, args.batch, device=device, workers=workers)
    memory_format = torch.channels_last if fast else torch.contiguous_format
    amp = autocast_dtype("auto" if fast else "fp32", device)
    model = build_model(ModelConfig.named(name)).to(device, memory_format=memory_format)
    model = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = lr_schedule(optimizer, "constant" if report else "cosine", 2 * len(loader))
    step = Step(optimizer, scheduler, NoiseConfig(), device, amp, grad_scaler(amp, device),
                None if report else 1.0, memory_format)  # fmt: skip
    clean = torch.from_numpy(np.stack(list(images[: args.val]))).unsqueeze(1).float()
    val = [(clean.to(device, memory_format=memory_format),
            fixed_noisy(clean, NoiseConfig(), 1234).to(device, memory_format=memory_format))]  # fmt: skip
    run_epoch(model, loader, step, val, seed=0, epoch=1)  # warm-up
    metrics = run_epoch(model, loader, step, val, seed=0, epoch=2)
    return {
        "images_per_s": metrics["images_per_s"],
        "loss": metrics["train_loss"],
        "dtype": str(amp).removeprefix("torch.") if amp else "fp32",
        "augment": "on" if augment else "off (no torchvision)",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--slices", type=Path, required=True, help="(N, H, W) float32 .npy of clean slices")
    parser.add_argument("--models", default=",".join(NAMED), help="comma-separated, default: the whole zoo")
    parser.add_argument("--steps", type=int, default=100, help="optimiser steps per epoch (one warm-up, one timed)")
    parser.add_argument("--batch", type=int, default=32, help="batch per step (the gpu preset's per worker: 32)")
    parser.add_argument("--patch", type=int, default=64, help="patch side for the residual nets")
    parser.add_argument("--val", type=int, default=32, help="held-back slices validated every epoch")
    parser.add_argument("--loader-workers", type=int, default=None, help="default: 4 on a GPU, 0 on a CPU")
    parser.add_argument("--quick", action="store_true", help="a few steps of small batches: does it run?")
    parser.add_argument("--cpu", action="store_true", help="use the CPU even where CUDA is available")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.batch, args.val = 2, 8, 8

    images = np.load(args.slices, allow_pickle=False)
    if images.ndim != 3:
        sys.exit(f"{args.slices}: expected (N, H, W) slices of one size, got {images.shape}; export with --size 64")
    device = torch.device("cuda", 0) if torch.cuda.is_available() and not args.cpu else torch.device("cpu")
    prepare_device(device)
    backend = process_group(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"{where}; torch {torch.__version__}; {len(images)} slices {images.shape[1]} x {images.shape[2]}; "
          f"{args.steps} steps x batch {args.batch}; process group {backend}, world size 1")  # fmt: skip

    started = time.perf_counter()
    rows = []
    for name in args.models.split(","):
        plain = measure(name, images, device, fast=False, args=args)
        fast = measure(name, images, device, fast=True, args=args)
        rows.append((name, plain, fast))
    print(f"\n{'model':6} {'fp32 img/s':>11} {'AMP+CL img/s':>13} {'AMP':>9} {'speed-up':>9}  augmentation")
    for name, plain, fast in rows:
        ratio = fast["images_per_s"] / plain["images_per_s"]
        print(f"{name:6} {plain['images_per_s']:11.0f} {fast['images_per_s']:13.0f} {fast['dtype']:>9} "
              f"{ratio:8.2f}x  {plain['augment']}")  # fmt: skip
    elapsed = time.perf_counter() - started
    print(f"\nevery epoch all-reduced its sums on {device.type} under {backend}: ok; {elapsed:.0f} s")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
