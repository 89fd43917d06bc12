"""The report's convolutional denoising autoencoders, in PyTorch.

AE1 and AE2 differ only in width (64 and 256 filters). With 'same' padding and one input channel they have
112,001 and 1,775,105 parameters, as the report's Keras models do.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

PRESET_FILTERS = {"ae1": 64, "ae2": 256}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: stored in every checkpoint and logged model."""

    name: str = "ae1"
    """'ae1' (64 filters) or 'ae2' (256 filters) from the report, or 'custom' with `filters` set."""
    filters: int = 64
    """Convolution width of every hidden layer."""
    channels: int = 1
    """Image channels in and out (grayscale MRI: 1)."""

    def __post_init__(self) -> None:
        if self.filters < 1:
            raise ValueError(f"filters must be >= 1, got {self.filters}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")

    @classmethod
    def named(cls, name: str, filters: int | None = None) -> ModelConfig:
        """'ae1' / 'ae2' with the report's width, unless `filters` overrides it."""
        name = name.lower()
        if name not in PRESET_FILTERS and filters is None:
            raise ValueError(f"unknown model {name!r}: use one of {sorted(PRESET_FILTERS)} or give --filters")
        return cls(name=name, filters=filters if filters is not None else PRESET_FILTERS[name])

    def to_dict(self) -> dict:
        return asdict(self)


class DenoisingAutoencoder(nn.Module):
    """Conv(3x3)+ReLU+MaxPool twice, Conv+ReLU+Upsample twice, then a 3x3 conv to `channels` with a sigmoid.

    Input and output are (N, channels, H, W) in [0, 1], with H and W divisible by 4.
    """

    def __init__(self, filters: int = 64, channels: int = 1) -> None:
        super().__init__()
        self.config = ModelConfig(name="custom", filters=filters, channels=channels)

        def conv(c_in: int, c_out: int) -> nn.Conv2d:
            return nn.Conv2d(c_in, c_out, kernel_size=3, padding=1)

        self.encoder = nn.Sequential(
            conv(channels, filters), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (N, F, H/2, W/2)
            conv(filters, filters), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (N, F, H/4, W/4)
        )  # fmt: skip
        self.decoder = nn.Sequential(
            conv(filters, filters), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2),  # (N, F, H/2, W/2)
            conv(filters, filters), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2),  # (N, F, H, W)
            conv(filters, channels), nn.Sigmoid(),  # (N, C, H, W)
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"expected (N, C, H, W) with H and W divisible by 4, got {tuple(x.shape)}")
        return self.decoder(self.encoder(x))


def build_model(config: ModelConfig) -> DenoisingAutoencoder:
    model = DenoisingAutoencoder(filters=config.filters, channels=config.channels)
    model.config = config
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
