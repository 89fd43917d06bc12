"""Pictures people would rather look at than read: original / noisy / restored, side by side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mri_platform.data import SliceSet
from mri_platform.metrics import psnr_per_image, ssim_per_image
from mri_platform.models import restore
from mri_platform.noise import NoiseConfig, corrupted


def comparison_figure(
    model: torch.nn.Module, slices: SliceSet, noise: NoiseConfig, *, seed: int, path: str | Path, n: int = 4
) -> Path:
    """Save a grid of `n` evenly spaced slices: original, noisy and restored, with PSNR / SSIM under each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = slices.by_shape()
    pairs = corrupted(slices, noise, seed)  # the same corruption the scores were computed on
    where = {int(i): (g, k) for g, (index, _) in enumerate(groups) for k, i in enumerate(index)}
    pick = np.linspace(0, len(slices) - 1, min(n, len(slices))).round().astype(int)
    clean = [pairs[where[i][0]][0][where[i][1]] for i in pick]  # (1, H, W) each, sizes may differ
    noisy = [pairs[where[i][0]][1][where[i][1]] for i in pick]
    restored = [restore(model, image[None])[0] for image in noisy]

    fig, axes = plt.subplots(len(pick), 3, figsize=(7.5, 2.6 * len(pick)), squeeze=False)
    for row in range(len(pick)):
        panels = [("original", clean[row]), ("noisy", noisy[row]), ("restored", restored[row])]
        for col, (title, image) in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(image[0].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if col:
                psnr = psnr_per_image(image[None], clean[row][None]).item()
                ssim = ssim_per_image(image[None], clean[row][None]).item()
                ax.set_xlabel(f"{psnr:.1f} dB, SSIM {ssim:.2f}", fontsize=8)
            if row == 0:
                ax.set_title(title)
        axes[row, 0].set_ylabel(slices.names[pick[row]].split("/")[-1][:28], fontsize=7)
    fig.suptitle(f"noise: {noise.describe()}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
