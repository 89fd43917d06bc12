"""The plain-PyTorch training logic (steps, pipeline, models, noise, metrics) on its own: no Ray, MLflow, BentoML or
nibabel, as on a bare CUDA machine; and its epoch under a real (gloo) process group."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

from mri_platform.heap import libc, training_worker_env
from mri_platform.models import ModelConfig, build_model
from mri_platform.noise import NoiseConfig, fixed_noisy
from mri_platform.pipeline import SliceDataset, make_loader
from mri_platform.steps import Step, autocast_dtype, lr_schedule, run_epoch

ROOT = Path(__file__).resolve().parents[1]
LIGHT = ["mri_platform.models", "mri_platform.noise", "mri_platform.metrics", "mri_platform.pipeline",
         "mri_platform.steps"]  # fmt: skip
# What a bare CUDA machine (Python, torch, numpy, scipy, scikit-image, pyarrow) lacks: importing any of it fails there.
BLOCKED = ["ray", "mlflow", "bentoml", "nibabel", "nilearn", "dipy", "torchvision", "yaml", "typer", "matplotlib",
           "optuna", "boto3"]  # fmt: skip
BLOCKER = textwrap.dedent(f"""
    import sys

    class Absent:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {BLOCKED!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on a bare CUDA machine)")

    sys.meta_path.insert(0, Absent())
""")


def _blocked_python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)  # fmt: skip


def test_the_training_logic_imports_without_ray_mlflow_bentoml_or_nibabel():
    done = _blocked_python(f"""
        import importlib
        for name in {LIGHT!r}:
            importlib.import_module(name)
        try:
            import ray  # noqa: F401
        except ModuleNotFoundError:
            print("imported; ray is blocked")
    """)
    assert done.returncode == 0, done.stderr
    assert "imported; ray is blocked" in done.stdout


def test_a_cpu_worker_reuses_each_training_steps_memory(monkeypatch):
    """`prepare_device` on a CPU (what every Ray Train worker calls) keeps a step's activations and gradients in
    glibc's heap for the next step: with glibc's own thresholds each AE1 step of 16 slices mapped and zeroed its
    big arrays afresh (thousands of page faults a step; 1.2-1.3x slower alone, 1-worker runs). The steps run in a
    thread, as Ray Train runs them, in a process started with the environment `fit` gives its CPU workers (one malloc
    arena: in a thread's own arena, 3 processes in 8 still faulted 2,500-24,000 times a step; with one arena, 0-1,636).
    Each setting runs in
    processes of their own, since malloc settings last for the process; the kept setting three times, as that
    failure came by the luck of the arena's layout."""
    code = textwrap.dedent("""
        import resource, sys, threading, torch
        from mri_platform.models import ModelConfig, build_model
        from mri_platform.noise import NoiseConfig
        from mri_platform.steps import prepare_device, train_step
        def train():
            prepare_device(torch.device("cpu"))
            torch.set_num_threads(1)
            torch.manual_seed(0)
            model = build_model(ModelConfig.named("ae1"))
            optimizer = torch.optim.Adam(model.parameters(), 1e-3)
            clean, generator = torch.rand(16, 1, 64, 64), torch.Generator().manual_seed(0)
            for _ in range(3):
                train_step(model, clean, optimizer, NoiseConfig(), generator, None)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            for _ in range(5):
                train_step(model, clean, optimizer, NoiseConfig(), generator, None)
            print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
        worker = threading.Thread(target=train)
        worker.start()
        worker.join()
    """)
    if libc() is None:
        pytest.skip("the C library is not glibc: no mallopt")
    faults = {}
    for malloc, runs in (("", 3), ("default", 1)):
        monkeypatch.setenv("MRI_PLATFORM_MALLOC", malloc)
        env = {**os.environ, **training_worker_env()}
        assert ("MALLOC_ARENA_MAX" in env) == (malloc == ""), env.get("MALLOC_ARENA_MAX")
        for _ in range(runs):
            done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            assert done.returncode == 0, done.stderr
            faults.setdefault(malloc, []).append(float(done.stdout.split()[-1]))
    assert max(faults[""]) < faults["default"][0] / 10, faults  # measured: 0-1,636 against ~36,600 a step


def test_the_gpu_benchmark_runs_on_the_light_modules_alone(tmp_path):
    slices = tmp_path / "slices.npy"
    np.save(slices, np.random.default_rng(0).random((24, 32, 32), dtype=np.float32))
    done = _blocked_python(
        """
        import runpy, sys
        sys.argv = ["gpu_train.py", *sys.argv[1:]]
        runpy.run_path("benchmarks/gpu_train.py", run_name="__main__")
        """,
        *["--slices", str(slices), "--quick", "--cpu", "--models", "ae1,unet", "--patch", "16"],
    )
    assert done.returncode == 0, done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines() if line.startswith(("ae1", "unet"))}
    assert set(rows) == {"ae1", "unet"} and all(float(row[1]) > 0 and float(row[2]) > 0 for row in rows.values())
    assert rows["ae1"][-3:] == ["off", "(no", "torchvision)"]  # the affine augmentation needs torchvision
    assert "all-reduced its sums on cpu under gloo: ok" in done.stdout


@pytest.fixture
def process_group(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(29600 + os.getpid() % 1000))
    dist.init_process_group("gloo", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_an_epoch_trains_validates_and_all_reduces_its_sums(process_group):
    torch.manual_seed(0)
    images = np.random.default_rng(0).random((16, 16, 16), dtype=np.float32)
    model = build_model(ModelConfig.named("ae1", 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = make_loader(SliceDataset(images, patch=16, length=32), 8, device=torch.device("cpu"))
    step = Step(optimizer, lr_schedule(optimizer, "cosine", 2 * len(loader)), NoiseConfig(), torch.device("cpu"))
    clean = torch.from_numpy(images[:4]).unsqueeze(1)
    val = [(clean, fixed_noisy(clean, NoiseConfig(), 1))]

    first = run_epoch(model, loader, step, val, seed=0, epoch=1)
    second = run_epoch(model, loader, step, val, seed=0, epoch=2)
    assert first["epoch"] == 1 and second["epoch"] == 2
    assert 0 < second["train_loss"] < first["train_loss"]  # all-reduced mean of the steps' losses
    assert second["val_psnr"] > 0 and 0 < second["val_ssim"] <= 1 and second["images_per_s"] > 0
    assert second["lr"] < first["lr"]  # the schedule stepped per optimiser step


def test_bf16_on_a_gpu_without_it_is_refused_and_auto_falls_back_to_fp16(monkeypatch):
    """The decision only (no GPU here; torch.cuda is asked about bf16 and the name, nothing runs on a device)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    cuda = torch.device("cuda", 0)
    with pytest.raises(ValueError, match="Tesla T4 does not compute bf16; use fp16 or auto"):
        autocast_dtype("bf16", cuda)
    assert autocast_dtype("auto", cuda) == torch.float16
    assert autocast_dtype("fp32", cuda) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert autocast_dtype("auto", cuda) == torch.bfloat16
