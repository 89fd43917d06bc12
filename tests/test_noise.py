import math

import pytest
import torch

from mri_platform.noise import NoiseConfig, add_noise, fixed_noisy


def test_variance_and_std_are_distinct_settings():
    report = NoiseConfig()  # the report: variance 0.2
    code = NoiseConfig.from_std(0.2)  # the report's code: std 0.2
    assert report.variance == 0.2 and math.isclose(report.std, math.sqrt(0.2))
    assert math.isclose(code.variance, 0.04) and math.isclose(code.std, 0.2)
    assert "var=0.2" in report.describe() and "clipped" in report.describe()


def test_unclipped_gaussian_has_the_asked_variance_and_zero_mean():
    clean = torch.full((64, 1, 64, 64), 0.5)
    noisy = add_noise(clean, NoiseConfig(variance=0.2, clip=False), torch.Generator().manual_seed(0))
    residual = noisy - clean
    assert abs(residual.mean().item()) < 0.01
    assert residual.var().item() == pytest.approx(0.2, rel=0.02)


def test_clipping_keeps_range_and_biases_dark_background_upwards():
    clean = torch.zeros(16, 1, 32, 32)
    noisy = add_noise(clean, NoiseConfig(variance=0.2), torch.Generator().manual_seed(0))
    assert noisy.min() >= 0 and noisy.max() <= 1
    assert noisy.mean().item() > 0.1  # half the noise is clipped away on a black background


def test_rician_noise_is_nonnegative_and_biased_on_background():
    clean = torch.zeros(16, 1, 32, 32)
    noisy = add_noise(clean, NoiseConfig(kind="rician", variance=0.01, clip=False), torch.Generator().manual_seed(0))
    assert noisy.min() >= 0
    # the magnitude of complex Gaussian noise on zero signal is Rayleigh: mean = std * sqrt(pi / 2)
    assert noisy.mean().item() == pytest.approx(0.1 * math.sqrt(math.pi / 2), rel=0.03)


def test_fixed_noise_repeats_and_fresh_noise_differs():
    clean = torch.rand(4, 1, 16, 16)
    config = NoiseConfig()
    assert torch.equal(fixed_noisy(clean, config, seed=7), fixed_noisy(clean, config, seed=7))
    assert not torch.equal(fixed_noisy(clean, config, seed=7), fixed_noisy(clean, config, seed=8))
    generator = torch.Generator().manual_seed(0)
    assert not torch.equal(add_noise(clean, config, generator), add_noise(clean, config, generator))


@pytest.mark.parametrize("kwargs", [{"kind": "poisson"}, {"variance": -1.0}, {"variance": float("nan")}])
def test_invalid_noise_is_refused(kwargs):
    with pytest.raises(ValueError):
        NoiseConfig(**kwargs)
