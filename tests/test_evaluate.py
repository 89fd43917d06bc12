"""`evaluate` and `promote` on real MRI slices, through the command line, with a sqlite MLflow registry."""

import json
import shutil
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from helpers import DESCRIBE, register, train_plainly
from PIL import Image
from typer.testing import CliRunner

from mri_platform import baselines, tracking
from mri_platform.checkpoints import save_checkpoint
from mri_platform.cli import app
from mri_platform.data import load_builtin
from mri_platform.models import DenoisingAutoencoder

runner = CliRunner()


@pytest.fixture(scope="module")
def trained():
    return train_plainly(steps=150)


@pytest.fixture(scope="module")
def checkpoint(trained, tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt", trained, **DESCRIBE)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """Real held-out MRI slices written as the Kaggle layout: yes/ and no/, gray and RGB, different sizes."""
    folder = tmp_path_factory.mktemp("kaggle")
    held_out = load_builtin()[1]
    for i, image in enumerate(held_out.images[:12]):
        picture = Image.fromarray((image * 255).astype(np.uint8))
        sub = folder / ("yes" if i % 2 else "no")
        sub.mkdir(exist_ok=True)
        if i % 3 == 0:
            picture.convert("RGB").resize((200, 180)).save(sub / f"scan{i}.jpg", quality=95)
        else:
            picture.save(sub / f"scan{i}.png")
    (folder / "no" / "broken.png").write_bytes(b"not a png at all")
    return folder


def test_evaluate_a_checkpoint_on_a_png_folder_with_baselines(checkpoint, png_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(baselines, "TUNING_SLICES", 4)  # tuned on the training split, once per (fresh) state folder
    monkeypatch.setitem(sys.modules, "bm3d", None)  # as without the optional install (BM3D: tests/test_baselines.py)
    out, figure = tmp_path / "eval.json", tmp_path / "fig.png"
    result = runner.invoke(
        app,
        ["evaluate", "--model-uri", str(checkpoint), "--data", str(png_folder), "--baselines",
         "--figure", str(figure), "--json", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n_images"] == 12
    assert report["noise"]["variance"] == 0.2 and report["noise"]["clip"] is True
    assert report["psnr"] > report["noisy_psnr"] + 5
    skipped = report["baselines"].pop("bm3d")
    assert "pip install" in skipped["skipped"]
    methods = ("gaussian_blur", "total_variation", "nl_means")
    assert set(report["baselines"]) == {m + v for m in methods for v in ("", "+debias")}
    assert all(b["psnr"] > report["noisy_psnr"] for b in report["baselines"].values())
    best = report["best_baseline"]
    assert report["baselines"][best]["psnr"] == max(b["psnr"] for b in report["baselines"].values())
    assert best.endswith("+debias")  # the clipping-aware variant wins at the report's clipped noise
    assert any("broken.png" in path for path, _ in report["skipped"])
    assert figure.stat().st_size > 10_000
    assert best in result.output and "<- best baseline" in result.output and "bm3d: skipped" in result.output


def test_evaluate_on_a_nifti_volume_at_the_codes_noise_std(checkpoint, tmp_path):
    volume = tmp_path / "example4d.nii.gz"
    shutil.copy(resources.files("nibabel") / "tests/data/example4d.nii.gz", volume)
    out = tmp_path / "eval.json"
    args = ["evaluate", "--model-uri", str(checkpoint), "--data", str(volume), "--noise-std", "0.2", "--json", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["noise"]["variance"] == pytest.approx(0.04)
    assert report["n_images"] > 10 and report["noisy_psnr"] > 15  # weaker noise than the report's
    assert report["data_source"].endswith("example4d.nii.gz") or "nifti" in report["data_source"]


def test_fixed_noise_makes_evaluation_repeatable(checkpoint, tmp_path):
    reports = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.json"
        runner.invoke(app, ["evaluate", "--model-uri", str(checkpoint), "--json", str(out)])
        reports.append(json.loads(out.read_text()))
    assert reports[0]["psnr"] == reports[1]["psnr"] and reports[0]["n_images"] == 59


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model-uri", "/nowhere/checkpoint.pt"], "neither an existing checkpoint"),
        (["--data", "/nowhere/images"], "/nowhere/images"),
        (["--noise-std", "0.2", "--noise-variance", "0.2"], "not both"),
    ],
)
def test_evaluate_bad_input_says_what_was_wrong(checkpoint, args, message):
    args = ["evaluate", *(["--model-uri", str(checkpoint)] if "--model-uri" not in args else []), *args]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.output


def test_promote_moves_champion_only_to_a_better_model(trained, tmp_path, monkeypatch):
    monkeypatch.setenv("MRI_PLATFORM_HOME", str(tmp_path / "state"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    untrained = DenoisingAutoencoder(filters=16).eval()
    weak = register(uri, untrained, tmp_path, "weak")
    strong = register(uri, trained, tmp_path, "strong")

    def promote(version):
        out = tmp_path / f"promote-{version}.json"
        args = ["promote", "--name", "reg-test", "--version", version, "--tracking-uri", uri, "--json", str(out)]
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
        return json.loads(out.read_text())

    first = promote(weak)
    assert first["promoted"] and first["champion"] == weak  # no champion yet: the first candidate takes it
    second = promote(strong)
    assert second["promoted"] and second["champion"] == strong
    assert second["scores"][strong]["psnr"] > second["scores"][weak]["psnr"]
    third = promote(weak)
    assert not third["promoted"] and "does not beat" in third["reason"]
    assert tracking.champion_version(uri, "reg-test") == strong


def test_a_registered_model_loads_without_unpickling(trained, tmp_path, monkeypatch, caplog):
    """The registry holds source code and a weights-only checkpoint, never a pickle: loading a tampered champion
    cannot run code. MLflow's pickle warning is gone; the model loads and denoises as the trained network does."""
    import logging

    import mlflow
    import torch

    from mri_platform.evaluate import load_model

    monkeypatch.setenv("MRI_PLATFORM_HOME", str(tmp_path / "state"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with caplog.at_level(logging.WARNING):
        version = register(uri, trained, tmp_path, "weights-only")
    assert not [r.getMessage() for r in caplog.records if "pickle" in r.getMessage().lower()]

    mlflow.set_tracking_uri(uri)
    local = mlflow.artifacts.download_artifacts(f"models:/reg-test/{version}", dst_path=str(tmp_path / "model"))
    files = sorted(p.relative_to(local).as_posix() for p in Path(local).rglob("*") if p.is_file())
    assert "artifacts/checkpoint.pt" in files and "logged_model.py" in files  # the weights, and the code as source
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pth", ".cloudpickle"))], files
    flavors = mlflow.models.Model.load(local).flavors
    assert set(flavors) == {"python_function"}  # no pytorch flavor, whose model is a pickled module
    assert flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"

    batch = load_builtin()[1].images[:3, None].astype(np.float32)
    with torch.inference_mode():
        expected = trained(torch.from_numpy(batch)).numpy()
    served = mlflow.pyfunc.load_model(f"models:/reg-test/{version}").predict(batch)
    np.testing.assert_allclose(served, expected, atol=1e-5)
    model, meta = load_model(f"models:/reg-test/{version}", uri)  # what `evaluate`, `promote` and `build` use
    assert meta["format"] == "mri-platform/checkpoint-v1"
    with torch.inference_mode():
        np.testing.assert_allclose(model(torch.from_numpy(batch)).numpy(), expected, atol=1e-5)
