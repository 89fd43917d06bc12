import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.metrics import mean_squared_error, peak_signal_noise_ratio, structural_similarity

from mri_platform.metrics import mse_per_image, psnr_from_mse, psnr_per_image, score, ssim_per_image


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    clean = rng.random((3, 1, 64, 64)).astype(np.float32)
    clean[:, :, 16:48, 16:48] *= 0.3  # some structure
    noisy = np.clip(clean + rng.normal(0, 0.2, clean.shape), 0, 1).astype(np.float32)
    return torch.from_numpy(noisy), torch.from_numpy(clean)


def _sk_ssim(a, b):
    return structural_similarity(
        a, b, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, win_size=11
    )


def test_mse_and_psnr_match_scikit_image(pair):
    pred, target = pair
    for i in range(len(pred)):
        a, b = target[i, 0].numpy(), pred[i, 0].numpy()
        assert mse_per_image(pred, target)[i].item() == pytest.approx(mean_squared_error(a, b), rel=1e-5)
        assert psnr_per_image(pred, target)[i].item() == pytest.approx(
            peak_signal_noise_ratio(a, b, data_range=1.0), rel=1e-5
        )


def test_ssim_matches_scikit_images_gaussian_11x11_window(pair):
    pred, target = pair
    ours = ssim_per_image(pred, target)
    for i in range(len(pred)):
        assert ours[i].item() == pytest.approx(_sk_ssim(target[i, 0].numpy(), pred[i, 0].numpy()), abs=1e-6)


def test_identical_images_score_perfect_ssim_and_high_psnr(pair):
    _, clean = pair
    assert ssim_per_image(clean, clean).min().item() == pytest.approx(1.0)
    assert psnr_per_image(clean, clean).min().item() > 100


def test_psnr_uses_data_range_one_not_the_predictions_range():
    target = torch.zeros(1, 1, 8, 8)
    pred = torch.full((1, 1, 8, 8), 0.1)  # MSE 0.01 -> 20 dB with data_range 1
    assert psnr_per_image(pred, target).item() == pytest.approx(20.0)


def test_score_reports_mean_and_pooled_psnr(pair):
    pred, target = pair
    result = score(pred, target)
    assert result["psnr"] == pytest.approx(psnr_per_image(pred, target).mean().item())
    assert result["psnr_pooled"] == pytest.approx(psnr_from_mse(mse_per_image(pred, target).mean()).item())
    assert set(result) == {"mse", "psnr", "psnr_pooled", "ssim"}


def test_scoring_a_larger_set_takes_no_more_memory():
    """Scoring 1,024 slices of 64 x 64 once took 2.5 GB (a float64 11 x 11 conv unfolds 121 values per pixel); in
    chunks with a separable window the process's peak grows by tens of MB. Measured in a fresh process, whose peak
    RSS nothing else has raised."""
    program = (
        "import resource, torch\n"
        "from mri_platform.metrics import score\n"
        "clean = torch.rand(1024, 1, 64, 64)\n"
        "noisy = (clean + 0.1 * torch.randn_like(clean)).clamp(0, 1)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "score(noisy, clean)\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    assert float(done.stdout) < 200, f"scoring raised the peak RSS by {float(done.stdout):.0f} MB"
