"""The platform's servers on one machine, brought up and down as one (`mri-platform stack up | status | down`).

Platform mode runs a Ray head (dashboard and job server, token auth), an MLflow tracking server (sqlite in the
stack folder, artifacts in S3, basic auth), SeaweedFS as that S3 server (keys required), and the built Bento, all on
127.0.0.1. Everything lives in one folder, ``<state>/stack/``: ``stack.json`` records each started service (pids,
start times, URLs) so that ``down`` in another process stops exactly what ``up`` started and nothing else; the
servers' data (the MLflow store, the S3 objects, the logs) stays there from one ``up`` to the next, and so do the
secrets, each made once and kept 0600: the S3 admin keys (the stack's own), the jobs' bucket-scoped S3 keys and
the MLflow password.

The logic only: :mod:`mri_platform.servers` starts the servers; the commands live in :mod:`mri_platform.cli`.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import json
import os
import secrets
import shlex
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mri_platform import servers, supervisor
from mri_platform.credentials import MLFLOW_PASSWORD, MLFLOW_USERNAME, RECORD, stack_dir
from mri_platform.executables import find_bentoml
from mri_platform.servers.seaweedfs import S3_REGION
from mri_platform.supervisor import HOST, Service

COMPONENTS = ("ray", "mlflow", "s3", "bento")
"""What a stack can run, in the order it is reported."""
DEFAULT_PORTS = {"ray": 8265, "mlflow": 5000, "s3": 8333, "bento": 3000}
"""Each tool's usual port (Ray's dashboard, MLflow, SeaweedFS's S3 gateway, BentoML), so the usual URLs work."""
PORT_OPTIONS = {"ray": "--ray-dashboard-port", "mlflow": "--mlflow-port", "s3": "--s3-port", "bento": "--bento-port"}
S3_BUCKET = "mri-platform"
"""The stack's bucket; MLflow's artifacts go under ``mlflow/`` in it."""
BENTO = "mri-denoiser"
"""The Bento that `mri-platform build` leaves in BentoML's store."""
TRAIN_DRIVER_SLOTS = 64
"""Tune trial drivers reserve the custom TRAIN_DRIVER resource instead of a CPU (README, "Searching with Ray Tune")."""
STOP_TIMEOUT = 20.0
"""Seconds each service gets to stop gracefully before SIGKILL; SeaweedFS's filer alone takes ~15 s."""
S3_CREDENTIALS = "s3-credentials"
"""The jobs' S3 keys (an AWS credentials file): read, list, write and tag in the stack's bucket, nothing else."""
S3_ADMIN_CREDENTIALS = "s3-admin-credentials"
"""SeaweedFS's admin keys; only the stack itself uses them (to create the bucket)."""
S3_JOB_ACCESS_KEY = "mri-platform"
S3_ADMIN_ACCESS_KEY = "mri-platform-admin"
_LOCK = ".lock"
_LOCK_TIMEOUT = 300.0  # an `up` holds the lock while servers start (up to a few minutes on a slow machine)


class StackError(RuntimeError):
    """The stack could not be brought up or down as asked; the message says what to do."""


# ------------------------------------------------------------------------------------------ the record


def load(folder: Path | None = None) -> dict[str, Service]:
    """The services the last ``up`` recorded, by component ("ray", "mlflow", "s3", "bento"); {} when none."""
    path = Path(folder or stack_dir()) / RECORD
    try:
        recorded = json.loads(path.read_text())["services"]
        return {name: Service.from_json(data) for name, data in recorded.items()}
    except FileNotFoundError:
        return {}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StackError(f"{path} is damaged ({error}); stop its servers by hand and delete the file") from None


