"""Data-parallel training on Ray Train.

The step, validation and epoch logic is plain PyTorch in `steps` (and the input pipeline in `pipeline`), so that it
runs without Ray; `train_loop_per_worker` is the only function that knows it runs distributed, and `fit` is the
driver: it loads the data, opens the MLflow run, runs the `TorchTrainer`, then scores, logs and registers the best
checkpoint.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mri_platform import heap
from mri_platform.checkpoints import FILENAME, load_checkpoint, save_checkpoint
from mri_platform.cluster import init_ray
from mri_platform.config import TrainConfig, state_dir
from mri_platform.models import build_model, num_parameters
from mri_platform.noise import corrupted
from mri_platform.pipeline import SliceDataset, make_loader
from mri_platform.steps import (  # noqa: F401 (train_step, evaluate_batches: the plain-PyTorch API, re-exported)
    Step,
    autocast_dtype,
    evaluate_batches,
    grad_scaler,
    lr_schedule,
    prepare_device,
    run_epoch,
    train_step,
)
from mri_platform.storage import prune_unlisted_checkpoints, resolve_storage

if TYPE_CHECKING:
    from mri_platform.data import SliceSet

METRIC = "val_psnr"  # the checkpoint score: best kept by validation PSNR


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

    config = TrainConfig(**cfg["config"])
    _quiet_ray_train_reports()
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(config.cpus_per_worker)
    torch.manual_seed(config.seed)  # identical initial weights on every rank (DDP broadcasts rank 0's anyway)
    device = ray.train.torch.get_device()
    prepare_device(device)
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    amp_dtype = autocast_dtype(config.precision, device)

    model = build_model(config.model_config).to(memory_format=memory_format)
    model = ray.train.torch.prepare_model(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)

    streamed = cfg.get("streamed")
    val_set = ray.get(cfg["val_ref"])
    # The same corruption whatever the world size: drawn for the whole set, then each rank takes its share.
    val_pairs = [
        (clean[rank::world].to(device, memory_format=memory_format),
         noisy[rank::world].to(device, memory_format=memory_format))
        for clean, noisy in corrupted(val_set, config.noise, config.eval_seed)
    ]  # fmt: skip
    steps = config.steps_per_epoch
    if streamed:  # Ray Data: each rank streams its own share of the training rows
        from mri_platform.streaming import ShardLoader

        rows = streamed["n_train"] // world
        loader = ShardLoader(
            ray.train.get_dataset_shard("train"),
            config.worker_batch_size,
            steps or max(1, rows // config.worker_batch_size),
            rows=rows,
            augment=config.augment,
            patch=config.patch,
            intensity=config.augment_intensity,
        )
    else:
        dataset = SliceDataset(
            ray.get(cfg["train_ref"]),  # (N, H, W), or (N,) arrays of their own sizes; the dataset copies
            augment=config.augment,
            patch=config.patch,
            intensity=config.augment_intensity,
            length=steps * config.batch_size if steps else None,
        )
        # Our own sampler and device copy rather than prepare_data_loader: the benchmark feeds the model the same way.
        loader = make_loader(
            dataset,
            config.worker_batch_size,
            rank=rank,
            world=world,
            device=device,
            workers=config.data_workers(device.type),
            drop_last=len(dataset) >= config.batch_size,
        )
    scheduler = lr_schedule(optimizer, config.lr_schedule, config.num_epochs * len(loader))
    step = Step(optimizer, scheduler, config.noise, device, amp_dtype, grad_scaler(amp_dtype, device),
                config.max_grad_norm, memory_format)  # fmt: skip

    start_epoch, history = 1, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # resuming a run, or restarting after a worker was lost
        with checkpoint.as_directory() as folder:
            payload = torch.load(Path(folder) / FILENAME, map_location="cpu", weights_only=True)
        getattr(model, "module", model).load_state_dict(payload["state_dict"])
        optimizer.load_state_dict(payload["optimizer"])
        if "scheduler" in payload:
            scheduler.load_state_dict(payload["scheduler"])
        start_epoch = payload["epoch"] + 1
        history = list(payload.get("history", []))

    # MLflow gets each epoch's metrics from the controller once the epoch is registered (recovery.EpochRecorder):
    # an epoch redone after a failure is then logged once.
    nodes = _worker_nodes(ray.get_runtime_context().get_node_id(), world)
    if rank == 0:  # a tag, not a param: a restarted worker may land elsewhere
        _tag_worker_nodes(cfg["tracking_uri"], cfg["mlflow_run_id"], nodes)
    for epoch in range(start_epoch, config.num_epochs + 1):
        metrics = run_epoch(model, loader, step, val_pairs, seed=config.seed, epoch=epoch, rank=rank, world=world)
        if rank == 0:
            # Straight to the process's stdout: Ray Train patches print() into a logger that echoes it twice.
            sys.__stdout__.write(
                f"epoch {epoch:3d}/{config.num_epochs}  loss {metrics['train_loss']:.5f}  "
                f"val PSNR {metrics['val_psnr']:6.2f} dB  SSIM {metrics['val_ssim']:.3f}  "
                f"{metrics['images_per_s']:6.0f} img/s  {metrics['epoch_time_s']:5.1f} s\n"
            )
            sys.__stdout__.flush()
            # One timestamp per epoch for every try to log it (the controller's, its retries, the driver's fill-in):
            # MLflow keeps one of identical points, so a try whose answer was lost cannot add a second one.
            metrics["ended_ms"] = int(time.time() * 1000)
            history.append(metrics)  # in the checkpoint: the driver fills in what MLflow missed
            with tempfile.TemporaryDirectory() as folder:
                save_checkpoint(
                    Path(folder) / FILENAME,
                    model,
                    optimizer=optimizer.state_dict(),
                    scheduler=scheduler.state_dict(),
                    epoch=epoch,
                    metrics=metrics,
                    history=history,
                    **cfg["describe"],
                )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)


def _tag_worker_nodes(uri: str, run_id: str, nodes: list[str]) -> None:
    """Tag the run with its workers' nodes; an MLflow server that is down costs the tag, not the run."""
    from mri_platform import tracking

    try:
        tracking.client(uri).set_tag(run_id, "worker_nodes", ",".join(nodes))
    except Exception as exc:  # the metrics have their own retrying path (recovery.EpochRecorder)
        sys.__stdout__.write(f"could not tag the run with its workers' nodes ({type(exc).__name__}); going on\n")


