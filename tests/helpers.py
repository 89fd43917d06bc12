"""Small trained models and registry entries shared by the evaluation, service and page tests."""

from pathlib import Path
from typing import Any

import torch

from mri_platform import tracking
from mri_platform.checkpoints import save_checkpoint
from mri_platform.config import build_config
from mri_platform.data import load_builtin
from mri_platform.figures import comparison_figure
from mri_platform.models import ModelConfig, build_model
from mri_platform.noise import NoiseConfig
from mri_platform.steps import train_step

DATA = {"source": "builtin", "size": 64, "patch": None}
"""What `train_plainly` trains on: the built-in slices at 64 x 64, whole (no patches)."""
DESCRIBE = {"noise": NoiseConfig().to_dict(), "epoch": 1, "data": DATA}


def tiny_config(tmp_path: Path, **overrides: Any):
    """A small but real training run: a narrow autoencoder on the built-in MRI slices, two CPU workers, tracked in a
    sqlite store and checkpointed under ``tmp_path``."""
    values = {
        "model": "ae1", "filters": 8, "epochs": 2, "workers": 2, "batch_size": 32, "lr": 3e-3,
        "tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "storage": str(tmp_path / "ckpt"),
    } | overrides  # fmt: skip
    return build_config(None, **values)


def describe(data: dict[str, Any] | None = None) -> dict[str, Any]:
    """The checkpoint fields beside the model: noise, epoch and the data description (DATA unless given)."""
    return {**DESCRIBE, "data": {**DATA, **(data or {})}}


def train_plainly(steps: int, filters: int = 16, model: str = "ae1") -> torch.nn.Module:
    """A few hundred plain PyTorch steps of a model of the zoo (``ae1``, ``unet``, ...) on the built-in training
    slices: enough to beat the noisy input."""
    torch.manual_seed(0)
    net = build_model(ModelConfig.named(model, filters))
    optimizer = torch.optim.Adam(net.parameters(), lr=3e-3)
    images = torch.from_numpy(load_builtin()[0].images).unsqueeze(1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = images[torch.randint(len(images), (32,), generator=generator)]
        train_step(net, batch, optimizer, NoiseConfig(), generator, amp_dtype=None)
    return net.eval()


def register(
    uri: str,
    model: torch.nn.Module,
    folder: Path,
    name: str,
    registered_model: str = "reg-test",
    psnr: float = 0.0,
    data: dict[str, Any] | None = None,
) -> str:
    """Log `model` to a new run of the tracking store `uri` and register it; returns its registry version.

    The run's config names the model's own kind and width, and its checkpoint (``folder/name/checkpoint.pt``)
    holds the model's ModelConfig and ``data`` (DATA unless given: whole 64 x 64 slices).
    """
    config = build_config(None, model=model.config.name, filters=model.config.filters, tracking_uri=uri,
                          registered_model=registered_model)  # fmt: skip
    exp = tracking.experiment_id(uri, config.experiment)
    run_id = tracking.client(uri).create_run(exp, run_name=name).info.run_id
    (folder / name).mkdir(parents=True)
    ckpt = save_checkpoint(folder / name / "checkpoint.pt", model, **describe(data))
    figure = comparison_figure(model, load_builtin()[1], NoiseConfig(), seed=0, path=folder / name / "fig.png")
    scores = {"psnr": psnr, "ssim": 0.0}
    tracking.log_results(uri, run_id, scores, figure, best_epoch=1)
    _, version = tracking.log_model(uri, run_id, model, ckpt, scores, config)
    return version
