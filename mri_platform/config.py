"""Typed configuration for training runs, and the preset files that fill it.

The CLI is a thin layer that builds a `TrainConfig`; presets (`presets/*.yaml`) are plain mappings of the same
fields, so a preset is checked by the same validation as a command line.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from mri_platform.models import NAMED, PRESET_FILTERS, ModelConfig
from mri_platform.noise import NoiseConfig

PRESET_DIR = Path(__file__).parent / "presets"
REPORT_EPOCHS = {"ae1": 50, "ae2": 70}
"""The report trained AE1 for 50 and AE2 for 70 epochs; models without a report recipe default to 50."""
SCHEDULES = ("constant", "cosine")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
PLANES = ("axial", "coronal", "sagittal")
LOADINGS = ("auto", "memory", "ray-data")


def state_dir() -> Path:
    """Where the embedded defaults live (sqlite store, artifacts, checkpoints): $MRI_PLATFORM_HOME or ./.state."""
    return Path(os.environ.get("MRI_PLATFORM_HOME", ".state")).resolve()


def bentoml_home() -> Path:
    """BentoML's store of models and Bentos: $BENTOML_HOME, else ``bentoml/`` in the state folder."""
    return Path(os.environ.get("BENTOML_HOME") or state_dir() / "bentoml").resolve()