def _worker_nodes(node_id: str, world: int) -> list[str]:
    """The Ray node of every rank, in rank order (one all-gather over the run's process group)."""
    import torch.distributed as dist

    if world == 1 or not (dist.is_available() and dist.is_initialized()):
        return [node_id]
    nodes: list[str | None] = [None] * world
    dist.all_gather_object(nodes, node_id)
    return [str(n) for n in nodes]


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


class TrainingFailed(RuntimeError):
    """A run that failed; `kind` is 'storage' or 'worker' when resuming it from its last checkpoint may cure it."""

    def __init__(self, message: str, run_name: str, kind: str | None, reason: str) -> None:
        super().__init__(message)
        self.run_name, self.kind, self.reason = run_name, kind, reason


def held_out_set(config: TrainConfig) -> SliceSet:
    """The held-out slices a run of `config` is scored on: the whole held-out split in memory, or with Ray Data the
    first `streaming.HELD_OUT_SAMPLE` of it (Ray must be up)."""
    if config.ray_data:
        from mri_platform.streaming import prepare_held_out

        return prepare_held_out(config.data, planes=config.planes, size=config.size,
                                test_fraction=config.test_fraction, seed=config.seed)  # fmt: skip
    from mri_platform.data import load_splits

    return load_splits(config.data, planes=config.planes, size=config.size, test_fraction=config.test_fraction,
                       seed=config.seed)[1]  # fmt: skip


