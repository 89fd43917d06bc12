"""Self-describing checkpoints: the file carries what is needed to rebuild and judge the model.

A checkpoint holds the architecture (`model`), the weights, the noise it was trained against, the data it
saw (source and fingerprint), the optimizer state and the epoch, so `load_checkpoint(path)` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mri_platform.models import ModelConfig, build_model
from mri_platform.noise import NoiseConfig

FORMAT = "mri-platform/checkpoint-v1"
FILENAME = "checkpoint.pt"


def save_checkpoint(path: str | Path, model: torch.nn.Module, **fields: Any) -> Path:
    """Write `model`'s weights (unwrapped from DDP, contiguous, on the CPU) with the describing `fields`."""
    module = getattr(model, "module", model)
    state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    payload = {"format": FORMAT, "model": module.config.to_dict(), "state_dict": state, **fields}
    path = Path(path)
    torch.save(payload, path)
    return path


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint file (or a folder holding `checkpoint.pt`) as a dict, with a clear error if it is not one."""
    path = Path(path)
    if path.is_dir():
        found = sorted(path.rglob(FILENAME))
        if not found:
            raise FileNotFoundError(
                f"no {FILENAME} under {path}: point at a checkpoint file or a run's checkpoint folder"
            )
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        raise ValueError(f"{path} is not a readable checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mri-platform checkpoint (expected format {FORMAT!r})")
    return payload


def load_checkpoint(path: str | Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model in eval mode from a checkpoint; returns (model, the checkpoint's other fields)."""
    payload = read_checkpoint(path)
    model = build_model(ModelConfig(**payload["model"]))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta


def checkpoint_noise(meta: dict[str, Any]) -> NoiseConfig:
    return NoiseConfig(**meta["noise"])


def applies_natively(meta: dict[str, Any]) -> bool:
    """Whether a model denoises an image at its own resolution, or only at the whole-slice size it learned.

    The residual networks learn a local rule (a receptive field of tens of pixels) and so apply to any size, as
    does any model trained on random patches. The report's autoencoders trained on whole slices squeeze the whole
    64 x 64 image through a 16 x 16 bottleneck: they are only used at that size, and bigger inputs are shrunk and
    enlarged back, as the report's app did.
    """
    data = meta.get("data", {})
    if data.get("patch") or data.get("size") == "native":
        return True
    return not ModelConfig(**meta["model"]).is_report_model


def trained_size(meta: dict[str, Any]) -> int:
    """The side of the slices (or patches) the model learned from: what a report model must be fed."""
    data = meta.get("data", {})
    return int(data.get("patch") or (data["size"] if isinstance(data.get("size"), int) else 64))
