"""Real servers on 127.0.0.1 for the tests: each starts the first time a test asks for it and stops at the end."""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mri_platform import services
from mri_platform.services import Service


@pytest.fixture(scope="session")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Make a fresh folder for one server's state and logs: ``state_dir("s3")``."""
    return lambda name: tmp_path_factory.mktemp(name)


@pytest.fixture(scope="session")
def s3_server(state_dir: Callable[[str], Path]) -> Iterator[Service]:
    """SeaweedFS's S3 gateway with ``extra["bucket"]`` created; keys in ``extra``."""
    service = services.start_seaweedfs(state_dir("s3"))
    yield service
    # Its data is thrown away: no need to wait out SeaweedFS's 15 s graceful shutdown.
    services.stop(service, timeout=3)


@pytest.fixture(scope="session")
def mlflow_server(state_dir: Callable[[str], Path]) -> Iterator[Service]:
    """An MLflow tracking server with a SQLite backend and local artifacts served through its proxy."""
    service = services.start_mlflow_server(state_dir("mlflow"))
    yield service
    services.stop(service)


@pytest.fixture(scope="session")
def ray_head(state_dir: Callable[[str], Path]) -> Iterator[Service]:
    """A Ray head (2 CPUs) with its job server at ``url``; ``extra["env"]`` authenticates a client."""
    # TRAIN_DRIVER: the resource Tune trial drivers reserve instead of a CPU (see tuning/search.py)
    service = services.start_ray_head(state_dir("ray"), num_cpus=2, resources={"TRAIN_DRIVER": 8})
    yield service
    services.stop(service)


@pytest.fixture(autouse=True)
def _isolated_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test gets its own state folder and the embedded tracking store, whatever the caller's environment."""
    monkeypatch.setenv("MRI_PLATFORM_HOME", str(tmp_path / "state"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
