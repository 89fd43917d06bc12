"""The denoisers: the report's two autoencoders, and two stronger small networks.

- ``ae1`` / ``ae2``: the report's convolutional autoencoders (64 and 256 filters). With 'same' padding and one
  input channel they have 112,001 and 1,775,105 parameters, as the report's Keras models do.
- ``dncnn``: a residual DnCNN (Zhang et al. 2017) that works at half resolution on a pixel-unshuffled input, as
  FFDNet does: a stack of 3x3 conv + batch norm + ReLU that predicts the noise, which is subtracted from the input.
  Batch norm stays: without it the stack barely learned at this noise (loss 0.107 -> 0.106 in 80 steps, against
  0.155 -> 0.068 with it; measured on the built-in patches).
- ``unet``: a small residual U-Net in the manner of DRUNet: residual blocks at each level, strided convolutions
  down, transposed convolutions up, additive skips, and the noise predicted and subtracted. Four levels of 16, 32,
  64 and 128 filters by default (870,977 parameters). It replaced three levels of 32, 64 and 128 (857,857): about
  the same parameters, but 2.5x the training images/s on a CPU (its full-resolution level, where most of the work
  is, is half as wide) and a receptive field twice as large, which at this noise (std 0.45) is what pays.
  Measured on the built-in data: 21.06 and 21.08 dB on the held-out slices (two seeds) against 20.75 and 20.70 for
  three levels, each in the same 2.3 minutes of training (1,600 against 640 steps of 32).

Every network is fully convolutional: it pads any H x W to its stride and crops back, so a model trained on
64 x 64 slices or patches applies to a 256 x 256 slice as it is. `ModelConfig` rebuilds any of them, and is what
checkpoints and logged models store.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES = ("autoencoder", "dncnn", "unet")
NAMED = {
    # name: (architecture, default width, default depth)
    "ae1": ("autoencoder", 64, 2),
    "ae2": ("autoencoder", 256, 2),
    "dncnn": ("dncnn", 64, 15),
    "unet": ("unet", 16, 4),
}
PRESET_FILTERS = {name: width for name, (_, width, _) in NAMED.items()}
REPORT_MODELS = ("ae1", "ae2")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: stored in every checkpoint and logged model."""

    name: str = "ae1"
    """'ae1' / 'ae2' (the report's autoencoders), 'dncnn', 'unet', or 'custom' (an autoencoder of any width)."""
    filters: int = 64
    """Width: the autoencoders' and DnCNN's filters, the U-Net's filters at full resolution (doubled per level)."""
    channels: int = 1
    """Image channels in and out (grayscale MRI: 1)."""
    architecture: str = ""
    """'autoencoder', 'dncnn' or 'unet'; empty takes the name's (checkpoints from before the zoo hold none)."""
    depth: int = 0
    """DnCNN: 3x3 conv layers; U-Net: resolution levels; autoencoder: always 2. 0 takes the name's default."""

    def __post_init__(self) -> None:
        arch, _, depth = NAMED.get(self.name, ("autoencoder", 0, 2))
        object.__setattr__(self, "architecture", self.architecture or arch)
        object.__setattr__(self, "depth", self.depth or depth)
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.filters < 1:
            raise ValueError(f"filters must be >= 1, got {self.filters}")
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        low = {"autoencoder": 2, "dncnn": 3, "unet": 1}[self.architecture]
        if self.depth < low or (self.architecture == "autoencoder" and self.depth != 2):
            raise ValueError(f"depth {self.depth} is not possible for a {self.architecture} (at least {low})")

    @classmethod
    def named(cls, name: str, filters: int | None = None, depth: int | None = None) -> ModelConfig:
        """A model of the zoo at its default width and depth, unless `filters` / `depth` override them."""
        name = name.lower()
        if name not in NAMED and filters is None:
            raise ValueError(f"unknown model {name!r}: use one of {sorted(NAMED)} (or 'custom' with --filters)")
        arch, width, default_depth = NAMED.get(name, ("autoencoder", 0, 2))
        return cls(name=name, filters=filters or width, architecture=arch, depth=depth or default_depth)

    @property
    def stride(self) -> int:
        """Input sides must be multiples of this; the models pad to it themselves."""
        return {"autoencoder": 4, "dncnn": 2, "unet": 2 ** (self.depth - 1)}[self.architecture]

    @property
    def is_report_model(self) -> bool:
        """The report's autoencoders, which learned whole 64 x 64 slices rather than a local denoising rule."""
        return self.architecture == "autoencoder"

    def to_dict(self) -> dict:
        return asdict(self)


