"""MLflow tracking and registry: runs, per-epoch metrics, logged models, and the `champion` alias.

The embedded default is a sqlite store in the state folder, so nothing has to be started; any tracking server is
used through `--tracking-uri` or $MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mri_platform.config import state_dir

if TYPE_CHECKING:
    import torch

    from mri_platform.config import TrainConfig

CHAMPION = "champion"
LOGGED_CHECKPOINT = "checkpoint"
"""The checkpoint's name among a logged model's artifacts (`logged_model.py` loads it by that name)."""
RUN_NAME_TAG = "ray_run_name"
EPOCH_METRICS = (
    "train_loss",
    "val_mse",
    "val_psnr",
    "val_psnr_pooled",
    "val_ssim",
    "images_per_s",
    "epoch_time_s",
    "lr",
)


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else $MLFLOW_TRACKING_URI, else the embedded sqlite store in the state folder.

    A server that is this machine's stack asks for a login: unless the environment names a user, its
    credentials are put into the environment here, where MLflow's client and Ray's workers find them.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if uri.startswith("http") and "MLFLOW_TRACKING_USERNAME" not in os.environ:
            from mri_platform.credentials import local_mlflow_env

            os.environ.update(local_mlflow_env(uri))
        return uri
    folder = state_dir()
    folder.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{folder / 'mlflow.db'}"


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """Get or create the experiment; with the embedded store, artifacts go to the state folder, not the cwd."""
    mlflow_client = client(uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = (state_dir() / "artifacts").as_uri() if uri.startswith("sqlite:") else None
    return mlflow_client.create_experiment(name, artifact_location=location)


def _params(config: TrainConfig, describe: dict[str, Any], n_params: int) -> dict[str, Any]:
    data = describe["data"]
    return {
        "model": config.model,
        "architecture": config.model_config.architecture,
        "filters": config.model_config.filters,
        "depth": config.model_config.depth,
        "epochs": config.num_epochs,
        "steps_per_epoch": config.steps_per_epoch or "one pass",
        "schedule": config.lr_schedule,
        "grad_clip": config.max_grad_norm or "none",
        "batch_size": config.batch_size,
        "lr": config.lr,
        "noise_kind": config.noise.kind,
        "noise_variance": config.noise.variance,
        "noise_std": round(config.noise.std, 6),
        "noise_clip": config.noise.clip,
        "data_source": data["source"],
        "data_fingerprint": data["fingerprint_train"],
        "n_train": data["n_train"],
        "n_val": data["n_val"],
        "image_size": data["size"],
        "patch": data.get("patch") or "whole slices",
        "augment": config.augment,
        "intensity_augment": config.augment_intensity,
        "workers": config.workers,
        "device": "gpu" if config.gpu else "cpu",
        "precision": config.precision,
        "channels_last": config.channels_last,
        "seed": config.seed,
        "eval_seed": config.eval_seed,
        "num_parameters": n_params,
    }


def open_training_run(
    uri: str,
    config: TrainConfig,
    run_name: str,
    describe: dict[str, Any],
    n_params: int,
    parent_run_id: str | None = None,
) -> str:
    """Create the run (or, when resuming, find the run of that Ray run name) and log its parameters."""
    from mlflow.entities import Param

    mlflow_client = client(uri)
    exp_id = experiment_id(uri, config.experiment)
    if config.resume:
        runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.{RUN_NAME_TAG} = '{run_name}'")
        if runs:
            mlflow_client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    tags = {RUN_NAME_TAG: run_name, "model_kind": config.model, "noise": config.noise.describe()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # shows as a nested run under the sweep in the MLflow UI
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=tags)
    params = [Param(k, str(v)) for k, v in _params(config, describe, n_params).items()]
    mlflow_client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


class EpochLogger:
    """Logs per-epoch metrics of a Ray Train run into an existing MLflow run (see `recovery.EpochRecorder`)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client, self.run_id = client(uri), run_id

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(metrics.get("ended_ms") or time.time() * 1000)  # the epoch's own: a repeated try is idempotent
        values = [Metric(k, float(metrics[k]), now, step) for k in EPOCH_METRICS if k in metrics]
        self.client.log_batch(self.run_id, metrics=values)

    def logged_steps(self) -> set[int]:
        """The epochs that already have their points (every epoch logs `train_loss`)."""
        return {m.step for m in self.client.get_metric_history(self.run_id, "train_loss")}