@dataclass
class TrainConfig:
    """One training run of one model of the zoo."""

    model: str = "ae1"
    """'ae1' (64 filters) or 'ae2' (256 filters), the report's autoencoders; 'dncnn' or 'unet', the residual nets."""
    filters: int | None = None
    """Override the model's width; None keeps the model's default width."""
    depth: int | None = None
    """Override DnCNN's layers or the U-Net's levels; None keeps the model's default."""
    epochs: int | None = None
    """Epochs to train; None takes the report's recipe (AE1 50, AE2 70)."""
    batch_size: int = 32
    """Global batch size, split evenly across workers (the report: 32)."""
    lr: float = 1e-3
    """Adam learning rate (Keras' default, which the report used)."""
    workers: int = 2
    """Ray Train workers (data-parallel DDP ranks)."""
    cpus_per_worker: int = 1
    """CPUs each worker reserves; it also sets the worker's torch threads."""
    gpu: bool = False
    """Train on GPUs (NCCL, mixed precision)."""
    gpus_per_worker: float = 1.0
    """GPUs each worker reserves with `gpu`. A fraction lets a small model's single worker share a GPU with other
    runs; with several workers it is refused: Ray may pack two NCCL ranks on one GPU, which NCCL refuses
    ("Duplicate GPU detected")."""
    loader_workers: int | None = None
    """DataLoader processes per worker preparing batches; None: the worker's CPUs on a GPU (the training process
    mostly waits on the GPU), none on CPUs (the CPUs compute the model)."""
    wait_for_resources: float = 0.0
    """Seconds to wait for the CPUs and GPUs the workers need to join the Ray cluster (an autoscaler adding nodes)
    before failing; 0: fail at once."""
    precision: str = "auto"
    """'auto' (bf16 autocast where the hardware has it, fp32 otherwise), 'fp32', 'bf16' or 'fp16' (GPU only)."""
    channels_last: bool = True
    """Use the channels-last memory format, about twice as fast for these convolutions on CPUs."""
    data: str = "builtin"
    """'builtin' (MRI volumes shipped in PyPI packages), a folder of JPEG/PNG images, or NIfTI files; on local disk
    or s3://bucket/prefix (read with Ray Data)."""
    loading: str = "auto"
    """'memory' (the driver loads the slices and shares them), 'ray-data' (Ray Data tasks read and slice the files
    on the cluster, each worker streams its shard; the driver never holds the data set), or 'auto': memory for the
    built-in data, Ray Data for every other source."""
    planes: tuple[str, ...] = ("axial",)
    """Planes to slice NIfTI volumes along."""
    test_fraction: float = 0.2
    """Held-out share, split by volume or patient before augmentation (the built-in data has a fixed split)."""
    augment: bool = True
    """Geometric augmentation: the report's rotation, shift, zoom and flip of whole slices; of patches, a random
    zoom-out, flips and quarter turns."""
    intensity_augment: bool | None = None
    """Random gamma and brightness of the clean slices; None: on for the residual nets, off for the report's."""
    size: int | str = 64
    """Side the slices are resized to (the report: 64), or 'native' to keep each slice's own resolution."""
    patch: int | None = None
    """Train on random patch x patch crops instead of whole slices (needed at native size); None: whole slices."""
    steps_per_epoch: int | None = None
    """Optimiser steps per epoch, whatever the data's size; None: one pass over the training slices."""
    grad_clip: float | None = None
    """Clip the gradient's norm to this (0: never); None: 1.0 for the residual nets, never for the report's. The
    U-Net has no normalisation layer: once, at the peak learning rate, a step blew a run up (loss 0.04 -> 0.65)."""
    schedule: str | None = None
    """Learning rate over the run: 'constant' (the report's) or 'cosine' (a short warm-up, then cosine decay to
    zero); None: cosine for the residual nets, constant for the report's."""
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    """Corruption used for training and validation."""
    seed: int = 0
    """Seed of the split, the initial weights, the augmentation and the training noise."""
    eval_seed: int = 1234
    """Seed of the fixed validation noise: every run is scored on the same corrupted images."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None takes $MLFLOW_TRACKING_URI, else a sqlite store in the state folder."""
    experiment: str = "mri-denoising"
    """MLflow experiment name."""
    registered_model: str = "mri-denoiser"
    """Registry name the final model is registered under; empty to skip registration."""
    storage: str | None = None
    """Checkpoint storage: a local folder or s3://bucket/prefix; None takes the state folder."""
    run_name: str | None = None
    """Ray Train run name; reusing one on purpose (with resume) continues that run."""
    resume: bool = False
    """Continue `run_name` from its last checkpoint instead of starting a new run."""
    max_failures: int = 2
    """How many worker failures a run survives (restarting from the last checkpoint)."""

    def __post_init__(self) -> None:
        self.model = self.model.lower()
        if isinstance(self.noise, dict):
            self.noise = NoiseConfig(**self.noise)
        self.planes = tuple(self.planes)
        if isinstance(self.size, str) and self.size.isdigit():
            self.size = int(self.size)
        ModelConfig.named(self.model, self.filters, self.depth)  # validates model, width and depth
        checks = [
            (self.epochs is None or self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (self.cpus_per_worker >= 1, f"cpus_per_worker must be >= 1, got {self.cpus_per_worker}"),
            (0 < self.gpus_per_worker <= 8, f"gpus_per_worker must be in (0, 8], got {self.gpus_per_worker}"),
            (not self.gpu or self.workers == 1 or self.gpus_per_worker >= 1,
             f"{self.workers} workers with {self.gpus_per_worker:g} GPU each: NCCL cannot run two ranks on one GPU "
             "(Ray would pack them together); give each worker a whole GPU (--gpus-per-worker 1) or use one worker"),
            (self.loader_workers is None or self.loader_workers >= 0,
             f"loader_workers must be >= 0, got {self.loader_workers}"),
            (self.wait_for_resources >= 0, f"wait_for_resources must be >= 0 seconds, got {self.wait_for_resources}"),
            (self.batch_size >= self.workers, f"batch size {self.batch_size} < {self.workers} workers"),
            (self.lr > 0, f"learning rate must be > 0, got {self.lr}"),
            (self.precision in PRECISIONS, f"precision must be one of {PRECISIONS}, got {self.precision!r}"),
            (self.precision != "fp16" or self.gpu, "fp16 needs --gpu; on CPUs use bf16 or fp32"),
            (self.loading in LOADINGS, f"loading must be one of {LOADINGS}, got {self.loading!r}"),
            (self.loading != "memory" or not str(self.data).startswith("s3://"),
             "data on S3 is read with Ray Data: use --loading ray-data (or auto)"),
            (0 < self.test_fraction < 1, f"test_fraction must be in (0, 1), got {self.test_fraction}"),
            (set(self.planes) <= set(PLANES), f"planes must be among {PLANES}, got {self.planes}"),
            (not self.resume or bool(self.run_name), "resume needs the run name of the run to continue"),
            (self.max_failures >= 0, f"max_failures must be >= 0, got {self.max_failures}"),
            (self.size == "native" or (isinstance(self.size, int) and self.size >= 8),
             f"size must be 'native' or at least 8 pixels, got {self.size!r}"),
            (self.patch is None or self.patch >= 8, f"patch must be at least 8 pixels, got {self.patch}"),
            (self.patch is not None or self.size != "native",
             "slices at native size differ in shape: give --patch N to train on N x N crops of them"),
            (self.patch is None or self.size == "native" or self.patch <= self.size,
             f"patch {self.patch} is larger than the {self.size} x {self.size} slices"),
            (self.grad_clip is None or self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.steps_per_epoch is None or self.steps_per_epoch >= 1,
             f"steps_per_epoch must be >= 1, got {self.steps_per_epoch}"),
            (self.schedule is None or self.schedule in SCHEDULES,
             f"schedule must be one of {SCHEDULES}, got {self.schedule!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig.named(self.model, self.filters, self.depth)

    @property
    def ray_data(self) -> bool:
        """Whether the run reads its data with Ray Data (see `loading`)."""
        from mri_platform.streaming import uses_ray_data

        return uses_ray_data(self.loading, self.data)

    @property
    def lr_schedule(self) -> str:
        return self.schedule or ("constant" if self.model_config.is_report_model else "cosine")

    @property
    def max_grad_norm(self) -> float | None:
        if self.grad_clip is not None:
            return self.grad_clip or None
        return None if self.model_config.is_report_model else 1.0

    @property
    def augment_intensity(self) -> bool:
        if self.intensity_augment is not None:
            return self.intensity_augment
        return not self.model_config.is_report_model

    @property
    def num_epochs(self) -> int:
        return self.epochs if self.epochs is not None else REPORT_EPOCHS.get(self.model, 50)

    def data_workers(self, device_type: str) -> int:
        """DataLoader processes for a worker training on `device_type` ('cuda' or 'cpu')."""
        if self.loader_workers is not None:
            return self.loader_workers
        return self.cpus_per_worker if device_type == "cuda" else 0

    @property
    def worker_batch_size(self) -> int:
        return self.batch_size // self.workers

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def read_preset(name_or_path: str, folder: Path, config_class: type) -> dict:
    """Read a preset (a name in `folder` or a YAML path) as a mapping of `config_class`'s fields."""
    path = Path(name_or_path)
    if not path.suffix:
        path = folder / f"{name_or_path}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in folder.glob("*.yaml"))
        raise ValueError(f"no preset {name_or_path!r}: use one of {available} or a path to a YAML file")
    values = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = set(values) - known
    if unknown:
        raise ValueError(f"preset {path} has unknown fields {sorted(unknown)}; known fields: {sorted(known)}")
    return values


def load_preset(name_or_path: str) -> dict:
    """A training preset ('demo', 'report', 'gpu' or a YAML path) as a mapping of TrainConfig fields."""
    return read_preset(name_or_path, PRESET_DIR, TrainConfig)


def build_config(preset: str | None = None, **overrides) -> TrainConfig:
    """Preset values, then explicit overrides (None means 'not given'); per-model epochs resolved by model."""
    values = load_preset(preset) if preset else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    model = str(values.get("model", "ae1")).lower()
    for key, value in list(values.items()):  # per-model values, e.g. epochs: {ae1: 30, unet: 12}
        if key != "noise" and isinstance(value, dict):
            unknown = set(value) - set(NAMED)
            if unknown:
                raise ValueError(f"{key}: per-model values must be keyed by {sorted(NAMED)}, got {sorted(unknown)}")
            del values[key]
            if value.get(model) is not None:  # a model the preset does not name keeps the field's default
                values[key] = value[model]
    if "noise" in values and isinstance(values["noise"], dict):
        values["noise"] = NoiseConfig(**values["noise"])
    return TrainConfig(**values)


__all__ = ["NAMED", "PRESET_FILTERS", "TrainConfig", "build_config", "load_preset", "state_dir"]
