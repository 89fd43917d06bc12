"""Data-parallel training on Ray Train.

`train_step` and `evaluate_batches` are plain PyTorch; `train_loop_per_worker` is the only function that knows it
runs distributed, and `fit` is the driver: it loads the data, opens the MLflow run, runs the `TorchTrainer`, then
scores, logs and registers the best checkpoint.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mri_platform.checkpoints import FILENAME, load_checkpoint, save_checkpoint
from mri_platform.config import TrainConfig, state_dir
from mri_platform.metrics import mse_per_image, psnr_per_image, ssim_per_image, summarize
from mri_platform.models import build_model, num_parameters
from mri_platform.noise import NoiseConfig, add_noise, corrupted

METRIC = "val_psnr"  # the checkpoint score: best kept by validation PSNR


# ----------------------------------------------------------------------------------------------- plain PyTorch
def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision setting on a device, or None for plain fp32."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
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


def train_step(
    model: torch.nn.Module,
    clean: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    noise: NoiseConfig,
    generator: torch.Generator | None,
    amp_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None = None,
    max_grad_norm: float | None = None,
) -> float:
    """One optimisation step on a batch of clean slices (N, 1, H, W), with fresh noise drawn for it; the gradient's
    norm clipped to `max_grad_norm` when given."""
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
    return loss.item()


@torch.inference_mode()
def evaluate_batches(
    model: torch.nn.Module, pairs: list[tuple[torch.Tensor, torch.Tensor]], batch_size: int = 64
) -> tuple[float, float, float, int]:
    """Sums of per-image MSE, PSNR and SSIM of the model's restorations (fp32), for all-reducing across ranks.

    `pairs` holds (clean, noisy) batches (n, 1, H, W), one per slice shape.
    """
    sums, count = torch.zeros(3, dtype=torch.float64), 0
    for clean, noisy in pairs:
        for start in range(0, len(clean), batch_size):
            target, inputs = clean[start : start + batch_size], noisy[start : start + batch_size]
            restored = model(inputs).float()
            sums += torch.stack(
                [
                    mse_per_image(restored, target).sum().double(),
                    psnr_per_image(restored, target).sum(),
                    ssim_per_image(restored, target).sum(),
                ]
            ).cpu()
        count += len(clean)
    return sums[0].item(), sums[1].item(), sums[2].item(), count


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


# ----------------------------------------------------------------------------------------------- Ray worker
def _quiet_ray_train_reports() -> None:
    """Ray 2.60 logs every report (all metrics, every rank) at INFO under a logger named by its file path, which
    LoggingConfig(log_level) does not filter; our per-epoch line says the same in one row."""
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray version: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(cfg: dict[str, Any]) -> None:
    """Runs on every Ray Train worker: DDP training, per-epoch validation, checkpoints and MLflow epoch metrics."""
    import ray
    import ray.train
    import ray.train.torch
    import torch.distributed as dist

    from mri_platform.data import SliceDataset
    from mri_platform.tracking import EpochLogger

    config = TrainConfig(**cfg["config"])
    _quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    device = ray.train.torch.get_device()
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    amp_dtype = autocast_dtype(config.precision, device)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    model = build_model(config.model_config).to(memory_format=memory_format)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    train_images = ray.get(cfg["train_ref"])  # (N, H, W), or (N,) arrays of their own sizes; the dataset copies
    # The same corruption whatever the world size: drawn for the whole set, then each rank takes its share.
    val_pairs = [
        (clean[rank::world].to(device, memory_format=memory_format),
         noisy[rank::world].to(device, memory_format=memory_format))
        for clean, noisy in corrupted(ray.get(cfg["val_ref"]), config.noise, config.eval_seed)
    ]  # fmt: skip
    steps = config.steps_per_epoch
    dataset = SliceDataset(
        train_images,
        augment=config.augment,
        patch=config.patch,
        intensity=config.augment_intensity,
        length=steps * config.batch_size if steps else None,
    )
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=config.worker_batch_size,
        shuffle=True,
        drop_last=len(dataset) >= config.batch_size,
    )
    loader = ray.train.torch.prepare_data_loader(loader)
    scheduler = lr_schedule(optimizer, config.lr_schedule, config.num_epochs * len(loader))

    start_epoch = 1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resuming a run, or restarting after a worker was lost
        with checkpoint.as_directory() as folder:
            payload = torch.load(Path(folder) / FILENAME, map_location="cpu", weights_only=True)
        getattr(model, "module", model).load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        if "scheduler" in payload:
            scheduler.load_state_dict(payload["scheduler"])
        start_epoch = payload["epoch"] + 1

    logger = EpochLogger(cfg["tracking_uri"], cfg["mlflow_run_id"]) if rank == 0 else None
    for epoch in range(start_epoch, config.num_epochs + 1):
        if world > 1:
            loader.sampler.set_epoch(epoch)
        # Fresh noise every batch, reproducible from (seed, epoch, rank) so a resumed run draws what it would have.
        generator = torch.Generator(device=device).manual_seed(hash((config.seed, epoch, rank)) % 2**31)
        torch.manual_seed(hash((config.seed, epoch, rank, "augment")) % 2**31)  # the dataset's augmentation
        model.train()
        started, losses, seen = time.perf_counter(), [], 0
        for clean in loader:
            clean = clean.to(memory_format=memory_format)
            losses.append(
                train_step(model, clean, optimizer, config.noise, generator, amp_dtype, scaler, config.max_grad_norm)
            )
            scheduler.step()
            seen += clean.shape[0]
        train_time = time.perf_counter() - started

        model.eval()
        sums = torch.tensor([*evaluate_batches(model, val_pairs), seen, train_time], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)  # sums of metrics and counts; train_time summed, divided by world below
        mse_sum, psnr_sum, ssim_sum, count, images, time_sum = sums.tolist()
        scores = summarize(mse_sum, psnr_sum, ssim_sum, int(count))
        metrics = {
            "epoch": epoch,
            "train_loss": float(np.mean(losses)),
            "val_mse": scores["mse"],
            "val_psnr": scores["psnr"],
            "val_psnr_pooled": scores["psnr_pooled"],
            "val_ssim": scores["ssim"],
            "images_per_s": images / (time_sum / world),
            "epoch_time_s": time.perf_counter() - started,
            "lr": scheduler.get_last_lr()[0],
        }
        if rank == 0:
            # Straight to the process's stdout: Ray Train patches print() into a logger that echoes it twice.
            sys.__stdout__.write(
                f"epoch {epoch:3d}/{config.num_epochs}  loss {metrics['train_loss']:.5f}  "
                f"val PSNR {metrics['val_psnr']:6.2f} dB  SSIM {metrics['val_ssim']:.3f}  "
                f"{metrics['images_per_s']:6.0f} img/s  {metrics['epoch_time_s']:5.1f} s\n"
            )
            sys.__stdout__.flush()
            logger.log(metrics, step=epoch)
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(
                    Path(folder) / FILENAME,
                    model,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    epoch=epoch,
                    metrics=metrics,
                    **cfg["describe"],
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


# ----------------------------------------------------------------------------------------------- driver
@dataclass
class TrainResult:
    run_id: str
    run_name: str
    model_uri: str | None
    registered_version: str | None
    metrics: dict[str, float]
    checkpoint_path: str
    figure_path: str
    history: list[dict[str, float]] = field(default_factory=list)
    train_time_s: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "run_name": self.run_name,
            "model_uri": self.model_uri,
            "registered_version": self.registered_version,
            "checkpoint_path": self.checkpoint_path,
            "figure_path": self.figure_path,
            "train_time_s": self.train_time_s,
            **self.metrics,
        }


def resolve_storage(storage: str | None) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig; s3:// honours $AWS_ENDPOINT_URL for any S3 server."""
    if not storage:
        return str(state_dir() / "ray_results"), None
    if not storage.startswith("s3://"):
        return str(Path(storage).resolve()), None
    import pyarrow.fs

    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {"region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1")}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    return storage.removeprefix("s3://").rstrip("/"), pyarrow.fs.S3FileSystem(**kwargs)


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker reserves."""
    return {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.gpu else {})}


def _init_ray(config: TrainConfig) -> None:
    import ray

    if not ray.is_initialized():
        # RAY_ADDRESS (set by `ray job submit`) joins that cluster; otherwise a local one starts in-process.
        ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    available = ray.cluster_resources()
    need_cpu = config.workers * config.cpus_per_worker
    if not config.gpu and available.get("CPU", 0) < need_cpu:
        raise RuntimeError(
            f"{config.workers} workers x {config.cpus_per_worker} CPU need {need_cpu} CPUs, but the Ray cluster has "
            f"{available.get('CPU', 0):g}: lower --workers or add nodes"
        )
    need_gpu = config.workers * config.gpus_per_worker
    if config.gpu and available.get("GPU", 0) < need_gpu:
        raise RuntimeError(
            f"--gpu with {config.workers} workers needs {need_gpu:g} GPUs, but the Ray cluster has "
            f"{available.get('GPU', 0):g}; run without --gpu on CPU machines"
        )


def fit(
    config: TrainConfig,
    *,
    callbacks: list | None = None,
    parent_run_id: str | None = None,
    log_model: bool = True,
) -> TrainResult:
    """Train one model with Ray Train, then score its best checkpoint and log it to MLflow.

    With `log_model` the model is logged and registered (unless `config.registered_model` is empty); a Tune trial
    passes False and its parent run, and the sweep logs only the best trial's model.
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from mri_platform import tracking
    from mri_platform.data import load_splits
    from mri_platform.evaluate import score_model
    from mri_platform.figures import comparison_figure

    train_set, val_set = load_splits(config.data, planes=config.planes, size=config.size,
                                     test_fraction=config.test_fraction, seed=config.seed)  # fmt: skip
    if train_set.skipped:
        print(f"skipped {len(train_set.skipped)} unreadable inputs: " + "; ".join(
            f"{path}: {why}" for path, why in train_set.skipped[:10]), flush=True)  # fmt: skip
    run_name = config.run_name or f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    describe = {
        "noise": config.noise.to_dict(),
        "data": {
            "source": train_set.source,
            "fingerprint_train": train_set.fingerprint(),
            "fingerprint_val": val_set.fingerprint(),
            "n_train": len(train_set),
            "n_val": len(val_set),
            "size": config.size,
            "patch": config.patch,
        },
        "train": {k: v for k, v in config.to_dict().items() if k not in ("noise", "tracking_uri")},
        "run_name": run_name,
    }
    uri = tracking.resolve_tracking_uri(config.tracking_uri)
    n_params = num_parameters(build_model(config.model_config))
    run_id = tracking.open_training_run(uri, config, run_name, describe, n_params, parent_run_id)
    print(f"MLflow run {run_id} in experiment {config.experiment!r} at {uri}", flush=True)

    _init_ray(config)
    storage_path, filesystem = resolve_storage(config.storage)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": {**config.to_dict(), "noise": config.noise.to_dict()},
            "train_ref": ray.put(train_set.images),
            "val_ref": ray.put(val_set),
            "tracking_uri": uri,
            "mlflow_run_id": run_id,
            "describe": {**describe, "mlflow_run_id": run_id},
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.gpu,
            resources_per_worker=worker_resources(config),
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=METRIC, checkpoint_score_order="max"
            ),
            # controller_failure_limit: give up after ~10 one-minute waits for workers that never start, instead of
            # waiting forever (an autoscaler has that long to add nodes).
            failure_config=ray.train.FailureConfig(max_failures=config.max_failures, controller_failure_limit=10),
            callbacks=callbacks,
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # per-epoch lines are ours
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if config.gpu else "gloo"),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:
        tracking.end_run(uri, run_id, failed=True)
        raise RuntimeError(
            f"training run {run_name!r} failed ({exc}); its checkpoints are kept under {storage_path}: "
            f"continue it with --resume --run-name {run_name}"
        ) from exc
    train_time = time.perf_counter() - started

    best = result.get_best_checkpoint(metric=METRIC, mode="max") or result.checkpoint
    local_dir = state_dir() / "models" / run_name  # the best checkpoint and its figure, beside the MLflow copy
    local_dir.mkdir(parents=True, exist_ok=True)
    best.to_directory(str(local_dir))
    model, meta = load_checkpoint(local_dir / FILENAME)
    scores = score_model(model, val_set, config.noise, seed=config.eval_seed)
    figure = comparison_figure(model, val_set, config.noise, seed=config.eval_seed, path=local_dir / "comparison.png")
    history = tracking.epoch_history(uri, run_id)
    tracking.log_results(uri, run_id, scores, figure, best_epoch=int(meta["epoch"]))
    model_uri, version = None, None
    if log_model:
        model_uri, version = tracking.log_model(uri, run_id, model, local_dir / FILENAME, scores, config)
    tracking.end_run(uri, run_id)
    return TrainResult(
        run_id=run_id,
        run_name=run_name,
        model_uri=model_uri,
        registered_version=version,
        metrics={**scores, "best_epoch": int(meta["epoch"]), "images_per_s": _mean_throughput(history)},
        checkpoint_path=str(local_dir / FILENAME),
        figure_path=str(figure),
        history=history,
        train_time_s=train_time,
    )


def _mean_throughput(history: list[dict[str, float]]) -> float:
    rates = [h["images_per_s"] for h in history if "images_per_s" in h]
    rates = rates[1:] if len(rates) > 1 else rates  # epoch 1 includes the warm-up
    return float(np.mean(rates)) if rates else 0.0
