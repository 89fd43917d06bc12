"""Classical baselines: the clipping bias inverted, strengths tuned on the training split, cached, BM3D optional."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from skimage.restoration import denoise_tv_chambolle

from mri_platform import baselines
from mri_platform.baselines import baseline_scores, best_baseline, bias_curve, invert_bias, tune_baselines
from mri_platform.config import state_dir
from mri_platform.data import load_builtin
from mri_platform.metrics import score
from mri_platform.noise import NoiseConfig, add_noise, fixed_noisy

REPORT = NoiseConfig(variance=0.2)  # the report's noise: variance 0.2, clipped
CODE = NoiseConfig.from_std(0.2)  # its code's: std 0.2, clipped
SEED = 1234


@pytest.fixture(scope="module")
def builtin():
    """The built-in (train, held-out) split at 32 x 32: real MRI, small enough to filter quickly."""
    return load_builtin(32)


@pytest.fixture(autouse=True)
def few_tuning_slices(monkeypatch):
    monkeypatch.setattr(baselines, "TUNING_SLICES", 12)


@pytest.mark.parametrize(
    "noise",
    [REPORT, CODE, NoiseConfig(kind="rician", variance=0.04), NoiseConfig(kind="rician", variance=0.04, clip=False)],
    ids=lambda n: n.describe(),
)
def test_bias_curve_is_the_mean_noisy_value_and_inverts(noise):
    x = np.array([0.0, 0.05, 0.2, 0.5, 0.8, 0.95, 1.0])
    samples = add_noise(torch.from_numpy(x).repeat(200_000, 1), noise, torch.Generator().manual_seed(0))
    grid, f = bias_curve(noise)
    expected = np.interp(x, grid, f)
    np.testing.assert_allclose(samples.mean(dim=0).numpy(), expected, atol=4e-3)  # Monte Carlo: ~1e-3 std error
    np.testing.assert_allclose(invert_bias(expected, noise), x, atol=1e-3)


def test_clipping_brightens_the_background_as_measured():
    assert bias_curve(REPORT)[1][0] == pytest.approx(0.176, abs=1e-3)  # E[clip(n, 0, 1)] at variance 0.2
    assert bias_curve(CODE)[1][0] == pytest.approx(0.2 / np.sqrt(2 * np.pi), abs=1e-4)


def test_unclipped_gaussian_noise_needs_no_inversion():
    noise = NoiseConfig(variance=0.2, clip=False)
    y = np.linspace(0, 1, 11)
    assert not baselines.is_biased(noise)
    np.testing.assert_array_equal(invert_bias(y, noise), y)
    np.testing.assert_array_equal(bias_curve(noise)[1], bias_curve(noise)[0])


def test_tuned_clipping_aware_tv_beats_the_old_untuned_tv(builtin):
    train, held_out = builtin
    outcome = baseline_scores(held_out, REPORT, SEED, tune_on=train, methods=["total_variation"])
    results = outcome["baselines"]
    # the old baseline, on the noisy images a model is scored on: weight 0.5 * std, output clipped
    clean = torch.from_numpy(held_out.images).unsqueeze(1)
    noisy = fixed_noisy(clean, REPORT, SEED)[:, 0].double().numpy()
    old = np.stack([np.clip(denoise_tv_chambolle(n, weight=0.5 * REPORT.std), 0, 1) for n in noisy])
    old_psnr = score(torch.from_numpy(old).float().unsqueeze(1), clean)["psnr"]
    assert set(results) == {"total_variation", "total_variation+debias"}
    assert results["total_variation+debias"]["psnr"] > old_psnr + 2.5  # 17.9 vs 15.0 dB at 32 x 32
    assert results["total_variation+debias"]["psnr"] > results["total_variation"]["psnr"] + 2
    assert outcome["best_baseline"] == best_baseline(results) == "total_variation+debias"


def test_stronger_noise_gets_stronger_smoothing(builtin):
    train = builtin[0]
    methods = ["total_variation", "gaussian_blur"]
    weak, strong = (tune_baselines(train, noise, methods=methods) for noise in (NoiseConfig.from_std(0.1), REPORT))
    for name, param in [("total_variation", "weight"), ("gaussian_blur", "sigma")]:
        for variant in (name, name + "+debias"):
            assert strong[variant]["params"][param] > weak[variant]["params"][param], variant


def test_tuning_is_cached_per_noise_and_data_version(builtin, capsys):
    train = builtin[0]
    first = tune_baselines(train, CODE, methods=["total_variation"])
    assert "tuning baselines (total_variation)" in capsys.readouterr().err
    [path] = (state_dir() / "baselines").glob("*.json")
    written = path.stat().st_mtime_ns
    assert tune_baselines(train, CODE, methods=["total_variation"]) == first
    assert capsys.readouterr().err == "" and path.stat().st_mtime_ns == written  # read, not tuned again
    assert json.loads(path.read_text())["tuned"]["total_variation"]["params"] == first["total_variation"]["params"]

    tune_baselines(train, CODE, methods=["total_variation", "gaussian_blur"])  # only the new method is tuned
    assert "tuning baselines (gaussian_blur)" in capsys.readouterr().err
    assert {"total_variation", "gaussian_blur"} <= set(json.loads(path.read_text())["tuned"])

    tune_baselines(train.subset(np.arange(40)), CODE, methods=["total_variation"])  # other data: tuned afresh
    assert "tuning" in capsys.readouterr().err
    assert len(list((state_dir() / "baselines").glob("*.json"))) == 2


def test_best_variants_keep_one_per_method_the_one_better_on_the_training_slices(builtin):
    train, held_out = builtin
    few = held_out.subset(np.arange(8))
    every = baseline_scores(few, REPORT, SEED, tune_on=train, methods=["total_variation", "gaussian_blur"])
    best = baseline_scores(few, REPORT, SEED, tune_on=train, methods=["total_variation", "gaussian_blur"],
                           variants="best")  # fmt: skip
    assert set(best["baselines"]) == {"total_variation+debias", "gaussian_blur+debias"}  # clipped: debias wins
    assert best["baselines"]["total_variation+debias"]["psnr"] == every["baselines"]["total_variation+debias"]["psnr"]
    assert best["best_baseline"] == every["best_baseline"]
    with pytest.raises(ValueError, match="variants"):
        baseline_scores(few, REPORT, SEED, tune_on=train, variants="some")


def test_unclipped_noise_has_no_debias_variant(builtin):
    train, held_out = builtin
    noise = NoiseConfig(variance=0.04, clip=False)
    few = held_out.subset(np.arange(8))
    results = baseline_scores(few, noise, SEED, tune_on=train, methods=["gaussian_blur"])["baselines"]
    assert set(results) == {"gaussian_blur"} and results["gaussian_blur"]["debias"] is False


def test_bm3d_beats_the_noisy_input(builtin):
    pytest.importorskip(
        "bm3d", reason="bm3d is optional (non-commercial licence): pip install 'mri-platform[baselines]'"
    )
    clean = torch.from_numpy(builtin[1].images[[5, 30]]).unsqueeze(1)
    noisy = fixed_noisy(clean, CODE, SEED)
    bm3d = baselines.METHODS["bm3d"]
    outputs = [bm3d.apply(image[0].double().numpy(), CODE.std, CODE.std) for image in noisy]  # ~0.4 s each

    def psnr(images):
        return score(torch.from_numpy(np.stack(images)).float().unsqueeze(1), clean)["psnr"]

    plain, debiased = psnr([np.clip(o, 0, 1) for o in outputs]), psnr([invert_bias(o, CODE) for o in outputs])
    assert plain > score(noisy, clean)["psnr"] + 3
    assert debiased > plain


def test_without_bm3d_it_is_skipped_with_the_reason_and_the_others_run(builtin, monkeypatch):
    monkeypatch.setitem(sys.modules, "bm3d", None)  # `import bm3d` now raises ImportError
    train, held_out = builtin
    few = held_out.subset(np.arange(4))
    outcome = baseline_scores(few, CODE, SEED, tune_on=train, methods=["bm3d", "gaussian_blur"])
    assert set(outcome["baselines"]) == {"gaussian_blur", "gaussian_blur+debias", "bm3d"}
    assert "pip install 'mri-platform[baselines]'" in outcome["baselines"]["bm3d"]["skipped"]
    assert outcome["best_baseline"] in ("gaussian_blur", "gaussian_blur+debias")


def test_bad_requests_say_what_to_do(builtin):
    with pytest.raises(ValueError, match="choose from gaussian_blur"):
        tune_baselines(builtin[0], CODE, methods=["median"])
    with pytest.raises(ValueError, match="variance"):
        tune_baselines(builtin[0], NoiseConfig(variance=0.0), methods=["gaussian_blur"])


def test_the_module_needs_no_ray_mlflow_or_bentoml():
    code = "import sys, mri_platform.baselines; print(sorted({'ray', 'mlflow', 'bentoml'} & set(sys.modules)))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
