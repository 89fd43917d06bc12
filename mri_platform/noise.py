"""Noise models for corrupting clean slices.

The report specifies Gaussian noise of mean 0 and *variance* 0.2, clipped to [0, 1]; its code used std 0.2
(variance 0.04). Both are expressible here, and every reported number carries the settings that made it.
Rician noise is the magnitude of complex Gaussian noise, which is what MRI magnitude images carry.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from mri_platform.data import SliceSet

KINDS = ("gaussian", "rician")


@dataclass(frozen=True)
class NoiseConfig:
    """How clean slices are corrupted, for training and for evaluation."""

    kind: str = "gaussian"
    """'gaussian' (additive) or 'rician' (magnitude of complex Gaussian noise)."""
    variance: float = 0.2
    """Variance of the Gaussian noise (per real and imaginary channel for Rician); the report's setting is 0.2."""
    clip: bool = True
    """Clip the noisy image to [0, 1], as an 8-bit image would be."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"noise kind must be one of {KINDS}, got {self.kind!r}")
        if not (self.variance >= 0 and math.isfinite(self.variance)):
            raise ValueError(f"noise variance must be a finite number >= 0, got {self.variance}")

    @classmethod
    def from_std(cls, std: float, **kwargs) -> NoiseConfig:
        if std < 0:
            raise ValueError(f"noise std must be >= 0, got {std}")
        return cls(variance=std**2, **kwargs)

    @property
    def std(self) -> float:
        return math.sqrt(self.variance)

    def describe(self) -> str:
        """A short label for tables and tags, e.g. 'gaussian var=0.2 (std=0.447) clipped'."""
        clip = "clipped" if self.clip else "unclipped"
        return f"{self.kind} var={self.variance:g} (std={self.std:.3g}) {clip}"

    def to_dict(self) -> dict:
        return asdict(self)


def add_noise(clean: torch.Tensor, config: NoiseConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Return a noisy copy of `clean` (any shape, values in [0, 1]).

    The generator makes the noise reproducible: evaluation passes a fixed-seed one so that runs are compared
    on identical corrupted images, training passes one that advances every batch.
    """
    std = config.std
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype) * std
    if config.kind == "gaussian":
        noisy = clean + noise
    else:
        imag = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype) * std
        noisy = torch.sqrt((clean + noise) ** 2 + imag**2)
    return noisy.clamp_(0.0, 1.0) if config.clip else noisy


def fixed_noisy(clean: torch.Tensor, config: NoiseConfig, seed: int = 0) -> torch.Tensor:
    """The evaluation corruption: the same images and seed always give the same noisy images."""
    generator = torch.Generator().manual_seed(seed)
    return add_noise(clean.cpu(), config, generator).to(clean.device)


def fixed_noisy_groups(groups: list[torch.Tensor], config: NoiseConfig, seed: int = 0) -> list[torch.Tensor]:
    """`fixed_noisy` for slices batched by shape (`SliceSet.by_shape`): group k draws from seed + k, so a set of
    equal-sized slices, one group, gets exactly the corruption `fixed_noisy` gives it."""
    return [fixed_noisy(group, config, seed + k) for k, group in enumerate(groups)]


def corrupted(slices: SliceSet, config: NoiseConfig, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(clean, noisy) (n, 1, H, W) pairs per slice shape: the fixed-seed corruption every score is computed on."""
    clean = [torch.tensor(stack).unsqueeze(1) for _, stack in slices.by_shape()]  # a copy: Ray shares read-only
    return list(zip(clean, fixed_noisy_groups(clean, config, seed), strict=True))
