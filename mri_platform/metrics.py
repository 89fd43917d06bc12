"""Image-quality metrics with fixed conventions, so that numbers from different runs compare.

- PSNR uses data_range = 1.0 (images live in [0, 1]), not the per-image max - min the report's code used.
- SSIM uses the standard Gaussian 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03, data_range = 1.0,
  computed over the valid region (no padding), as scikit-image's `structural_similarity(gaussian_weights=True,
  use_sample_covariance=False, data_range=1.0)` does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
K1, K2 = 0.01, 0.03
SCORE_CHUNK = 64
"""Images `score` computes at once: its memory stays flat however many it is given."""


def mse_per_image(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N,) mean squared error of each image."""
    return ((pred.float() - target.float()) ** 2).flatten(1).mean(dim=1)


def psnr_from_mse(mse: torch.Tensor | float, data_range: float = 1.0) -> torch.Tensor:
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return 10.0 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


def psnr_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    return psnr_from_mse(mse_per_image(pred, target), data_range)


def _gaussian_1d(device: torch.device) -> torch.Tensor:
    coords = torch.arange(WINDOW, dtype=torch.float64, device=device) - (WINDOW - 1) / 2
    g = torch.exp(-(coords**2) / (2 * SIGMA**2))
    return g / g.sum()  # (11,): the 11 x 11 window is its outer product with itself


def ssim_per_image(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """(N, C, H, W) -> (N,) mean SSIM of each image (channels averaged)."""
    if pred.shape != target.shape or pred.ndim != 4:
        raise ValueError(f"expected two (N, C, H, W) tensors of one shape, got {pred.shape} and {target.shape}")
    x, y = pred.double(), target.double()
    channels = x.shape[1]
    g = _gaussian_1d(x.device)
    rows = g.view(1, 1, WINDOW, 1).expand(channels, -1, -1, -1)
    cols = g.view(1, 1, 1, WINDOW).expand(channels, -1, -1, -1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        # Separable, valid region only (scikit-image crops the border). A float64 11 x 11 conv2d on the CPU unfolds
        # 121 values per output pixel: 1.4 GB for 512 slices of 64 x 64; two 11-tap passes unfold 11 each.
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (K1 * data_range) ** 2, (K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1)


def summarize(mse_sum: float, psnr_sum: float, ssim_sum: float, count: int) -> dict[str, float]:
    """Turn per-image sums (possibly all-reduced across workers) into the reported metrics.

    `psnr` is the mean of per-image PSNRs; `psnr_pooled` is computed from the pooled MSE.
    """
    if count == 0:
        raise ValueError("no images were scored")
    mse = mse_sum / count
    return {
        "mse": mse,
        "psnr": psnr_sum / count,
        "psnr_pooled": 10.0 * math.log10(1.0 / max(mse, 1e-12)),
        "ssim": ssim_sum / count,
    }


def score(pred: torch.Tensor | list[torch.Tensor], target: torch.Tensor | list[torch.Tensor]) -> dict[str, float]:
    """All metrics for a batch of predictions against clean targets, or for lists of batches of different shapes
    (slices at their native sizes), every image weighing the same. Computed `SCORE_CHUNK` images at a time, so that
    scoring a larger held-out set takes longer, not more memory."""
    preds, targets = (pred, target) if isinstance(pred, list) else ([pred], [target])
    sums = torch.zeros(3, dtype=torch.float64)
    for whole_p, whole_t in zip(preds, targets, strict=True):
        for p, t in zip(whole_p.split(SCORE_CHUNK), whole_t.split(SCORE_CHUNK), strict=True):
            sums += torch.stack(
                [mse_per_image(p, t).sum().double(), psnr_per_image(p, t).sum(), ssim_per_image(p, t).sum()]
            )
    return summarize(*sums.tolist(), sum(p.shape[0] for p in preds))
