"""Ray Tune over Ray Train on a real local Ray cluster, with nested MLflow runs and promotion."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from mri_platform import supervisor, tracking
from mri_platform.data import load_builtin
from tuning.search import PRESET_DIR, SearchConfig, _concurrency, build_search, run_search

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_search_preset_builds(preset):
    config = build_search(preset)
    assert config.samples >= 1 and config.epochs[0] <= config.epochs[1]


def test_default_space_covers_the_zoo_with_a_width_range_per_model_and_the_reports_epochs():
    from ray import tune

    from tuning.search import parse_candidate

    config = SearchConfig()
    assert config.epochs == (50, 70)
    candidates = config.candidates()
    assert {"unet:8", "unet:16", "unet:24", "dncnn:64", "ae1:64"} <= set(candidates)
    assert {parse_candidate(c)[0] for c in candidates} == {"unet", "dncnn", "ae1"}
    assert SearchConfig(models=["ae1", "ae2"], filters=[64, 256]).candidates() == ["ae1:64", "ae1:256", "ae2:64",
                                                                                  "ae2:256"]  # fmt: skip
    space = config.space()
    assert isinstance(space["model"], tune.search.sample.Categorical)
    samples = [space["epochs"].sample() for _ in range(200)]
    assert min(samples) >= 50 and max(samples) <= 70 and 70 in samples  # the upper bound is inclusive


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epochs": (10, 5)}, "epoch range"),
        ({"scheduler": "pbt"}, "scheduler"),
        ({"reduction_factor": 1}, "reduction"),
        ({"models": ["resnet"]}, "models must be among"),
    ],  # fmt: skip
)
def test_bad_search_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**kwargs)


def test_fractional_gpus_pack_one_worker_trials_but_not_the_ranks_of_one_trial():
    assert SearchConfig(workers_per_trial=1, gpus_per_worker=0.25).gpus_per_worker == 0.25
    with pytest.raises(ValueError, match="NCCL cannot run two ranks of a trial on one GPU"):
        SearchConfig(workers_per_trial=2, gpus_per_worker=0.5)


def test_trials_are_sized_to_what_the_cluster_holds():
    from mri_platform.config import TrainConfig

    train = TrainConfig(workers=2)
    assert _concurrency(SearchConfig(workers_per_trial=1, samples=8), train, {"CPU": 2}) == 2
    assert _concurrency(SearchConfig(workers_per_trial=2, max_concurrent=4, samples=8), train, {"CPU": 2}) == 1
    with pytest.raises(RuntimeError, match="one trial needs 4 CPUs"):
        _concurrency(SearchConfig(workers_per_trial=4), train, {"CPU": 2})
    with pytest.raises(RuntimeError, match="GPUs"):
        _concurrency(SearchConfig(workers_per_trial=1, gpus_per_worker=1), train, {"CPU": 8, "GPU": 0})


@pytest.fixture
def local_ray():
    """run_search starts its own local cluster (with the dashboard Ray Train's cleanup needs); stop it after."""
    import ray

    yield
    ray.shutdown()


SMALL = {"epochs": (4, 4), "lr": (2e-3, 2e-3), "grace_period": 1, "reduction_factor": 2, "workers_per_trial": 1}


@pytest.mark.slow
def test_sweep_stops_bad_trials_nests_runs_and_crowns_the_best(local_ray, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Width 2 is hopeless next to 32; one trial at a time makes ASHA's decisions follow the seeded order.
    search = SearchConfig(models=["ae1"], filters=[2, 32], samples=4, max_concurrent=1, search="random", seed=3,
                          **SMALL)  # fmt: skip
    gate = load_builtin(64)[1].subset(np.arange(8))  # the champion gate scores on these, not the trials' own split
    summary = run_search(search, {"tracking_uri": uri, "storage": str(tmp_path / "ckpt")}, name="sweep-a",
                         gate_slices=gate)  # fmt: skip

    assert summary["n_trials"] == 4 and summary["n_failed"] == 0
    assert summary["n_stopped_early"] >= 1
    stopped = [t for t in summary["trials"] if t["stopped_early"]]
    assert all(t["epochs_run"] < 4 for t in stopped)
    assert summary["best_config"]["filters"] == 32 and summary["best_config"]["model"] == "ae1"
    assert summary["champion_version"] == summary["registered_version"] == "1"  # no champion before: it takes it
    assert summary["promotion"]["n_images"] == 8  # scored on the 8 gate slices, not the trial's 59
    assert abs(summary["promotion"]["scores"]["1"]["psnr"] - summary["best_scores"]["psnr"]) > 1e-6

    client = tracking.client(uri)
    parent = client.get_run(summary["parent_run_id"])
    assert parent.data.params["filters"] == "[2, 32]" and parent.data.metrics["n_trials"] == 4
    nested = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{summary['parent_run_id']}'"
    )
    assert len(nested) == 4
    reasons = sorted(r.data.tags["stop_reason"] for r in nested)
    assert any(r.startswith("stopped early") for r in reasons) and any(r.startswith("completed") for r in reasons)
    assert all(len(client.get_metric_history(r.info.run_id, "val_psnr")) >= 1 for r in nested)


def _nested_finished(uri: str) -> int:
    """Trial runs (nested under a sweep) that completed."""
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name("mri-denoising")
    if experiment is None:
        return 0
    finished = client.search_runs([experiment.experiment_id], filter_string="attributes.status = 'FINISHED'")
    return sum("mlflow.parentRunId" in r.data.tags for r in finished)


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_where_it_stopped(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [sys.executable, "-m", "mri_platform", "tune", "--models", "ae1", "--filters", "8", "--epochs", "3-3",
            "--lr", "0.002,0.002",
            "--samples", "3", "--workers-per-trial", "1", "--max-concurrent", "1", "--scheduler", "fifo",
            "--tracking-uri", uri, "--storage", str(tmp_path / "ckpt"), "--name", "sweep-r"]  # fmt: skip
    env = {**os.environ, "MRI_PLATFORM_HOME": str(tmp_path / "state")}
    first = supervisor.spawn("sweep", args, tmp_path, env=env, cwd=ROOT, url="")
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and _nested_finished(uri) < 1 and supervisor.is_running(first):
            time.sleep(1)
        assert supervisor.is_running(first), "the sweep ended before it could be interrupted"
        supervisor.send_signal(first, signal.SIGINT)  # as Ctrl-C would: Tune saves its state and exits
        supervisor.wait_exit(first, 90)
    finally:
        supervisor.stop(first)  # what did not exit by itself
    done_before = _nested_finished(uri)
    assert 1 <= done_before < 3

    out = tmp_path / "resumed.json"
    resumed = subprocess.run([*args, "--resume", "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=400)  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["n_trials"] == 3 and summary["n_failed"] == 0
    # Every trial ran to its last epoch. Counted in the trials' own MLflow runs: Tune's table of a trial that was
    # interrupted mid-run holds only what it reported after the resume (its Train run goes on from a checkpoint).
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name("mri-denoising").experiment_id
    trials = [r for r in client.search_runs([experiment]) if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 3 and all(r.info.status == "FINISHED" for r in trials)
    assert all(max(m.step for m in client.get_metric_history(r.info.run_id, "val_psnr")) == 3 for r in trials)
    parents = tracking.client(uri).search_runs(
        [tracking.client(uri).get_experiment_by_name("mri-denoising").experiment_id],
        filter_string="tags.sweep_name = 'sweep-r'",
    )
    assert len(parents) == 1  # the same parent run went on


@pytest.mark.slow
def test_tune_job_submitted_to_a_real_ray_head(tmp_path, ray_head):
    out = tmp_path / "tune.json"
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.url, "--working-dir", ".",
        "--", "python", "-m", "mri_platform", "tune", "--models", "unet,ae1", "--filters", "8", "--epochs", "2-2",
        "--lr", "0.002,0.002",
        "--samples", "2", "--workers-per-trial", "1", "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--storage", str(tmp_path / "ckpt"), "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, **ray_head.extra.get("env", {})}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(out.read_text())
    assert summary["n_trials"] == 2 and summary["champion_version"] == "1"
    assert {t["model"] for t in summary["trials"]} <= {"unet", "ae1"} and summary["best_config"]["model"]