def epoch_history(uri: str, run_id: str) -> list[dict[str, float]]:
    """Per-epoch metrics of a run as one dict per epoch, in epoch order."""
    mlflow_client = client(uri)
    by_step: dict[int, dict[str, float]] = {}
    for key in EPOCH_METRICS:
        for metric in mlflow_client.get_metric_history(run_id, key):
            by_step.setdefault(metric.step, {"epoch": metric.step})[key] = metric.value
    return [by_step[step] for step in sorted(by_step)]


def end_run(uri: str, run_id: str, failed: bool = False) -> None:
    client(uri).set_terminated(run_id, status="FAILED" if failed else "FINISHED")


def log_results(uri: str, run_id: str, scores: dict[str, float], figure: Path, best_epoch: int) -> None:
    """The final held-out scores (as final_*) and the original / noisy / restored figure."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    values = [Metric(f"final_{k}", float(v), now, 0) for k, v in scores.items()] + [
        Metric("best_epoch", float(best_epoch), now, 0)
    ]
    mlflow_client = client(uri)
    mlflow_client.log_batch(run_id, metrics=values)
    mlflow_client.log_artifact(run_id, str(figure), artifact_path="figures")


def log_model(
    uri: str,
    run_id: str,
    model: torch.nn.Module,
    checkpoint: Path,
    scores: dict[str, float],
    config: TrainConfig,
) -> tuple[str, str | None]:
    """Log the model to the run and register it; returns (model_uri, version).

    Logged as a pyfunc model from code (`logged_model.py`) around the weights-only checkpoint, not as a pickled
    module: loading it (`mlflow.pyfunc.load_model`, `build`, `evaluate`) never unpickles anything.
    """
    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    import mri_platform

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    from mlflow.types import Schema, TensorSpec

    from mri_platform.checkpoints import applies_natively, read_checkpoint

    example = np.zeros((2, 1, 64, 64), dtype=np.float32)  # batch 2: a batch of 1 would freeze the batch dimension
    with torch.inference_mode():
        signature = infer_signature(example, model(torch.from_numpy(example)).numpy())
    if applies_natively(read_checkpoint(checkpoint)):  # any H x W: say so rather than the example's 64 x 64
        spec = Schema([TensorSpec(np.dtype(np.float32), (-1, 1, -1, -1))])
        signature = mlflow.models.ModelSignature(inputs=spec, outputs=spec)
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(Path(mri_platform.__file__).parent / "logged_model.py"),  # its source, not a pickle
            artifacts={LOGGED_CHECKPOINT: str(checkpoint)},
            code_paths=[str(Path(mri_platform.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"],
            registered_model_name=config.registered_model or None,
        )
    version = info.registered_model_version
    if version is not None:
        version = str(version)
        _describe_version(uri, config, version, scores, run_id)
    return info.model_uri, version


def _scored_on(config: TrainConfig) -> str:
    """What the run's held-out PSNR / SSIM were measured on (the noise is the model's own, tagged beside it): a native
    run's own figure is at each slice's own size, `make demo`'s table and gate score at 64 x 64, and the two differ."""
    size = "each slice's own size" if config.size == "native" else f"{config.size} x {config.size}"
    source = "the built-in data" if config.data in (None, "builtin") else config.data
    return f"held-out split of {source} at {size}"


