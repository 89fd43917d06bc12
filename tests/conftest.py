"""Real servers on 127.0.0.1 for the tests: each starts the first time a test asks for it and stops at the end."""

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mri_platform import servers, supervisor
from mri_platform.supervisor import Service


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Make a fresh folder for one server's state and logs: ``state_dir("s3")``."""
    return lambda name: tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def s3_server(state_dir: Callable[[str], Path]) -> Iterator[Service]:
    """SeaweedFS's S3 gateway with ``extra["bucket"]`` created; keys in ``extra``."""
    service = servers.start_seaweedfs(state_dir("s3"))
    yield service
    # Its data is thrown away: no need to wait out SeaweedFS's 15 s graceful shutdown.
    supervisor.stop(service, timeout=3)


@pytest.fixture(scope="session")
def mlflow_server(state_dir: Callable[[str], Path]) -> Iterator[Service]:
    """An MLflow tracking server with a SQLite backend and local artifacts served through its proxy."""
    service = servers.start_mlflow_server(state_dir("mlflow"))
    yield service
    supervisor.stop(service)


@pytest.fixture(scope="session")
def ray_head(state_dir: Callable[[str], Path]) -> Iterator[Service]:
    """A Ray head (2 CPUs) with its job server at ``url``; ``extra["env"]`` authenticates a client."""
    # TRAIN_DRIVER: the resource Tune trial drivers reserve instead of a CPU (see tuning/search.py)
    service = servers.start_ray_head(state_dir("ray"), num_cpus=2, resources={"TRAIN_DRIVER": 8})
    yield service
    supervisor.stop(service)


@pytest.fixture(scope="module")
def local_ray():
    """A local Ray cluster of 2 CPUs for one test module (test_train, test_faults)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own state folder and the embedded tracking store, whatever the caller's environment."""
    monkeypatch.setenv("MRI_PLATFORM_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


@pytest.fixture(scope="session")
def native_model():
    """A small residual U-Net (8 filters) trained for 300 plain steps on the built-in 64 x 64 slices: a model that
    applies at any resolution, as the platform's demo serves. The served champion, and the in-process tests' model."""
    from helpers import train_plainly

    return train_plainly(steps=300, filters=8, model="unet")


@pytest.fixture(scope="session")
def native_checkpoint(native_model, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`native_model` saved as a self-describing checkpoint (trained on whole 64 x 64 slices)."""
    from helpers import describe

    from mri_platform.checkpoints import save_checkpoint

    return save_checkpoint(tmp_path_factory.mktemp("native") / "checkpoint.pt", native_model, **describe())


@pytest.fixture(scope="session")
def built_bento(state_dir: Callable[[str], Path], native_model) -> dict:
    """A real MRI denoiser (`native_model`) registered as champion in a sqlite registry, built into a Bento by the
    real CLI.

    ``mri-platform build`` runs as a subprocess, inside the tests' network namespace where there is one, so the
    build is also shown to work offline. Keys: ``tag``, ``bentoml_home``, ``tracking_uri``, ``state``, ``model``,
    ``checkpoint`` (the registered checkpoint file), ``version``, ``psnr``, ``output``.
    """
    import subprocess
    import sys

    from helpers import register

    from mri_platform import tracking

    state = state_dir("bento")
    uri = f"sqlite:///{state / 'mlflow.db'}"
    from mri_platform.data import load_builtin
    from mri_platform.evaluate import score_model
    from mri_platform.noise import NoiseConfig

    model = native_model
    psnr = score_model(model, load_builtin()[1], NoiseConfig())["psnr"]  # what the registry tags and /info show
    version = register(uri, model, state / "runs", "served", registered_model="mri-denoiser", psnr=psnr)
    tracking.set_champion(uri, "mri-denoiser", version)
    env = {**os.environ, "MRI_PLATFORM_HOME": str(state / "home"), "BENTOML_HOME": str(state / "bentoml")}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run(
        [sys.executable, "-m", "mri_platform", "build", "--tracking-uri", uri, "--json", str(state / "build.json")],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return {"tag": f"mri-denoiser:v{version}", "bentoml_home": state / "bentoml", "tracking_uri": uri,
            "state": state, "model": model, "checkpoint": state / "runs" / "served" / "checkpoint.pt",
            "version": version, "psnr": psnr, "output": result.stdout}  # fmt: skip


@pytest.fixture(scope="session")
def bento_server(built_bento: dict, state_dir: Callable[[str], Path]) -> Iterator[Service]:
    """`bentoml serve` of the built Bento on a free port of 127.0.0.1 (one worker, batching on), with header and
    body timeouts of 3 s instead of 10 so that the tests of stalled clients are short. In fp32, so that its answers
    equal the model's in-process to 1e-4; the default precision, 'auto', is tested in-process (test_service.py). A
    latency budget of 30 s instead of 3: the tests that send 40 concurrent requests check their answers, and on a
    machine busy with other work (a `make demo` beside `make test`) 4 of 40 once waited 8 s and got the budget's 503;
    the budget itself is tested in-process (test_batcher.py, test_binary.py)."""
    service = servers.start_bento(
        state_dir("bento-serve"),
        built_bento["tag"],
        bentoml_home=built_bento["bentoml_home"],
        env={
            "MRI_SERVICE_HEADER_S": "3",
            "MRI_SERVICE_BODY_IDLE_S": "3",
            "MRI_SERVICE_PRECISION": "fp32",
            "MRI_SERVICE_MAX_LATENCY_MS": "30000",
        },
    )
    yield service
    supervisor.stop(service)


@pytest.fixture(scope="session")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """A real headless Chromium (Debian's chromium + chromedriver) driven by Selenium; skipped where missing."""
    chromium, chromedriver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and chromedriver):
        pytest.skip("needs Debian's chromium and chromium-driver (`make test` installs them: scripts/system-deps)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    # Headless as root in a container; no background traffic, which this machine's closed network would refuse.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1200,900", f"--user-data-dir={tmp_path_factory.mktemp('chromium')}"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=DriverService(executable_path=chromedriver), options=options)
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()
