"""One optimisation step, one validation pass and one epoch: the training logic every worker runs.

Plain PyTorch (nothing heavier than torch and numpy is imported), so the Ray worker (`train.train_loop_per_worker`)
and `benchmarks/gpu_train.py` run the very same code, the latter on a bare CUDA machine. Everything that crosses
ranks is a tensor on the training device: under NCCL the process group serves CUDA tensors only, and an all-reduce
of a CPU tensor fails at the end of the first epoch ("No backend type associated with device type cpu").
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mri_platform import heap
from mri_platform.metrics import mse_per_image, psnr_per_image, ssim_per_image, summarize
from mri_platform.noise import NoiseConfig, add_noise


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device, or None for plain fp32.

    On a GPU 'auto' is bf16 where the GPU computes it (Ampere and later), else fp16 (with a GradScaler, see
    `grad_scaler`); an explicit 'bf16' on a GPU without it is refused rather than silently emulated.
    """
    if precision == "fp32":
        return None
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        if precision == "bf16" and not bf16:
            name = torch.cuda.get_device_name(device)
            raise ValueError(f"--precision bf16: the GPU {name} does not compute bf16; use fp16 or auto (fp16 there)")
        if precision == "fp16" or (precision == "auto" and not bf16):
            return torch.float16
        return torch.bfloat16
    if precision == "bf16":
        return torch.bfloat16
    # 'auto' on a CPU: bf16 only where the hardware computes it natively (AVX-512 BF16 or AMX); emulated bf16 is slow
    native = (
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )
    return torch.bfloat16 if native else None


def grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A loss scaler where fp16 gradients would underflow without one (fp16 autocast); bf16 and fp32 need none."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def prepare_device(device: torch.device) -> None:
    """Per-process settings for fast training on `device`: on a GPU, cuDNN picks the fastest convolution for each
    input shape (the shapes repeat every step: fixed patches or slices); on a CPU, glibc keeps each step's
    activations and gradients in its heap for the next step instead of mapping and zeroing them anew
    (:func:`mri_platform.heap.keep_training_memory`: AE1 1.3x faster per worker, the U-Net 1.2x)."""
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cudnn.benchmark = True
    else:
        heap.keep_training_memory()


def train_step(
    model: torch.nn.Module,
    clean: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    noise: NoiseConfig,
    generator: torch.Generator | None,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
) -> torch.Tensor:
    """One optimisation step on a batch of clean slices (N, 1, H, W), with fresh noise drawn for it on their device;
    the gradient's norm clipped to `max_grad_norm` when given. Returns the loss, detached and on the device (reading
    it would wait for the GPU every step)."""
    noisy = add_noise(clean, noise, generator)
    with torch.autocast(clean.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
        restored = model(noisy)
    loss = F.mse_loss(restored.float(), clean)
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        if max_grad_norm:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
    return loss.detach()


@torch.inference_mode()
def evaluate_batches(
    model: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int = 64
) -> torch.Tensor:
    """Sums of per-image MSE, PSNR and SSIM of the model's restorations (fp32), and the image count: a float64
    tensor (4,) on the pairs' device, ready to all-reduce across ranks.

    `pairs` holds (clean, noisy) batches (n, 1, H, W), one per slice shape.
    """
    device = pairs[0][0].device if pairs else torch.device("cpu")
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    for clean, noisy in pairs:
        for start in range(0, len(clean), batch_size):
            target, inputs = clean[start : start + batch_size], noisy[start : start + batch_size]
            restored = model(inputs).float()
            sums[0] += mse_per_image(restored, target).sum().double()
            sums[1] += psnr_per_image(restored, target).sum()
            sums[2] += ssim_per_image(restored, target).sum()
        sums[3] += len(clean)
    return sums


def lr_schedule(optimizer: torch.optim.Optimizer, kind: str, total_steps: int) -> torch.optim.lr_scheduler.LRScheduler:
    """'constant', or 'cosine': a linear warm-up over the first 3 % of the steps, then cosine decay to zero.

    Stepped once per optimiser step; its state is checkpointed, so a resumed run continues the same curve.
    """
    warmup = max(1, round(0.03 * total_steps))

    def factor(step: int) -> float:
        if kind == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class Step:
    """What a training step needs beside the model and the batch; fixed for a run."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    noise: NoiseConfig
    device: torch.device
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    max_grad_norm: float | None = None
    memory_format: torch.memory_format = torch.contiguous_format


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_epoch(
    model: torch.nn.Module,
    loader,
    step: Step,
    val_pairs: list[tuple[torch.Tensor, torch.Tensor]],
    *,
    seed: int,
    epoch: int,
    rank: int = 0,
    world: int = 1,
) -> dict[str, float]:
    """Train one epoch on this rank's share of `loader`, validate on its share of `val_pairs`, and all-reduce the
    sums across ranks (when a process group is up): every rank returns the same metrics.

    Noise and augmentation are reproducible from (seed, epoch, rank), so a resumed run draws what it would have.
    """
    import torch.distributed as dist

    if world > 1 and hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    # Fresh training noise every batch, drawn on the device; the dataset's augmentation from torch's global generator
    # (the loader's worker processes are seeded from it). Integer tuples hash the same in every process.
    generator = torch.Generator(device=step.device).manual_seed(hash((seed, epoch, rank)) % 2**31)
    torch.manual_seed(hash((seed, epoch, rank, 1)) % 2**31)
    model.train()
    started = time.perf_counter()
    non_blocking = step.device.type == "cuda"  # the loader pins its batches there
    loss_sum, steps, seen = torch.zeros((), dtype=torch.float64, device=step.device), 0, 0
    for batch in loader:
        clean = batch.to(step.device, non_blocking=non_blocking, memory_format=step.memory_format)
        loss = train_step(model, clean, step.optimizer, step.noise, generator, step.amp_dtype, step.scaler,
                          step.max_grad_norm)  # fmt: skip
        step.scheduler.step()
        loss_sum += loss
        steps += 1
        seen += clean.shape[0]
    _synchronize(step.device)
    train_time = time.perf_counter() - started

    model.eval()
    extra = torch.tensor([seen, train_time, steps], dtype=torch.float64, device=step.device)
    sums = torch.cat([evaluate_batches(model, val_pairs), extra, loss_sum.reshape(1)])
    if dist.is_available() and dist.is_initialized():  # also at world size 1: a CPU tensor here fails under NCCL
        dist.all_reduce(sums)  # sums of metrics and counts; train_time summed, divided by world below
    mse_sum, psnr_sum, ssim_sum, count, images, time_sum, steps_sum, loss_total = sums.tolist()
    scores = summarize(mse_sum, psnr_sum, ssim_sum, int(count))
    return {
        "epoch": epoch,
        "train_loss": loss_total / max(1.0, steps_sum),
        "val_mse": scores["mse"],
        "val_psnr": scores["psnr"],
        "val_psnr_pooled": scores["psnr_pooled"],
        "val_ssim": scores["ssim"],
        "images_per_s": images / max(1e-9, time_sum / world),
        "epoch_time_s": time.perf_counter() - started,
        "lr": step.scheduler.get_last_lr()[0],
    }