def _save(folder: Path, record: dict[str, Service]) -> None:
    """Write the record atomically and private to the owner: it holds the Ray token and S3 keys."""
    payload = {"services": {name: service.to_json() for name, service in record.items()}}
    tmp = folder / f".{RECORD}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    os.replace(tmp, folder / RECORD)


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One ``up`` or ``down`` at a time per stack folder, so two of them never start duplicates."""
    with open(folder / _LOCK, "a") as lock:
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StackError(
                        f"another `mri-platform stack up` or `down` has held {folder / _LOCK} for "
                        f"{_LOCK_TIMEOUT:g} s; wait for it to finish, or stop that process"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _state(service: Service) -> str:
    """'running' (its leader lives and its URL answers), 'not answering' or 'exited'."""
    if not supervisor.is_running(service):
        return "exited"
    return "running" if servers.answers(service) else "not answering"


def _states(record: dict[str, Service]) -> dict[str, str]:
    """The state of every recorded service, checked in parallel (each check waits at most 5 s)."""
    if not record:
        return {}
    with ThreadPoolExecutor(len(record)) as pool:
        return dict(zip(record, pool.map(_state, record.values()), strict=True))


# --------------------------------------------------------------------------------------------- helpers


def embedded_store_uri() -> str:
    """The tracking store training writes to by default (the sqlite file in the state folder), for ``--embedded``.

    It is what :func:`mri_platform.tracking.resolve_tracking_uri` gives, so $MLFLOW_TRACKING_URI wins when it names
    a database; a tracking server's URL cannot be served again and is refused.
    """
    from mri_platform.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri()
    if uri.split(":", 1)[0] in {"http", "https", "databricks"}:
        raise StackError(
            f"MLFLOW_TRACKING_URI is {uri}, a tracking server, not a store a server can open; "
            "unset MLFLOW_TRACKING_URI to serve the embedded sqlite store, or pass --backend-store-uri"
        )
    return uri


def built_bento(name: str = BENTO, bentoml_home: Path | None = None) -> tuple[str | None, str]:
    """The exact tag of the Bento ``name`` (``name:latest`` unless it names a version) and a note saying why not.

    Asks ``bentoml get`` in a subprocess: BentoML reads BENTOML_HOME once, when it is imported, so an import here
    could look at another store than the one asked for.
    """
    from mri_platform.config import bentoml_home as default_home

    home = Path(bentoml_home or default_home())
    tag = name if ":" in name else f"{name}:latest"
    missing = f"no Bento {tag} in BentoML's store {home}: build one with `mri-platform build`"
    if not home.is_dir():  # nothing was ever built there; `bentoml` would create an empty store
        return None, missing
    env = {**os.environ, "BENTOML_HOME": str(home), "BENTOML_DO_NOT_TRACK": "true"}
    try:
        done = subprocess.run(
            [find_bentoml(), "get", tag, "-o", "json"], env=env, capture_output=True, text=True, timeout=60
        )
        info = json.loads(done.stdout) if done.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired, ValueError) as error:
        return None, f"could not read BentoML's store {home} ({error}); check that `bentoml list` works"
    if not isinstance(info, dict) or "version" not in info:
        return None, missing
    return f"{info['name']}:{info['version']}", ""


def _s3_keys(folder: Path, *, admin: bool = False) -> tuple[str, str]:
    """The jobs' S3 keys (or with ``admin``, SeaweedFS's admin keys): made once (a random secret), kept in an AWS
    credentials file, 0600. The jobs' file is the one clients are pointed at (``AWS_SHARED_CREDENTIALS_FILE``);
    a stack from before the split keeps its file, whose keys become the jobs' (the admin's are made anew)."""
    path = folder / (S3_ADMIN_CREDENTIALS if admin else S3_CREDENTIALS)
    parser = configparser.ConfigParser()
    if parser.read(path) and parser.has_option("default", "aws_secret_access_key"):
        return parser["default"]["aws_access_key_id"], parser["default"]["aws_secret_access_key"]
    access, secret = S3_ADMIN_ACCESS_KEY if admin else S3_JOB_ACCESS_KEY, secrets.token_hex(20)
    supervisor.write_private(path, f"[default]\naws_access_key_id = {access}\naws_secret_access_key = {secret}\n")
    return access, secret


def _mlflow_credentials(folder: Path) -> tuple[str, str]:
    """The MLflow server's user and password: made once, the password kept in ``mlflow-password`` (0600).

    MLflow sets a user's password only when it creates the user, so a new password (the file was deleted) goes
    with a new auth database: the old one is removed (it holds only users; runs and models are elsewhere).
    """
    path = folder / MLFLOW_PASSWORD
    with contextlib.suppress(FileNotFoundError):
        if password := path.read_text().strip():
            return MLFLOW_USERNAME, password
    (folder / "mlflow" / "basic_auth.db").unlink(missing_ok=True)
    password = secrets.token_urlsafe(24)
    supervisor.write_private(path, password + "\n")
    return MLFLOW_USERNAME, password


def _check_components(components: Iterable[str]) -> list[str]:
    wanted = [c.strip().lower() for c in components if c.strip()]
    unknown = sorted(set(wanted) - set(COMPONENTS))
    if unknown or not wanted:
        raise ValueError(f"unknown components {unknown}; choose among {','.join(COMPONENTS)}")
    return [c for c in COMPONENTS if c in wanted]


# -------------------------------------------------------------------------------------------------- up


def up(
    components: Iterable[str] = COMPONENTS,
    *,
    ray_dashboard_port: int = DEFAULT_PORTS["ray"],
    mlflow_port: int = DEFAULT_PORTS["mlflow"],
    s3_port: int = DEFAULT_PORTS["s3"],
    bento_port: int = DEFAULT_PORTS["bento"],
    backend_store_uri: str | None = None,
    artifacts_destination: str | None = None,
    ray_cpus: int | None = None,
    bento: str = BENTO,
    timeout: float = 90,
    folder: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Bring the stack up, or find it running; return :func:`status` plus ``actions`` and ``notes``.

    ``components``: any of "ray", "mlflow", "s3", "bento" (all by default: the platform mode). The README's first
    command uses ``up(("mlflow", "bento"), backend_store_uri=embedded_store_uri())``: the MLflow UI on the store
    training wrote to, and the Bento.

    ``backend_store_uri``: MLflow's store (default: sqlite in the stack folder). ``artifacts_destination``: where
    the server keeps artifacts (default: ``s3://<bucket>/mlflow`` when the stack has S3, else a folder in the stack
    folder); runs logged before keep their own artifact locations. The Bento is ``bento`` (a name, or name:version)
    from BentoML's store at :func:`mri_platform.config.bentoml_home`; when none is built it is skipped, with a note.

    Idempotent: a service that runs as asked is kept; one that exited, stopped answering or was asked with other
    settings (port, store, Bento version) is restarted, and ``actions`` says why. Components not asked for are left
    as they are. Raises :class:`StackError` (a port taken, a server that did not start) with what to do; servers
    that did start stay recorded, so ``down`` stops them.
    """
    wanted = _check_components(components)
    folder = Path(folder or stack_dir()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _message: None)
    ports = {"ray": ray_dashboard_port, "mlflow": mlflow_port, "s3": s3_port, "bento": bento_port}
    with _locked(folder):
        record = load(folder)
        states = _states(record)
        plans, notes = _plans(
            wanted, ports, record, states, folder, backend_store_uri, artifacts_destination, ray_cpus, bento
        )
        actions, to_stop = {}, {}
        for name, plan in plans.items():
            current = record.get(name)
            if current is None:
                actions[name] = "started"
            elif states[name] == "running" and current.extra.get("stack") == plan:
                actions[name] = "already running"
            else:
                why = {"exited": "it had exited", "not answering": f"it did not answer on {current.url}"}.get(
                    states[name]
                ) or _changed(current.extra.get("stack") or {}, plan)
                actions[name] = f"restarted: {why}"
                to_stop[name] = current
        starting = [name for name, action in actions.items() if action != "already running"]
        # Before stopping anything; a port that a service about to be restarted holds is free once it stops.
        held = {service.url.rsplit(":", 1)[1] for service in to_stop.values()}
        _check_ports({name: plans[name]["port"] for name in starting if str(plans[name]["port"]) not in held})
        if to_stop:
            say(f"stopping {', '.join(to_stop)} to restart them")
            _stop_all(to_stop, STOP_TIMEOUT)
            for name in to_stop:
                del record[name]
            _save(folder, record)
            _check_ports({name: plans[name]["port"] for name in starting})
        if starting:
            say(f"starting {', '.join(starting)} on {HOST} (up to {timeout:g} s each)")
            _start_all(starting, plans, record, folder, timeout)
    return {**status(folder), "actions": actions, "notes": notes}


