"""An MLflow tracking server: one worker, artifacts through its proxy, optionally basic auth and S3 artifacts."""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

from mri_platform import supervisor
from mri_platform.servers.seaweedfs import S3_REGION
from mri_platform.supervisor import HOST, Service


def start_mlflow_server(
    state_dir: Path,
    *,
    port: int | None = None,
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    s3: Service | None = None,
    credentials: tuple[str, str] | None = None,
    timeout: float = 90,
) -> Service:
    """Start ``mlflow server`` with one worker, serving artifacts through its proxy.

    The backend defaults to SQLite and the artifacts to a folder, both in ``state_dir``. For artifacts in
    SeaweedFS give ``artifacts_destination="s3://bucket/prefix"`` and ``s3``: its endpoint and keys (the
    bucket-scoped job keys when it has them) go into the server's environment only, so clients need no cloud
    credentials. Without ``s3`` an ``s3://`` destination uses whatever AWS settings the current environment has.

    ``credentials`` (username, password) switch on MLflow's basic-auth app: every request but ``/health`` and
    static files then needs them, and that user is the admin of an auth database kept beside the store
    (``mlflow/basic_auth.db``). ``extra["env"]`` holds what a client needs (``MLFLOW_TRACKING_URI``,
    ``MLFLOW_TRACKING_USERNAME``, ``MLFLOW_TRACKING_PASSWORD``). MLflow sets the admin's password only when it
    creates the user: a database made with another password must be deleted (its runs and models are not in it).
    """
    home = Path(state_dir).resolve() / "mlflow"
    home.mkdir(parents=True, exist_ok=True)
    backend_store_uri = backend_store_uri or f"sqlite:///{home / 'mlflow.db'}"
    if artifacts_destination is None:
        artifacts_destination = str(home / "artifacts")
        Path(artifacts_destination).mkdir(exist_ok=True)
    if s3 is not None and not artifacts_destination.startswith("s3://"):
        raise ValueError(
            f"s3 was given but artifacts_destination is {artifacts_destination!r}; "
            "pass an s3://bucket/prefix destination to keep artifacts in that S3 server"
        )

    supervisor.require_free(port)
    port = port or supervisor.free_port()
    env = dict(os.environ)
    # A default server also starts a job runner and 4 workers (~22 s, ~3 GB); the platform needs neither.
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    env.pop("MLFLOW_TRACKING_URI", None)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_AUTH_CONFIG_PATH"):
        env.pop(name, None)
    if s3 is not None:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
            env.pop(name, None)
        prefix = "job_" if s3.extra.get("job_access_key") else ""
        env.update(
            MLFLOW_S3_ENDPOINT_URL=s3.url,
            AWS_ACCESS_KEY_ID=s3.extra[f"{prefix}access_key"],
            AWS_SECRET_ACCESS_KEY=s3.extra[f"{prefix}secret_key"],
            AWS_DEFAULT_REGION=s3.extra.get("region", S3_REGION),
        )
    auth = []
    if credentials is not None:
        env.update(_mlflow_auth_env(home, *credentials))
        auth = ["--app-name", "basic-auth"]
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        HOST,
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        artifacts_destination,
        *auth,
    ]
    url = f"http://{HOST}:{port}"
    service = supervisor.spawn("mlflow", cmd, Path(state_dir), env=env, cwd=home, url=url)
    service.extra.update(backend_store_uri=backend_store_uri, artifacts_destination=artifacts_destination)
    service.extra["env"] = {"MLFLOW_TRACKING_URI": url}
    if credentials is not None:
        service.extra["env"].update(MLFLOW_TRACKING_USERNAME=credentials[0], MLFLOW_TRACKING_PASSWORD=credentials[1])
    supervisor.await_ready(
        service,
        lambda: supervisor.http_status(f"{url}/health") == 200,
        timeout,
        what=f"GET {url}/health to answer 200",
        hint="check the backend store URI and that the port is free, or raise `timeout` on a slow machine",
    )
    return service


def _mlflow_auth_env(home: Path, username: str, password: str) -> dict[str, str]:
    """The basic-auth app's settings: its ini (users in ``home/basic_auth.db``; no access by default for a
    user other than the admin), the admin's password and Flask's session key, both by environment only."""
    config = home / "basic_auth.ini"
    supervisor.write_private(
        config,
        "[mlflow]\n"
        "default_permission = NO_PERMISSIONS\n"
        f"database_uri = sqlite:///{home / 'basic_auth.db'}\n"
        f"admin_username = {username}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n",
    )
    return {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_USERNAME": username,
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    }


def answers(service: Service) -> bool:
    return supervisor.http_status(f"{service.url}/health") == 200
