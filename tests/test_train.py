"""Training on a real local Ray cluster (one per module), tracked in a real MLflow store."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3
import psutil
import pytest
import torch
from helpers import tiny_config

from mri_platform import tracking
from mri_platform.checkpoints import load_checkpoint
from mri_platform.train import fit

pytestmark = pytest.mark.slow


def tiny(tmp_path, **overrides):
    """A small but real run: a narrow autoencoder on the built-in MRI slices, two CPU workers."""
    return tiny_config(tmp_path, **overrides)


def test_two_workers_train_log_checkpoint_and_register(local_ray, tmp_path):
    config = tiny(tmp_path, epochs=3)
    result = fit(config)

    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert result.history[-1]["val_psnr"] > result.history[0]["val_psnr"]  # it learns
    assert result.metrics["psnr"] > result.metrics["noisy_psnr"] + 3  # it denoises
    assert result.registered_version == "1"

    client = tracking.client(config.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["workers"] == "2" and run.data.params["noise_variance"] == "0.2"
    assert int(run.data.params["num_parameters"]) > 0
    assert {"val_psnr", "val_ssim", "val_mse", "images_per_s", "final_psnr"} <= set(run.data.metrics)
    artifacts = [a.path for a in client.list_artifacts(result.run_id, "figures")]
    assert artifacts == ["figures/comparison.png"]
    version = client.get_model_version("mri-denoiser", "1")
    assert version.tags["model_kind"] == "ae1" and "var=0.2" in version.tags["noise"]

    model, meta = load_checkpoint(result.checkpoint_path)  # describes itself: nothing else needed
    assert meta["model"]["filters"] == 8 and meta["noise"]["variance"] == 0.2
    assert meta["data"]["n_train"] > 100 and len(meta["data"]["fingerprint_train"]) == 12
    assert meta["epoch"] == result.metrics["best_epoch"] and "optimizer" in meta
    assert model(torch.rand(2, 1, 64, 64)).shape == (2, 1, 64, 64)


def test_a_unet_learns_from_patches_of_native_slices_and_applies_at_any_size(local_ray, tmp_path):
    config = tiny(tmp_path, model="unet", filters=16, epochs=3, steps_per_epoch=6, size="native", patch=32,
                  registered_model="")  # fmt: skip
    result = fit(config)

    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    lrs = [h["lr"] for h in result.history]
    assert lrs[0] > lrs[-1]  # cosine decay, stepped per optimiser step
    assert result.history[-1]["images_per_s"] > 0 and result.metrics["psnr"] > result.metrics["noisy_psnr"] + 3
    model, meta = load_checkpoint(result.checkpoint_path)
    assert meta["data"]["size"] == "native" and meta["data"]["patch"] == 32
    assert meta["model"]["architecture"] == "unet" and "scheduler" in meta
    assert model(torch.rand(1, 1, 91, 75)).shape == (1, 1, 91, 75)
    params = tracking.client(config.tracking_uri).get_run(result.run_id).data.params
    assert (params["patch"], params["image_size"], params["schedule"]) == ("32", "native", "cosine")


def test_resume_continues_from_the_last_checkpoint(local_ray, tmp_path):
    first = fit(tiny(tmp_path, epochs=2, run_name="resumable", registered_model=""))
    second = fit(tiny(tmp_path, epochs=4, run_name="resumable", resume=True, registered_model=""))
    assert second.run_id == first.run_id  # the same MLflow run goes on
    steps = [h["epoch"] for h in second.history]
    assert steps == [1, 2, 3, 4]  # epochs 1-2 from the first call, 3-4 from the resumed one


def _train_workers() -> list[psutil.Process]:
    found = []
    for process in psutil.Process().children(recursive=True):
        try:  # a child that exited (a zombie not yet reaped, a server a previous test stopped) has no command line
            if "RayTrainWorker" in " ".join(process.cmdline()):
                found.append(process)
        except psutil.Error:
            continue
    return found


def test_a_killed_worker_is_replaced_and_the_run_finishes(local_ray, tmp_path):
    # Epochs of several seconds, longer than the controller's 2 s poll: a kill mid-epoch then costs that epoch only.
    config = tiny(tmp_path, epochs=6, steps_per_epoch=30, registered_model="")
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.setdefault("result", fit(config)))
    thread.start()
    deadline = time.monotonic() + 300  # a loaded 2-core machine takes minutes to start the group
    killed = None
    while time.monotonic() < deadline and killed is None:
        time.sleep(0.5)
        runs = tracking.client(config.tracking_uri).search_runs(
            [tracking.experiment_id(config.tracking_uri, config.experiment)]
        )
        logged = runs and tracking.client(config.tracking_uri).get_metric_history(runs[0].info.run_id, "val_psnr")
        workers = _train_workers()
        if logged and workers:
            killed = workers[-1]
            killed.kill()  # a process this test's Ray cluster started
    thread.join(timeout=300)
    assert killed is not None, "no training worker was seen to kill"
    assert "result" in outcome, "the run did not survive the lost worker"
    result = outcome["result"]
    client = tracking.client(config.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    for key in tracking.EPOCH_METRICS:  # the redone epoch replaced its points: one per epoch, none lost
        assert sorted(m.step for m in client.get_metric_history(result.run_id, key)) == [1, 2, 3, 4, 5, 6], key


NO_CUDA = "needs a CUDA GPU (NCCL, mixed precision, pinned batches); none on this machine"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize(
    ("model", "precision", "workers"),
    [("ae1", "auto", 1), ("unet", "fp16", 1), pytest.param("unet", "auto", 2, id="unet-2gpus")],
)
def test_a_whole_run_on_gpus_with_nccl(local_ray, tmp_path, model, precision, workers):
    """Ray Train with use_gpu end to end: NCCL, autocast (fp16 with a GradScaler), loader processes, the epoch's
    all-reduce on the device, checkpoint, scoring."""
    if torch.cuda.device_count() < workers:
        pytest.skip(f"needs {workers} GPUs, this machine has {torch.cuda.device_count()}")
    patches = {"size": "native", "patch": 32, "steps_per_epoch": 6} if model == "unet" else {}
    config = tiny(tmp_path, model=model, gpu=True, workers=workers, precision=precision, registered_model="",
                  **patches)  # fmt: skip
    result = fit(config)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert result.metrics["psnr"] > result.metrics["noisy_psnr"] + 3
    assert load_checkpoint(result.checkpoint_path)[1]["train"]["gpu"] is True


def test_missing_resources_are_waited_for_then_refused_naming_them(local_ray, capsys):
    from mri_platform.cluster import init_ray

    assert init_ray({"CPU": 1}, workers=2)["CPU"] == 2  # fits: no wait
    started = time.monotonic()
    with pytest.raises(RuntimeError, match=r"8 CPU \(the cluster has 2\) after waiting 2 s: lower --workers"):
        init_ray({"CPU": 1}, workers=8, wait_s=2, what="8 workers")
    assert time.monotonic() - started >= 2
    assert "waiting up to 2 s for the cluster to hold 8 workers: 8 CPU (the cluster has 2)" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match=r"1 GPU \(the cluster has 0\): run without --gpu") as refused:
        init_ray({"CPU": 1, "GPU": 1}, wait_s=0)
    assert "waiting" not in str(refused.value)


def test_checkpoints_on_a_real_s3_server(local_ray, tmp_path, s3_server, monkeypatch):
    bucket = s3_server.extra["bucket"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.extra["access_key"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.extra["secret_key"])
    result = fit(tiny(tmp_path, storage=f"s3://{bucket}/checkpoints", registered_model=""))

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.url,
        aws_access_key_id=s3_server.extra["access_key"],
        aws_secret_access_key=s3_server.extra["secret_key"],
        region_name="us-east-1",
    )
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="checkpoints/")["Contents"]]
    assert any(k.startswith(f"checkpoints/{result.run_name}/") and k.endswith("checkpoint.pt") for k in keys)
    assert result.metrics["psnr"] > result.metrics["noisy_psnr"]


def test_tracking_to_a_real_mlflow_server(local_ray, tmp_path, mlflow_server):
    result = fit(tiny(tmp_path, tracking_uri=mlflow_server.url, registered_model="server-denoiser"))
    client = tracking.client(mlflow_server.url)
    assert len(client.get_metric_history(result.run_id, "val_psnr")) == 2
    assert client.get_model_version("server-denoiser", result.registered_version).tags["model_kind"] == "ae1"
    assert [a.path for a in client.list_artifacts(result.run_id, "figures")] == ["figures/comparison.png"]


def test_job_submitted_to_a_real_ray_head(tmp_path, ray_head):
    out = tmp_path / "job.json"
    root = Path(__file__).resolve().parents[1]
    command = [
        str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", ray_head.url,
        "--working-dir", ".", "--",
        "python", "-m", "mri_platform", "train", "--model", "ae1", "--filters", "8", "--epochs", "2", "--lr", "0.003",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", "--storage", str(tmp_path / "ckpt"),
        "--json", str(out),
    ]  # fmt: skip
    env = {**os.environ, **ray_head.extra.get("env", {})}
    # As the README shows: from the repository root, which Ray uploads (minus .gitignore'd paths) as the job's cwd.
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "epoch   2/2" in done.stdout
    report = json.loads(out.read_text())
    assert report["registered_version"] == "1" and report["psnr"] > report["noisy_psnr"]
