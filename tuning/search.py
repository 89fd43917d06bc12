"""Search architecture, width, epochs and learning rate with Ray Tune, each trial a Ray Train run of the platform.

Tune-over-Train as Ray 2.60 does it: the Tuner runs a function trainable (`_trial`) that calls `train.fit`, whose
TorchTrainer reports every epoch to Tune through `TuneReportCallback`, so ASHA can stop a hopeless trial between
epochs. The trial's driver reserves a custom `TRAIN_DRIVER` resource instead of a CPU that a worker needs.
MLflow gets one parent run per sweep and one nested run per trial; only the best trial's model is registered, and
it becomes champion only if it beats the current one on the fixed evaluation set.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mri_platform.cluster import DRIVER_RESOURCE, init_ray
from mri_platform.config import TrainConfig, build_config, read_preset, state_dir
from mri_platform.models import NAMED, ModelConfig

if TYPE_CHECKING:
    from mri_platform.data import SliceSet

PRESET_DIR = Path(__file__).parent / "presets"
METRIC = "val_psnr"
SWEEP_TAG = "sweep_name"


@dataclass
class SearchConfig:
    """One hyperparameter search."""

    models: list[str] = field(default_factory=lambda: ["unet", "dncnn", "ae1"])
    """Models of the zoo to choose from (see `mri_platform.models`)."""
    filters: list[int] | None = None
    """Widths to choose from for every model; None: each model's default width x 0.5, 1 and 1.5 (the U-Net's
    default is 16, DnCNN's and AE1's 64, AE2's 256)."""
    epochs: tuple[int, int] = (50, 70)
    """Inclusive range of epochs to draw from (the report trained 50 and 70)."""
    lr: tuple[float, float] = (3e-4, 3e-3)
    """Log-uniform range of the Adam learning rate."""
    samples: int = 8
    """Trials to run."""
    workers_per_trial: int = 2
    """Ray Train workers in each trial."""
    gpus_per_worker: float = 0.0
    """GPUs per worker; 0 trains on CPUs. A fraction packs several one-worker trials on a GPU; with several workers
    per trial it is refused (two NCCL ranks on one GPU fail)."""
    max_concurrent: int | None = None
    """Trials at once; None fits as many as the cluster's CPUs (or GPUs) hold."""
    scheduler: str = "asha"
    """'asha' (early stopping on validation PSNR) or 'fifo' (run every trial to the end)."""
    grace_period: int = 5
    """Epochs every trial gets before ASHA may stop it."""
    reduction_factor: int = 3
    """ASHA keeps about 1/reduction_factor of the trials at each rung."""
    search: str = "optuna"
    """'optuna' (TPE, seeded) or 'random'."""
    seed: int = 0
    """Seed of the search algorithm."""
    train_preset: str | None = None
    """Training preset the trials start from (data, noise and batch come from it or the options)."""
    max_failures: int = 1
    """Retries of a failed trial before it is reported as failed."""

    def __post_init__(self) -> None:
        self.models = [str(m).lower() for m in self.models]
        self.filters = [int(f) for f in self.filters] if self.filters else None
        self.epochs = tuple(int(e) for e in self.epochs)
        self.lr = tuple(float(v) for v in self.lr)
        checks = [
            (
                bool(self.models) and set(self.models) <= set(NAMED),
                f"models must be among {sorted(NAMED)}, got {self.models}",
            ),
            (
                self.filters is None or (self.filters and min(self.filters) >= 1),
                f"filters must be positive widths, got {self.filters}",
            ),
            (len(self.epochs) == 2 and 1 <= self.epochs[0] <= self.epochs[1], f"bad epoch range {self.epochs}"),
            (len(self.lr) == 2 and 0 < self.lr[0] <= self.lr[1], f"bad learning-rate range {self.lr}"),
            (self.samples >= 1, f"samples must be >= 1, got {self.samples}"),
            (self.workers_per_trial >= 1, f"workers_per_trial must be >= 1, got {self.workers_per_trial}"),
            (self.gpus_per_worker >= 0, f"gpus_per_worker must be >= 0, got {self.gpus_per_worker}"),
            (
                self.gpus_per_worker == 0 or self.gpus_per_worker >= 1 or self.workers_per_trial == 1,
                f"{self.workers_per_trial} workers per trial with {self.gpus_per_worker:g} GPU each: NCCL cannot run "
                "two ranks of a trial on one GPU; use --gpus-per-worker 1, or one worker per trial to pack trials",
            ),
            (self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent must be >= 1"),
            (self.scheduler in ("asha", "fifo"), f"scheduler must be 'asha' or 'fifo', got {self.scheduler!r}"),
            (self.grace_period >= 1, f"grace_period must be >= 1, got {self.grace_period}"),
            (self.reduction_factor >= 2, f"reduction_factor must be >= 2, got {self.reduction_factor}"),
            (self.search in ("optuna", "random"), f"search must be 'optuna' or 'random', got {self.search!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def candidates(self) -> list[str]:
        """'model:width' choices: one flat categorical, since Optuna cannot sample a width range per model."""
        choices = []
        for model in self.models:
            default = NAMED[model][1]
            widths = self.filters or sorted({max(4, round(default * k)) for k in (0.5, 1.0, 1.5)})
            choices += [f"{model}:{width}" for width in widths]
        return choices

    def space(self) -> dict[str, Any]:
        from ray import tune

        return {
            "model": tune.choice(self.candidates()),
            "epochs": tune.randint(self.epochs[0], self.epochs[1] + 1),
            "lr": tune.loguniform(*self.lr) if self.lr[0] < self.lr[1] else self.lr[0],
        }

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_search_preset(name_or_path: str) -> dict[str, Any]:
    """A search preset ('demo', 'full' or a YAML path) as a mapping of SearchConfig fields."""
    return read_preset(name_or_path, PRESET_DIR, SearchConfig)


def build_search(preset: str | None = None, **overrides: Any) -> SearchConfig:
    values = load_search_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SearchConfig(**values)


def parse_candidate(choice: str) -> tuple[str, int]:
    """'unet:16' -> ('unet', 16)."""
    model, _, width = str(choice).partition(":")
    ModelConfig.named(model, int(width))  # refuses a model or width the zoo cannot build
    return model, int(width)


# ----------------------------------------------------------------------------------------------- one trial
def _trial(space: dict[str, Any], base: dict[str, Any], sweep: dict[str, Any]) -> None:
    """A Tune trial: one Ray Train run of the platform with the sampled width, epochs and learning rate."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mri_platform.train import fit

    os.environ["MRI_PLATFORM_HOME"] = sweep["state_dir"]  # the trial's actor may not share the driver's env
    model, filters = parse_candidate(space["model"])
    # The preset's per-model settings (patches, steps per epoch) for this trial's model, then the sweep's options.
    config = build_config(
        sweep["train_preset"],
        **{
            **base,
            "model": model,
            "filters": filters,
            "epochs": int(space["epochs"]),
            "lr": float(space["lr"]),
            # A deterministic name per trial: a resumed sweep continues the trial's own Train run.
            "run_name": f"{sweep['name']}-{tune.get_context().get_trial_id()}",
            "resume": True,
            "registered_model": "",
        },
    )
    fit(config, callbacks=[TuneReportCallback()], parent_run_id=sweep["parent_run_id"], log_model=False)


# ----------------------------------------------------------------------------------------------- the sweep
def _concurrency(search: SearchConfig, config: TrainConfig, resources: dict[str, float]) -> int:
    """How many trials fit at once; refuses a trial that cannot fit at all (it would wait forever)."""
    cpu_need = search.workers_per_trial * config.cpus_per_worker
    fits = [int(resources.get("CPU", 0) // cpu_need)]
    if search.gpus_per_worker:
        fits.append(int(resources.get("GPU", 0) // (search.workers_per_trial * search.gpus_per_worker)))
    possible = min(fits)
    if config.wait_for_resources and search.max_concurrent and possible >= 1:
        # An autoscaling cluster: trials beyond the nodes up now wait for the ones their demand brings.
        return min(search.max_concurrent, search.samples)
    if possible < 1:
        raise RuntimeError(
            f"one trial needs {cpu_need} CPUs"
            + (f" and {search.workers_per_trial * search.gpus_per_worker:g} GPUs" if search.gpus_per_worker else "")
            + f" but the cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} GPUs: "
            "lower --workers-per-trial or --gpus-per-worker"
        )
    if search.max_concurrent and search.max_concurrent > possible:
        print(f"--max-concurrent {search.max_concurrent} lowered to {possible}: more would wait for resources")
    return min(search.max_concurrent or possible, possible, search.samples)


def _scheduler(search: SearchConfig):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if search.scheduler == "fifo":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="training_iteration",  # one Train report (one epoch) is one Tune iteration
        max_t=search.epochs[1],
        grace_period=min(search.grace_period, search.epochs[1]),
        reduction_factor=search.reduction_factor,
    )


def _search_algorithm(search: SearchConfig, concurrent: int):
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if search.search == "random":
        return BasicVariantGenerator(random_state=search.seed, max_concurrent=concurrent)
    from ray.tune.search.optuna import OptunaSearch

    return ConcurrencyLimiter(OptunaSearch(seed=search.seed), max_concurrent=concurrent)


def run_search(
    search: SearchConfig,
    train_overrides: dict[str, Any] | None = None,
    *,
    name: str | None = None,
    resume: bool = False,
    registered_model: str = "mri-denoiser",
    gate_slices: SliceSet | None = None,
) -> dict[str, Any]:
    """Run (or resume) a sweep; returns the summary that `--json` writes.

    The best trial's model is registered and promoted if it beats the champion on `gate_slices`: pass the slices
    the champion was promoted on, so that both are scored on the same images (the demo passes the 64 x 64
    held-out slices it promoted its trained models on). None: the held-out split at the trials' own size."""
    from ray import tune

    from mri_platform import tracking
    from mri_platform.storage import resolve_storage

    overrides = dict(train_overrides or {})
    overrides["workers"] = search.workers_per_trial
    if search.gpus_per_worker:
        overrides.update(gpu=True, gpus_per_worker=search.gpus_per_worker)
    base = build_config(search.train_preset, **overrides)
    if resume and not name:
        raise ValueError("--resume needs --name of the sweep to continue")
    name = name or f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    # Waits for one trial's workers (and its driver's slot on the head); an autoscaler is asked for the workers of
    # --max-concurrent trials. Each worker is its own bundle: no node has a trial's GPUs and the head's slot at once.
    per_worker = {"CPU": base.cpus_per_worker, "GPU": search.gpus_per_worker}
    resources = init_ray(per_worker, workers=search.workers_per_trial, wait_s=base.wait_for_resources,
                         what="one trial", once={DRIVER_RESOURCE: 1},
                         ask_workers=search.workers_per_trial * (search.max_concurrent or 1))  # fmt: skip
    concurrent = _concurrency(search, base, resources)

    uri = tracking.resolve_tracking_uri(base.tracking_uri)
    parent_run_id = tracking.open_sweep_run(uri, base.experiment, name, search, resume=resume)
    storage_path, filesystem = resolve_storage(base.storage)
    base_dict = {**overrides, "noise": base.noise.to_dict(), "tracking_uri": uri}
    sweep = {"name": name, "parent_run_id": parent_run_id, "state_dir": str(state_dir()),
             "train_preset": search.train_preset}  # fmt: skip
    trainable = tune.with_resources(tune.with_parameters(_trial, base=base_dict, sweep=sweep), {DRIVER_RESOURCE: 1})
    print(
        f"sweep {name}: {search.samples} trials, {concurrent} at once, {search.workers_per_trial} worker(s) each, "
        f"scheduler {search.scheduler}; MLflow parent run {parent_run_id}",
        flush=True,
    )
    started = time.perf_counter()
    sweep_path = f"{storage_path.rstrip('/')}/{name}"
    if resume and tune.Tuner.can_restore(sweep_path, storage_filesystem=filesystem):
        tuner = tune.Tuner.restore(
            sweep_path, trainable, resume_unfinished=True, resume_errored=True, storage_filesystem=filesystem
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=search.space(),
            tune_config=tune.TuneConfig(
                metric=METRIC,
                mode="max",
                scheduler=_scheduler(search),
                search_alg=_search_algorithm(search, concurrent),
                num_samples=search.samples,  # the search algorithm holds the concurrency (`_search_algorithm`)
            ),
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage_path,
                storage_filesystem=filesystem,
                failure_config=tune.FailureConfig(max_failures=search.max_failures),
                verbose=0,
            ),
        )
    grid = tuner.fit()
    elapsed = time.perf_counter() - started
    trials = [_trial_summary(result, name) for result in grid]
    tracking.tag_trials(uri, base.experiment, name, trials)
    summary = _finish(grid, trials, search, base, uri, parent_run_id, registered_model, filesystem, gate_slices)
    summary.update(name=name, elapsed_s=elapsed, max_concurrent=concurrent)
    tracking.close_sweep_run(uri, parent_run_id, summary)
    return summary


def _trial_summary(result, sweep_name: str) -> dict[str, Any]:
    """One row of the trials table from a Tune result."""
    history = result.metrics_dataframe
    config = result.config or {}
    epochs_run = 0 if history is None or METRIC not in history else int(history[METRIC].notna().sum())
    best = history.loc[history[METRIC].idxmax()] if epochs_run else None
    failed = result.error is not None
    wanted = int(config.get("epochs", 0))
    trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name
    return {
        "trial_id": trial_id,
        "run_name": f"{sweep_name}-{trial_id}",  # the trial's Train run and MLflow run name (see _trial)
        "model": str(config.get("model", "")).partition(":")[0] or None,
        "filters": int(str(config["model"]).partition(":")[2]) if config.get("model") else None,
        "epochs": wanted,
        "lr": config.get("lr"),
        "psnr": float(best[METRIC]) if best is not None else math.nan,
        "ssim": float(best["val_ssim"]) if best is not None else math.nan,
        "best_epoch": int(best["epoch"]) if best is not None else None,
        "checkpoint_path": best.get("checkpoint_path") if best is not None else None,
        "epochs_run": epochs_run,
        "stopped_early": not failed and epochs_run < wanted,
        "error": str(result.error).splitlines()[0][:300] if failed else None,
        "time_s": float(history["time_total_s"].iloc[-1]) if epochs_run and "time_total_s" in history else None,
        # Tune-over-Train overhead: the first report includes starting the trial's Train run
        "first_epoch_s": float(history["time_total_s"].iloc[0]) if epochs_run else None,
        "epoch_s": float(history["epoch_time_s"].iloc[1:].median()) if epochs_run > 1 else None,
    }


def _finish(grid, trials, search, base, uri, parent_run_id, registered_model, filesystem,
            gate_slices: SliceSet | None) -> dict[str, Any]:  # fmt: skip
    """Register the best trial's model and promote it if it beats the champion on `gate_slices` (see `run_search`)."""
    import ray.train

    from mri_platform import tracking
    from mri_platform.checkpoints import FILENAME, load_checkpoint
    from mri_platform.evaluate import promote, score_model
    from mri_platform.train import held_out_set

    scored = [t for t in trials if not math.isnan(t["psnr"]) and t["checkpoint_path"]]
    summary: dict[str, Any] = {
        "parent_run_id": parent_run_id,
        "n_trials": len(trials),
        "n_stopped_early": sum(t["stopped_early"] for t in trials),
        "n_failed": sum(t["error"] is not None for t in trials),
        "trials": trials,
        "search": search.to_dict(),
        "best_config": None,
        "best_psnr": None,
        "registered_version": None,
        "champion_version": None,
        "promotion": None,
    }
    if not scored:
        return summary
    best = max(scored, key=lambda t: t["psnr"])
    local = Path(state_dir()) / "models" / f"{best['trial_id']}-best"
    ray.train.Checkpoint(best["checkpoint_path"], filesystem=filesystem).to_directory(str(local))
    model, meta = load_checkpoint(local / FILENAME)
    config = TrainConfig(**{**meta["train"], "noise": meta["noise"], "registered_model": registered_model})
    held_out = held_out_set(config)
    scores = score_model(model, held_out, config.noise, seed=config.eval_seed)
    best_run = meta["mlflow_run_id"]
    _, version = tracking.log_model(uri, best_run, model, local / FILENAME, scores, config)
    gate = held_out if gate_slices is None else gate_slices
    outcome = promote(registered_model, [version], gate, seed=config.eval_seed, tracking_uri=uri)
    summary.update(
        best_config={"model": best["model"], "filters": best["filters"], "epochs": best["epochs"], "lr": best["lr"]},
        best_psnr=best["psnr"],
        best_trial=best["trial_id"],
        best_run_id=best_run,
        best_scores=scores,
        registered_version=version,
        champion_version=outcome["champion"],
        promotion=outcome,
    )
    return summary


def print_table(summary: dict[str, Any]) -> None:
    header = ("trial", "model", "filters", "epochs", "lr", "PSNR dB", "SSIM", "run", "stopped", "time s")
    print("\n{:>14s} {:>6s} {:>7s} {:>6s} {:>8s} {:>8s} {:>6s} {:>5s} {:>8s} {:>7s}".format(*header))
    for t in sorted(summary["trials"], key=lambda t: -t["psnr"] if not math.isnan(t["psnr"]) else math.inf):
        stopped = "failed" if t["error"] else ("early" if t["stopped_early"] else "")
        print(
            f"{t['trial_id'][-14:]:>14s} {t['model']!s:>6s} {t['filters']!s:>7s} {t['epochs']:6d} {t['lr'] or 0:8.2e} "
            f"{t['psnr']:8.2f} {t['ssim']:6.3f} {t['epochs_run']:5d} {stopped:>8s} {t['time_s'] or 0:7.0f}"
        )
    print(
        f"\n{summary['n_trials']} trials, {summary['n_stopped_early']} stopped early, {summary['n_failed']} failed; "
        f"best {summary['best_config']} at {summary['best_psnr'] or float('nan'):.2f} dB"
    )
    if summary["promotion"]:
        print(f"registered version {summary['registered_version']}: {summary['promotion']['reason']}")
        print(f"champion: models:/{summary['promotion']['name']}@champion -> version {summary['champion_version']}")