class _PadToStride(nn.Module):
    """Base of every network: pads (N, C, H, W) to the stride by replicating the border, and crops back."""

    stride = 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (N, C, H, W), got shape {tuple(x.shape)}")
        height, width = x.shape[-2:]
        pad_h, pad_w = -height % self.stride, -width % self.stride
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        out = self.body(x)[..., :height, :width]
        # The residual networks may overshoot [0, 1] while learning; a served or scored image may not.
        return out if self.training else out.clamp(0.0, 1.0)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def _conv(c_in: int, c_out: int, kernel: int = 3, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=kernel, stride=stride, padding=(kernel - 1) // 2)


class DenoisingAutoencoder(_PadToStride):
    """The report's model: Conv(3x3)+ReLU+MaxPool twice, Conv+ReLU+Upsample twice, a 3x3 conv with a sigmoid."""

    stride = 4

    def __init__(self, filters: int = 64, channels: int = 1) -> None:
        super().__init__()
        self.config = ModelConfig(name="custom", filters=filters, channels=channels)
        self.encoder = nn.Sequential(
            _conv(channels, filters), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (N, F, H/2, W/2)
            _conv(filters, filters), nn.ReLU(inplace=True), nn.MaxPool2d(2),  # (N, F, H/4, W/4)
        )  # fmt: skip
        self.decoder = nn.Sequential(
            _conv(filters, filters), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2),  # (N, F, H/2, W/2)
            _conv(filters, filters), nn.ReLU(inplace=True), nn.Upsample(scale_factor=2),  # (N, F, H, W)
            _conv(filters, channels), nn.Sigmoid(),  # (N, C, H, W)
        )  # fmt: skip

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


class DnCNN(_PadToStride):
    """Residual DnCNN on a 2x pixel-unshuffled input (FFDNet's trick: a quarter of the pixels, 4x the channels,
    twice the receptive field for the same depth); predicts the noise and subtracts it."""

    stride = 2

    def __init__(self, filters: int = 64, depth: int = 15, channels: int = 1) -> None:
        super().__init__()
        inner = channels * 4
        layers: list[nn.Module] = [_conv(inner, filters), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(filters, filters, 3, padding=1, bias=False), nn.BatchNorm2d(filters), nn.ReLU(True)]
        layers.append(_conv(filters, inner))
        self.net = nn.Sequential(*layers)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        noise = F.pixel_shuffle(self.net(F.pixel_unshuffle(x, 2)), 2)  # (N, C, H, W)
        return x - noise


class _ResBlock(nn.Module):
    """conv-ReLU-conv with an identity shortcut (DRUNet's block, no normalisation)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1, self.conv2 = _conv(width, width), _conv(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class ResidualUNet(_PadToStride):
    """A small DRUNet-like U-Net: `depth` resolution levels of width filters * 2**level, one residual block per
    level on each side, strided 2x2 convolutions down and transposed ones up, additive skips; predicts the noise."""

    def __init__(self, filters: int = 32, depth: int = 3, channels: int = 1) -> None:
        super().__init__()
        widths = [filters * 2**level for level in range(depth)]
        self.stride = 2 ** (depth - 1)
        self.head = _conv(channels, widths[0])
        self.down = nn.ModuleList(
            nn.Sequential(_ResBlock(w), _conv(w, w_next, kernel=2, stride=2))  # (N, 2w, H/2, W/2)
            for w, w_next in zip(widths[:-1], widths[1:], strict=True)
        )
        self.bottom = nn.Sequential(_ResBlock(widths[-1]), _ResBlock(widths[-1]))
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(w_next, w, kernel_size=2, stride=2)  # (N, w, 2h, 2w)
            for w, w_next in zip(widths[:-1], widths[1:], strict=True)
        )
        self.decode = nn.ModuleList(_ResBlock(w) for w in widths[:-1])
        self.tail = _conv(widths[0], channels)

    def body(self, x: torch.Tensor) -> torch.Tensor:
        h = self.head(x)
        skips = []
        for down in self.down:
            skips.append(h)
            h = down(h)
        h = self.bottom(h)
        for up, decode, skip in zip(reversed(self.up), reversed(self.decode), reversed(skips), strict=True):
            h = decode(up(h) + skip)
        return x - self.tail(F.relu(h))


def build_model(config: ModelConfig) -> _PadToStride:
    """The network a config describes, carrying the config (checkpoints save it beside the weights)."""
    if config.architecture == "autoencoder":
        model = DenoisingAutoencoder(filters=config.filters, channels=config.channels)
    elif config.architecture == "dncnn":
        model = DnCNN(filters=config.filters, depth=config.depth, channels=config.channels)
    else:
        model = ResidualUNet(filters=config.filters, depth=config.depth, channels=config.channels)
    model.config = config
    return model


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.inference_mode()
def restore(model: nn.Module, noisy: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Denoise (N, 1, H, W) images in batches, in fp32 on the model's device; returns them on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    return torch.cat(
        [model(noisy[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(noisy), batch_size)]
    )