def _plans(
    wanted: list[str],
    ports: dict[str, int],
    record: dict[str, Service],
    states: dict[str, str],
    folder: Path,
    backend_store_uri: str | None,
    artifacts_destination: str | None,
    ray_cpus: int | None,
    bento: str,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """What each asked-for service should run with (a running one with other settings is restarted), and notes.

    S3 and MLflow count as part of the stack when asked for or already running (``up`` never stops what it was not
    asked to start), so MLflow keeps its artifacts in S3 and Ray's jobs get both servers' addresses.
    """
    present = set(wanted) | {name for name, state in states.items() if state == "running"}
    urls = {name: f"http://{HOST}:{ports[name]}" for name in wanted}
    urls.update({name: record[name].url for name in present - set(wanted)})
    plans: dict[str, dict[str, Any]] = {}
    notes: list[str] = []
    if "s3" in wanted:
        plans["s3"] = {"port": ports["s3"]}
    if "mlflow" in wanted:
        destination = artifacts_destination
        if destination is None:
            destination = f"s3://{S3_BUCKET}/mlflow" if "s3" in present else str(folder / "mlflow" / "artifacts")
        plans["mlflow"] = {
            "port": ports["mlflow"],
            "backend_store_uri": backend_store_uri or f"sqlite:///{folder / 'mlflow' / 'mlflow.db'}",
            "artifacts_destination": destination,
            # An s3:// destination is on the stack's S3 when it has one; its keys go to the server only.
            "s3": urls["s3"] if "s3" in present and destination.startswith("s3://") else None,
            "auth": "basic",  # a server from before authentication came is restarted with it
        }
    if "ray" in wanted:
        job_env = {}
        if "mlflow" in present:
            user, password = _mlflow_credentials(folder)
            job_env.update(
                MLFLOW_TRACKING_URI=urls["mlflow"], MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password
            )
        if "s3" in present:
            access, secret = _s3_keys(folder)  # the bucket-scoped keys: no job holds the admin's
            job_env.update(
                AWS_ENDPOINT_URL=urls["s3"],
                AWS_ACCESS_KEY_ID=access,
                AWS_SECRET_ACCESS_KEY=secret,
                AWS_DEFAULT_REGION=S3_REGION,
            )
        plans["ray"] = {
            "port": ports["ray"],
            "num_cpus": ray_cpus,
            "resources": {"TRAIN_DRIVER": TRAIN_DRIVER_SLOTS},
            "job_env": job_env,
        }
    if "bento" in wanted:
        from mri_platform.config import bentoml_home

        tag, note = built_bento(bento)
        if tag is not None:
            plans["bento"] = {"port": ports["bento"], "tag": tag, "bentoml_home": str(bentoml_home())}
        else:
            notes.append(note)
    return plans, notes


def _changed(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Which settings differ, secrets left out: 'port 5000 -> 5001, backend_store_uri ...'."""
    changes = []
    for key in sorted(set(before) | set(after)):
        old, new = before.get(key), after.get(key)
        if old != new:
            shown = key == "job_env"  # holds S3 keys and the MLflow password: name the variables only
            changes.append(f"{key} changed" if shown else f"{key} {old} -> {new}")
    return ", ".join(changes) or "settings changed"


def _check_ports(ports: dict[str, int]) -> None:
    """Fail before starting anything when a port is taken, naming the option that moves the service."""
    for name, port in ports.items():
        if not supervisor.port_free(port):
            suggestion = supervisor.free_port()
            raise StackError(
                f"port {port} on {HOST}, asked for {name}, is taken by another program; "
                f"choose a free one with {PORT_OPTIONS[name]} (for example {PORT_OPTIONS[name]} {suggestion})"
            )


def _start_all(names: list[str], plans: dict[str, dict], record: dict[str, Service], folder: Path, timeout: float):
    """Start the services in parallel (S3 before MLflow, which needs it), recording each as soon as it is up."""
    guard = threading.Lock()
    failures: dict[str, str] = {}

    def start(name: str) -> None:
        plan = plans[name]
        try:
            if name == "mlflow" and plan["s3"] and "s3" not in record:
                raise StackError("its S3 server did not start")
            service = _start_one(name, plan, record, folder, timeout)
        except Exception as error:  # reported together below; the others go on starting
            failures[name] = str(error)
            return
        service.extra["stack"] = plan
        with guard:
            record[name] = service
            _save(folder, record)

    chains = [[n for n in ("s3", "mlflow") if n in names]] + [[n] for n in ("ray", "bento") if n in names]
    chains = [chain for chain in chains if chain]
    with ThreadPoolExecutor(len(chains)) as pool:
        for future in [pool.submit(lambda chain=chain: [start(n) for n in chain]) for chain in chains]:
            future.result()
    if failures:
        details = "\n".join(f"  {name}: {message}" for name, message in failures.items())
        running = ", ".join(sorted(set(record) - set(failures))) or "nothing"
        raise StackError(
            f"could not start {', '.join(failures)}:\n{details}\n"
            f"Running now: {running}. Fix the cause and run `mri-platform stack up` again, "
            "or `mri-platform stack down` to stop what runs."
        )


def _start_one(name: str, plan: dict[str, Any], record: dict[str, Service], folder: Path, timeout: float) -> Service:
    if name == "s3":
        access, secret = _s3_keys(folder, admin=True)
        return servers.start_seaweedfs(
            folder,
            s3_port=plan["port"],
            access_key=access,
            secret_key=secret,
            bucket=S3_BUCKET,
            job_keys=_s3_keys(folder),
            timeout=timeout,
        )
    if name == "mlflow":
        return servers.start_mlflow_server(
            folder,
            port=plan["port"],
            backend_store_uri=plan["backend_store_uri"],
            artifacts_destination=plan["artifacts_destination"],
            s3=record["s3"] if plan["s3"] else None,
            credentials=_mlflow_credentials(folder),
            timeout=timeout,
        )
    if name == "ray":
        return servers.start_ray_head(
            folder,
            dashboard_port=plan["port"],
            num_cpus=plan["num_cpus"],
            resources=plan["resources"],
            job_env=plan["job_env"],
            timeout=timeout,
        )
    return servers.start_bento(
        folder, plan["tag"], port=plan["port"], bentoml_home=Path(plan["bentoml_home"]), cwd=folder, timeout=timeout
    )


# ------------------------------------------------------------------------------------------ status, down


def status(folder: Path | None = None) -> dict[str, Any]:
    """What runs where: each component's URL (None when not running), what a client needs, and every service's state.

    Keys: ``ray_dashboard`` and ``ray_address`` (the job server's URL, what ``ray job submit`` takes as
    RAY_ADDRESS), ``ray_gcs_address`` (for ``ray.init`` on this machine), ``mlflow``, ``s3``, ``bento``; ``ray_env``
    (the environment a Ray client needs, the token by file), ``mlflow_env`` (MLFLOW_TRACKING_URI, _USERNAME and
    _PASSWORD) and ``mlflow_password_file``, ``s3_env`` and ``s3_credentials_file`` (the jobs' bucket-scoped keys),
    ``s3_bucket``, the MLflow store and artifact locations, ``bento_tag``; ``exports`` (shell lines to paste, the
    secrets read from their files); ``services`` (per component: state, url, pid, log).
    """
    folder = Path(folder or stack_dir()).resolve()
    record = load(folder)
    states = _states(record)
    live = {name: service for name, service in record.items() if states[name] == "running"}
    ray, mlflow, s3, bento = (live.get(name) for name in COMPONENTS)
    result: dict[str, Any] = {
        "stack_dir": str(folder),
        "ray_dashboard": ray and ray.url,
        "ray_address": ray and ray.url,
        "ray_gcs_address": ray and ray.extra["gcs_address"],
        "mlflow": mlflow and mlflow.url,
        "s3": s3 and s3.url,
        "bento": bento and bento.url,
        "ray_env": None,
        "ray_auth_token_path": ray and ray.extra["token_path"],
        "mlflow_env": None,
        "mlflow_password_file": None,
        "mlflow_backend_store_uri": mlflow and mlflow.extra["backend_store_uri"],
        "mlflow_artifacts_destination": mlflow and mlflow.extra["artifacts_destination"],
        "s3_bucket": s3 and s3.extra["bucket"],
        "s3_credentials_file": s3 and str(folder / S3_CREDENTIALS),
        "s3_env": None,
        "bento_tag": bento and bento.extra["target"],
        "exports": [],
        "services": {
            name: {
                "state": states[name],
                "url": record[name].url,
                "pid": record[name].pid,
                "log": str(record[name].log_path),
            }
            for name in COMPONENTS
            if name in record
        },
    }
    if ray:
        result["ray_env"] = {
            "RAY_ADDRESS": ray.url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": ray.extra["token_path"],
        }
    if mlflow:
        result["mlflow_env"] = mlflow.extra.get("env") or {"MLFLOW_TRACKING_URI": mlflow.url}
        if "MLFLOW_TRACKING_PASSWORD" in result["mlflow_env"]:
            result["mlflow_password_file"] = str(folder / MLFLOW_PASSWORD)
        shown = {k: v for k, v in result["mlflow_env"].items() if k != "MLFLOW_TRACKING_PASSWORD"}
        line = _export(shown)
        if result["mlflow_password_file"]:  # pasted, it reads the password; printed, it does not show it
            line += f' MLFLOW_TRACKING_PASSWORD="$(cat {shlex.quote(result["mlflow_password_file"])})"'
        result["exports"].append(line)
    if ray:
        result["exports"].append(_export(result["ray_env"]))
    if s3:
        result["s3_env"] = {
            "AWS_ENDPOINT_URL": s3.url,
            "AWS_SHARED_CREDENTIALS_FILE": result["s3_credentials_file"],
            "AWS_DEFAULT_REGION": s3.extra.get("region", S3_REGION),
        }
        result["exports"].append(_export(result["s3_env"]))
    return result


def _export(env: dict[str, str]) -> str:
    return "export " + " ".join(f"{key}={shlex.quote(value)}" for key, value in env.items())


def down(timeout: float = STOP_TIMEOUT, *, folder: Path | None = None) -> list[str]:
    """Stop exactly what ``up`` recorded and remove the record; return the components that were running.

    Each service gets ``timeout`` s to stop gracefully, then SIGKILL (5 s more at most); they stop in parallel,
    MLflow before its S3 server. Data stays in the stack folder. With nothing recorded it does nothing.
    """
    folder = Path(folder or stack_dir()).resolve()
    if not (folder / RECORD).exists():
        return []
    with _locked(folder):
        record = load(folder)
        was_running = [name for name in COMPONENTS if name in record and supervisor.is_running(record[name])]
        failures = _stop_all(record, timeout)
        if failures:
            _save(folder, {name: record[name] for name in failures})
            details = "\n".join(f"  {name}: {message}" for name, message in failures.items())
            raise StackError(f"could not stop {', '.join(failures)}:\n{details}")
        (folder / RECORD).unlink(missing_ok=True)
    return was_running


def _stop_all(record: dict[str, Service], timeout: float) -> dict[str, str]:
    """Stop services in parallel (MLflow before S3, whose artifacts it writes); return those that would not stop."""
    failures: dict[str, str] = {}

    def stop(names: list[str]) -> None:
        for name in names:
            try:
                supervisor.stop(record[name], timeout=timeout)  # BentoML workers its dead leader left too, by tag
            except RuntimeError as error:
                failures[name] = str(error)

    chains = [[n for n in ("mlflow", "s3") if n in record], *([n] for n in ("ray", "bento") if n in record)]
    chains = [chain for chain in chains if chain]
    if chains:
        with ThreadPoolExecutor(len(chains)) as pool:
            list(pool.map(stop, chains))
    return failures
