"""The model as the service runs it: a checkpoint in, (N, H, W) slices in [0, 1] in and out.

Kept apart from BentoML so that the benchmark measures the same code in-process (the ceiling for served
throughput) and the tests can check it without a server.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mri_platform.checkpoints import FILENAME, checkpoint_noise, load_checkpoint
from mri_platform.noise import NoiseConfig

PRECISIONS = ("fp32", "bf16")


class Denoiser:
    """A trained autoencoder in eval mode on the CPU (or a GPU), channels_last, fp32 or bf16 autocast."""

    def __init__(self, checkpoint: str | Path, precision: str = "fp32", device: str | None = None):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        path = Path(checkpoint)
        if path.is_dir():
            path = path / FILENAME
        self.model, self.meta = load_checkpoint(path)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = self.model.to(self.device, memory_format=torch.channels_last)
        self.precision = precision
        self.size = int(self.meta.get("data", {}).get("size", 64))  # the side the model was trained at

    @property
    def noise(self) -> NoiseConfig:
        """The noise the model was trained against (what the page adds to a clean image)."""
        return checkpoint_noise(self.meta)

    def describe(self) -> dict[str, Any]:
        return {
            "model": self.meta["model"],
            "noise": self.meta["noise"],
            "image_size": self.size,
            "precision": self.precision,
            "device": str(self.device),
        }

    @torch.inference_mode()
    def __call__(self, slices: np.ndarray) -> np.ndarray:
        """Denoise (N, H, W) float32 slices in [0, 1]; returns (N, H, W) float32 in [0, 1]."""
        batch = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).unsqueeze(1)  # (N, 1, H, W)
        batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float32
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.precision == "bf16"):
            out = self.model(batch)
        return out.float().clamp_(0, 1).squeeze(1).cpu().numpy()


def configure_threads() -> int:
    """Use every core the process may run on for one forward pass (BentoML runs one inference at a time)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    return cores
