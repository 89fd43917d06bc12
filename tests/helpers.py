"""Small trained models and registry entries shared by the evaluation, service and page tests."""

from pathlib import Path

import torch

from mri_platform import tracking
from mri_platform.checkpoints import save_checkpoint
from mri_platform.config import build_config
from mri_platform.data import load_builtin
from mri_platform.figures import comparison_figure
from mri_platform.models import DenoisingAutoencoder
from mri_platform.noise import NoiseConfig
from mri_platform.train import train_step

DESCRIBE = {"noise": NoiseConfig().to_dict(), "epoch": 1, "data": {"source": "builtin", "size": 64}}


def train_plainly(steps: int, filters: int = 16) -> DenoisingAutoencoder:
    """A few hundred plain PyTorch steps on the built-in training slices: enough to beat the noisy input."""
    torch.manual_seed(0)
    model = DenoisingAutoencoder(filters=filters)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    images = torch.from_numpy(load_builtin()[0].images).unsqueeze(1)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = images[torch.randint(len(images), (32,), generator=generator)]
        train_step(model, batch, optimizer, NoiseConfig(), generator, amp_dtype=None)
    return model.eval()


def register(
    uri: str, model: torch.nn.Module, folder: Path, name: str, registered_model: str = "reg-test", psnr: float = 0.0
) -> str:
    """Log `model` to a new run of the tracking store `uri` and register it; returns its registry version."""
    config = build_config(None, model="ae1", filters=model.config.filters, tracking_uri=uri,
                          registered_model=registered_model)  # fmt: skip
    exp = tracking.experiment_id(uri, config.experiment)
    run_id = tracking.client(uri).create_run(exp, run_name=name).info.run_id
    (folder / name).mkdir(parents=True)
    ckpt = save_checkpoint(folder / name / "checkpoint.pt", model, **DESCRIBE)
    figure = comparison_figure(model, load_builtin()[1], NoiseConfig(), seed=0, path=folder / name / "fig.png")
    scores = {"psnr": psnr, "ssim": 0.0}
    tracking.log_results(uri, run_id, scores, figure, best_epoch=1)
    _, version = tracking.log_model(uri, run_id, model, ckpt, scores, config)
    return version
