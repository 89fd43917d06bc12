"""A Ray head node with its dashboard and job server, token authentication on, every socket on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import sys
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from mri_platform import supervisor
from mri_platform.executables import find_executable
from mri_platform.supervisor import HOST, Service

# Linux's limit for a unix socket path (108 bytes with the NUL); Ray puts sockets under its temp folder, the
# longest for the dashboard's MetricsHead module (plus a little room for suffixes).
_MAX_SOCKET_PATH = 107
_RAY_SOCKET_SUFFIX = "/session_2026-01-01_00-00-00_000000_4194304/sockets/dash_MetricsHead.xxx"


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
    supervisor.write_private(token_path, token)
    # A client needs both: without RAY_AUTH_MODE=token it sends no token even when one is set. RAY_AUTH_TOKEN
    # wins over RAY_AUTH_TOKEN_PATH and ~/.ray/auth_token, so a stale value in the caller's env cannot shadow it.
    client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}

    supervisor.require_free(dashboard_port)
    gcs_port, agent_port, client_port, *metric_ports, spare = supervisor.free_ports(6)
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
        find_executable("ray", hint="install the project (`pip install -e .`)"),
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
    service = supervisor.spawn("ray", cmd, Path(state_dir), env=env, cwd=home, url=url, marker=f"{temp_dir}/session_")
    service.leftovers = leftovers
    service.extra.update(
        env=client_env,
        token=token,
        token_path=str(token_path),
        gcs_address=f"{HOST}:{gcs_port}",
        temp_dir=str(temp_dir),
    )
    headers = {"Authorization": f"Bearer {token}"}
    supervisor.await_ready(
        service,
        lambda: supervisor.http_status(f"{url}/api/jobs/", headers) == 200 and _ray_agent_ready(url, headers),
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


def answers(service: Service) -> bool:
    """The job server answers with the head's token."""
    headers = {"Authorization": f"Bearer {service.extra['token']}"}
    return supervisor.http_status(f"{service.url}/api/jobs/", headers) == 200
