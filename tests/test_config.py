import pytest

from mri_platform.config import PRESET_DIR, TrainConfig, build_config, load_preset


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
@pytest.mark.parametrize("model", ["ae1", "ae2", "unet", "dncnn"])
def test_every_shipped_preset_builds_a_valid_config(preset, model):
    config = build_config(preset, model=model)
    assert config.num_epochs >= 1
    assert config.noise.variance == 0.2 and config.noise.clip


def test_report_preset_is_the_reports_recipe():
    ae1, ae2 = build_config("report", model="ae1"), build_config("report", model="ae2")
    assert (ae1.num_epochs, ae2.num_epochs) == (50, 70)
    assert ae1.batch_size == 32 and ae1.lr == 1e-3
    assert ae1.model_config.filters == 64 and ae2.model_config.filters == 256


def test_defaults_follow_the_report_and_overrides_win():
    assert TrainConfig(model="ae2").num_epochs == 70
    config = build_config("demo", model="ae1", epochs=3, workers=1)
    assert (config.num_epochs, config.workers, config.worker_batch_size) == (3, 1, 32)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers"),
        ({"batch_size": 1, "workers": 2}, "batch size"),
        ({"precision": "fp8"}, "precision"),
        ({"precision": "fp16"}, "fp16 needs --gpu"),
        ({"resume": True}, "resume needs the run name"),
        ({"model": "vae"}, "unknown model"),
        ({"planes": ("oblique",)}, "planes"),
        ({"size": "native"}, "give --patch"),
        ({"size": 32, "patch": 48}, "larger than"),
        ({"schedule": "step"}, "schedule"),
        ({"steps_per_epoch": 0}, "steps_per_epoch"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"model": "unet", "depth": 0, "filters": 8, "size": 4}, "size"),
        ({"gpu": True, "workers": 2, "gpus_per_worker": 0.5}, "NCCL cannot run two ranks on one GPU"),
        ({"loader_workers": -1}, "loader_workers"),
        ({"wait_for_resources": -1.0}, "wait_for_resources"),
    ],
)
def test_invalid_settings_are_refused_with_a_reason(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_unknown_preset_and_unknown_fields_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no preset"):
        load_preset("nonexistent")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochz: 3\n")
    with pytest.raises(ValueError, match="unknown fields"):
        load_preset(str(bad))


def test_presets_resolve_per_model_values_and_the_residual_nets_default_to_their_recipe():
    unet, ae1 = build_config("demo", model="unet"), build_config("demo", model="ae1")
    assert (unet.size, unet.patch, unet.lr_schedule, unet.augment_intensity) == ("native", 64, "cosine", True)
    assert (ae1.size, ae1.patch, ae1.lr_schedule, ae1.augment_intensity) == (64, None, "constant", False)
    assert build_config(None, model="ae1", schedule="cosine").lr_schedule == "cosine"  # an explicit choice wins
    assert (unet.max_grad_norm, ae1.max_grad_norm) == (1.0, None)  # the report's models keep the report's recipe
    assert build_config(None, model="unet", grad_clip=0).max_grad_norm is None


def test_a_per_model_value_keyed_by_an_unknown_model_is_refused(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: {unet: 3, resnet: 4}\n")
    with pytest.raises(ValueError, match="keyed by"):
        build_config(str(bad), model="unet")


def test_fractional_gpus_are_refused_at_the_command_line_before_ray_starts():
    from typer.testing import CliRunner

    from mri_platform.cli import app

    result = CliRunner().invoke(app, ["train", "--gpu", "--workers", "2", "--gpus-per-worker", "0.5"])
    assert result.exit_code == 2
    assert "NCCL cannot run two ranks on one GPU" in result.output and "--gpus-per-worker 1" in result.output
    # one worker may share a GPU (its own process group), and whole GPUs may be shared by nobody
    assert TrainConfig(gpu=True, workers=1, gpus_per_worker=0.25).gpus_per_worker == 0.25
    assert TrainConfig(gpu=True, workers=4, gpus_per_worker=1).workers == 4


def test_loader_workers_prepare_batches_on_a_gpu_and_stay_out_of_the_way_on_cpus():
    config = TrainConfig(cpus_per_worker=4)
    assert (config.data_workers("cuda"), config.data_workers("cpu")) == (4, 0)
    assert TrainConfig(loader_workers=2).data_workers("cpu") == 2