def _describe_version(uri: str, config: TrainConfig, version: str, scores: dict[str, float], run_id: str) -> None:
    mlflow_client = client(uri)
    tags = {
        "model_kind": config.model,
        "architecture": config.model_config.architecture,
        "filters": config.model_config.filters,
        "image_size": config.size,
        "patch": config.patch or "whole slices",
        "noise": config.noise.describe(),
        "noise_kind": config.noise.kind,
        "noise_variance": config.noise.variance,
        "noise_clip": config.noise.clip,
        "data_source": config.data,
        "psnr": f"{scores['psnr']:.3f}",
        "ssim": f"{scores['ssim']:.4f}",
        "scored_on": _scored_on(config),
        "run_id": run_id,
    }
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(config.registered_model, version, key, str(value))
    mlflow_client.update_model_version(
        config.registered_model,
        version,
        description=f"{config.model.upper()} ({config.model_config.architecture}, {config.model_config.filters} "
        f"filters), trained against {config.noise.describe()}; held-out PSNR {scores['psnr']:.2f} dB, "
        f"SSIM {scores['ssim']:.3f}",
    )


def open_sweep_run(uri: str, experiment: str, name: str, search: Any, resume: bool = False) -> str:
    """The parent run of a Tune sweep (found again by name when resuming), with the search space and budget."""
    from mlflow.entities import Param

    mlflow_client = client(uri)
    exp_id = experiment_id(uri, experiment)
    if resume:
        runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.sweep_name = '{name}'")
        if runs:
            mlflow_client.update_run(runs[0].info.run_id, status="RUNNING")
            return runs[0].info.run_id
    run = mlflow_client.create_run(exp_id, run_name=name, tags={"sweep_name": name, "kind": "sweep"})
    params = [Param(k, str(v)) for k, v in search.to_dict().items()]
    params.append(Param("candidates", ",".join(search.candidates())))  # the model:width choices actually searched
    mlflow_client.log_batch(run.info.run_id, params=params)
    return run.info.run_id


def tag_trials(uri: str, experiment: str, sweep_name: str, trials: list[dict[str, Any]]) -> None:
    """Record each trial's stop reason on its nested run, and close runs that Tune stopped or that failed."""
    mlflow_client = client(uri)
    exp_id = experiment_id(uri, experiment)
    for trial in trials:
        runs = mlflow_client.search_runs([exp_id], filter_string=f"tags.{RUN_NAME_TAG} = '{trial['run_name']}'")
        if not runs:
            continue
        run = runs[0]
        trial["run_id"] = run.info.run_id
        if trial["error"]:
            reason, status = f"failed: {trial['error']}", "FAILED"
        elif trial["stopped_early"]:
            reason, status = f"stopped early by the scheduler after epoch {trial['epochs_run']}", "KILLED"
        else:
            reason, status = f"completed {trial['epochs_run']} epochs", "FINISHED"
        mlflow_client.set_tag(run.info.run_id, "stop_reason", reason)
        mlflow_client.set_tag(run.info.run_id, "trial_id", trial["trial_id"])
        if run.info.status == "RUNNING":
            mlflow_client.set_terminated(run.info.run_id, status=status)


def close_sweep_run(uri: str, run_id: str, summary: dict[str, Any]) -> None:
    """Best configuration and sweep totals on the parent run, plus the whole summary as JSON."""
    from mlflow.entities import Metric, Param

    mlflow_client = client(uri)
    now = int(time.time() * 1000)
    totals = {k: summary[k] for k in ("n_trials", "n_stopped_early", "n_failed", "elapsed_s")}
    if summary["best_psnr"] is not None:
        totals["best_psnr"] = summary["best_psnr"]
    params = [Param(f"best_{k}", str(v)) for k, v in (summary["best_config"] or {}).items()]
    existing = mlflow_client.get_run(run_id).data.params
    params = [p for p in params if p.key not in existing]  # params are immutable: a resumed sweep keeps the first
    mlflow_client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in totals.items()], params=params)
    mlflow_client.log_dict(run_id, summary, "sweep.json")
    mlflow_client.set_terminated(run_id, status="FINISHED")


def champion_version(uri: str, name: str) -> str | None:
    """The registry version that holds the champion alias, or None when there is none yet."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client(uri).get_model_version_by_alias(name, CHAMPION).version)
    except MlflowException:
        return None


def set_champion(uri: str, name: str, version: str) -> None:
    client(uri).set_registered_model_alias(name, CHAMPION, str(version))