def worker_resources(config: TrainConfig) -> dict[str, float]:
    """What one Ray Train worker reserves."""
    return {"CPU": config.cpus_per_worker, **({"GPU": config.gpus_per_worker} if config.gpu else {})}


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

    from mri_platform import recovery, tracking
    from mri_platform.data import load_splits
    from mri_platform.evaluate import score_model
    from mri_platform.figures import comparison_figure

    init_ray(worker_resources(config), workers=config.workers, wait_s=config.wait_for_resources)
    streamed, train_set = None, None
    if config.ray_data:  # read and sliced by Ray Data tasks; the driver keeps references and a held-out sample
        from mri_platform.streaming import prepare

        streamed = prepare(config.data, planes=config.planes, size=config.size, test_fraction=config.test_fraction,
                           seed=config.seed)  # fmt: skip
        val_set = streamed.held_out
        source, n_train, fingerprint = streamed.split.source, streamed.n_train, streamed.split.fingerprint()
        print(f"Ray Data: {n_train} training slices of {len(streamed.split.train)} files, {len(val_set)} held-out "
              f"slices of {len(streamed.split.held_out)} files, from {source}", flush=True)  # fmt: skip
    else:
        train_set, val_set = load_splits(config.data, planes=config.planes, size=config.size,
                                         test_fraction=config.test_fraction, seed=config.seed)  # fmt: skip
        source, n_train, fingerprint = train_set.source, len(train_set), train_set.fingerprint()
        if train_set.skipped:
            print(f"skipped {len(train_set.skipped)} unreadable inputs: " + "; ".join(
                f"{path}: {why}" for path, why in train_set.skipped[:10]), flush=True)  # fmt: skip
    run_name = config.run_name or f"{config.model}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    describe = {
        "noise": config.noise.to_dict(),
        "data": {
            "source": source,
            "loading": "ray-data" if streamed else "memory",
            "fingerprint_train": fingerprint,
            "fingerprint_val": val_set.fingerprint(),
            "n_train": n_train,
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

    storage_path, filesystem = resolve_storage(config.storage)
    if config.resume:
        prune_unlisted_checkpoints(storage_path, filesystem, run_name)
    recorder = recovery.EpochRecorder(uri, run_id, config.max_failures)
    if streamed:
        data_refs = {"streamed": {"n_train": n_train}}
        rows = config.num_epochs * (config.steps_per_epoch * config.batch_size if config.steps_per_epoch else n_train)
        datasets = {"datasets": {"train": streamed.for_run(rows)}}
    else:
        data_refs, datasets = {"train_ref": ray.put(train_set.images)}, {}
        del train_set  # the object store holds it now
    data_refs["val_ref"] = ray.put(val_set)  # every rank validates on all of it, its share by rank
    trainer = TorchTrainer(
        train_loop_per_worker,
        **datasets,
        train_loop_config={
            "config": {**config.to_dict(), "noise": config.noise.to_dict()},
            **data_refs,
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
            callbacks=[recorder, *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # per-epoch lines are ours
            worker_runtime_env={} if config.gpu else {"env_vars": heap.training_worker_env()},
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if config.gpu else "gloo"),
    )
    started = time.perf_counter()
    try:
        result = trainer.fit()
    except Exception as exc:
        tracking.end_run(uri, run_id, failed=True)
        kind = recovery.failure_kind(exc)
        reason = _first_line(exc)
        raise TrainingFailed(
            f"training run {run_name!r} failed ({reason}); its checkpoints are kept under {storage_path}: "
            f"continue it with --resume --run-name {run_name}",
            run_name,
            kind,
            reason,
        ) from exc
    train_time = time.perf_counter() - started
    _fill_in_epochs(uri, run_id, result.checkpoint)

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


def _first_line(exc: BaseException) -> str:
    """The innermost cause's first line: Ray wraps a worker's error in several layers of tracebacks."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    line = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {line[:240]}" if line else type(exc).__name__


def _fill_in_epochs(uri: str, run_id: str, checkpoint) -> None:
    """Log the epochs the controller could not (MLflow away until the run ended), from the last checkpoint's history."""
    from mri_platform import recovery, tracking

    if checkpoint is None:
        return
    with checkpoint.as_directory() as folder:
        history = torch.load(Path(folder) / FILENAME, map_location="cpu", weights_only=True).get("history", [])
    logger = tracking.EpochLogger(uri, run_id)
    for metrics in recovery.missing_epochs(uri, run_id, history):
        logger.log(metrics, step=int(metrics["epoch"]))


def _mean_throughput(history: list[dict[str, float]]) -> float:
    rates = [h["images_per_s"] for h in history if "images_per_s" in h]
    rates = rates[1:] if len(rates) > 1 else rates  # epoch 1 includes the warm-up
    return float(np.mean(rates)) if rates else 0.0
