"""Start, watch and stop the platform's local server processes: the one module that deals with processes.

A server runs in a session of its own, on 127.0.0.1, with its output in a log file and a tag in its environment
(``MRI_PLATFORM_SERVICE_TAG``, unique per start) that every process it starts inherits. :func:`stop` signals exactly
the processes a service started: the members of its session, those carrying its tag (or its marker in their command
line) and their descendants. It never signals a recycled pid: a process is known by its pid and its start time.
All of it goes through psutil, the only process table the project reads.

A :class:`Service` holds only plain data, saved as JSON by ``mri-platform stack``, so that one process stops what
another started. The servers themselves (SeaweedFS, MLflow, Ray, BentoML) are in :mod:`mri_platform.servers`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

HOST = "127.0.0.1"
"""The only address the servers bind to."""
TAG_VARIABLE = "MRI_PLATFORM_SERVICE_TAG"
"""Set in each server's environment, so that its processes are found even after they left its session."""
PORTS_FROM = 20000
"""Servers started without a port take one at random from here up to the kernel's ephemeral range (`free_ports`)."""
_LOG_TAIL_LINES = 20
_KILL_WAIT_S = 5.0  # after SIGKILL, for the kernel to take the processes down


@dataclass
class Service:
    """A running server that :func:`spawn` started."""

    name: str
    """What runs ("seaweedfs", "mlflow", "ray", "bento")."""
    url: str
    """Where clients reach it, e.g. ``http://127.0.0.1:8333`` (S3) or the Ray job server's address."""
    pid: int
    """The process started first; it leads the session that holds the server's processes."""
    log_path: Path
    """The server's stdout and stderr."""
    extra: dict[str, Any] = field(default_factory=dict)
    """What a client needs besides the URL: S3 keys and bucket, Ray's token and client ``env``, ..."""
    started: float | None = None
    """When the leader started, in seconds after boot: with the pid, its identity, so that a recycled pid is never
    signalled. After boot rather than since the epoch, so that a clock change between ``up`` and ``down`` leaves it."""
    marker: str | None = None
    """A string only this service's processes carry in their command line (Ray's temp folder)."""
    tag: str | None = None
    """The ``NAME=value`` entry in the environment of every process it started."""
    leftovers: list[str] = field(default_factory=list)
    """Paths it uses outside its state folder (SeaweedFS's gRPC sockets, Ray's short temp folder); ``stop``
    removes them."""

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "log_path": str(self.log_path)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Service:
        """Read what :meth:`to_json` wrote, or a record from before psutil: its ``start_ticks`` (clock ticks after
        boot) become ``started`` (ticks / SC_CLK_TCK, as psutil computes it) and a Bento's ``extra["stack_tag"]``
        its tag (under the stack's old variable), so that a stack started before an upgrade is still stopped."""
        fields = dict(data)
        extra = dict(fields.pop("extra", None) or {})
        if (ticks := fields.pop("start_ticks", None)) is not None:
            fields["started"] = round(ticks / os.sysconf("SC_CLK_TCK"), 2)
        if (old_tag := extra.pop("stack_tag", None)) is not None:
            fields.setdefault("tag", f"MRI_PLATFORM_STACK_TAG={old_tag}")
        return cls(**{**fields, "extra": extra, "log_path": Path(fields["log_path"])})


# ------------------------------------------------------------------------------------------------- ports


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (another process may still take it later)."""
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """Return ``count`` distinct ports free now, below the kernel's ephemeral range.

    A port the kernel hands out for ``bind(0)`` lies in that range, from which every outbound connection on the
    machine also takes its local port: a server starting seconds later found its port taken by one (MLflow, in a
    full test run). Ports below the range are never given to outbound connections.
    """
    low, _ = _ephemeral_range()
    candidates = list(range(PORTS_FROM, low))
    secrets.SystemRandom().shuffle(candidates)
    ports = [port for port in candidates[: 64 * count] if port_free(port)][:count]
    if len(ports) < count:
        raise RuntimeError(f"found only {len(ports)} free ports of {count} between {PORTS_FROM} and {low}")
    return ports


def _ephemeral_range(path: Path = Path("/proc/sys/net/ipv4/ip_local_port_range")) -> tuple[int, int]:
    """The kernel's range of local ports for outbound connections (Linux; elsewhere its usual default)."""
    try:
        low, high = map(int, path.read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return (low, high) if low - PORTS_FROM >= 1024 else (32768, 60999)


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


def require_free(port: int | None) -> None:
    """Fail fast on a port asked for explicitly but taken, instead of waiting out the startup timeout."""
    if port is not None and not port_free(port):
        raise RuntimeError(f"port {port} on {HOST} is taken; pick another or leave it None")


def write_private(path: Path, text: str) -> None:
    """Write a secret readable by its owner only (created 0600, never briefly world-readable)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# ------------------------------------------------------------------------------------------------ start


def spawn(
    name: str,
    cmd: list[str],
    state_dir: Path,
    *,
    env: Mapping[str, str],
    cwd: Path,
    url: str,
    marker: str | None = None,
    user: str | None = None,
) -> Service:
    """Start ``cmd`` in a new session, tagged, with its output in ``state_dir/<name>.log``.

    ``user`` runs it as that user with only that user's group (a server that refuses to run as root).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir.resolve() / f"{name}.log"
    tag = f"{TAG_VARIABLE}={name}-{secrets.token_hex(8)}"
    run_as: dict[str, Any] = {}
    if user is not None:
        run_as = {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}
    with open(log_path, "wb") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**env, TAG_VARIABLE: tag.split("=", 1)[1]},
            cwd=cwd,
            start_new_session=True,
            **run_as,
        )
    try:
        started = _started(psutil.Process(proc.pid))
    except psutil.Error:  # gone already: await_ready reports its exit and log
        started = None
    return Service(name=name, url=url, pid=proc.pid, log_path=log_path, started=started, marker=marker, tag=tag)


def await_ready(service: Service, ready: Callable[[], bool], timeout: float, *, what: str, hint: str) -> None:
    """Poll ``ready`` until it holds; stop the service and raise with its log's tail if it dies or times out."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            exited = exit_status(service)
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


def http_status(url: str, headers: Mapping[str, str] | None = None) -> int | None:
    """The HTTP status a GET of ``url`` answers with (within 5 s), None when nothing answers."""
    request = urllib.request.Request(url, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as error:
        return f"(log unreadable: {error})"
    return "\n".join(text.splitlines()[-lines:])


# ---------------------------------------------------------------------------------------------- watching


def is_running(service: Service) -> bool:
    """True while the service's leader runs: the same pid and start time (a reused pid is someone else)."""
    return _leader(service) is not None


def exit_status(service: Service) -> int | None:
    """The leader's exit status once it has exited (-1 when it was not our child, so its status is unknown)."""
    try:
        done, status = os.waitpid(service.pid, os.WNOHANG)
    except ChildProcessError:  # not our child, or already reaped
        return None if is_running(service) else -1
    return os.waitstatus_to_exitcode(status) if done else None


def wait_exit(service: Service, timeout: float) -> int | None:
    """Wait up to ``timeout`` s for the leader to exit by itself; its :func:`exit_status`, None while it runs."""
    deadline = time.monotonic() + timeout
    while (status := exit_status(service)) is None and time.monotonic() < deadline:
        time.sleep(0.1)
    return status


def wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of ``procs`` still running after up to ``timeout`` s; a zombie counts as gone (it runs nothing)."""
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while (running := [proc for proc in procs if _runs(proc)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return running


def send_signal(service: Service, sig: signal.Signals) -> bool:
    """Signal the service's leader alone (SIGSTOP to pause a server, SIGKILL to crash it); False when it is gone."""
    leader = _leader(service)
    if leader is None:
        return False
    try:
        leader.send_signal(sig)  # psutil checks the start time again just before
    except psutil.NoSuchProcess:
        return False
    return True


def members(service: Service) -> list[psutil.Process]:
    """The live processes that :func:`stop` would signal now."""
    return _collect(service, {})


def find_tagged(tag: str) -> list[psutil.Process]:
    """The live processes carrying ``tag`` (a ``NAME=value`` environment entry, a :attr:`Service.tag`), ours
    included when their leader died and they left its session (BentoML's workers start sessions of their own)."""
    return [p.process for p in _processes(environ=True) if not p.zombie and _carries_tag(p, tag)]


# ---------------------------------------------------------------------------------------------- stopping


def stop(service: Service, timeout: float = 20) -> None:
    """Stop every process the service started: SIGTERM, wait up to ``timeout`` s, then SIGKILL.

    Safe to call twice, and on a service whose processes are already gone. Raises RuntimeError only when
    processes survive SIGKILL (a process stuck in the kernel).
    """
    seen: dict[int, float] = {}  # pid -> start time, so that a pid reused meanwhile is left alone
    signalled: set[int] = set()
    deadline = time.monotonic() + timeout
    while (procs := _collect(service, seen)) and time.monotonic() < deadline:
        for proc in procs:
            if proc.pid not in signalled:
                _send(proc, signal.SIGTERM)
                signalled.add(proc.pid)
        time.sleep(0.1)
    deadline = time.monotonic() + _KILL_WAIT_S
    while (procs := _collect(service, seen)) and time.monotonic() < deadline:
        for proc in procs:
            _send(proc, signal.SIGKILL)
        time.sleep(0.1)
    if procs:
        pids = sorted(proc.pid for proc in procs)
        raise RuntimeError(f"{service.name}: processes {pids} survived SIGKILL; see `ps -o pid,stat,cmd`")
    for path in service.leftovers:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)


def _collect(service: Service, seen: dict[int, float]) -> list[psutil.Process]:
    """The live processes of the service, adding to ``seen`` (pid -> start time) what this look found.

    ``seen`` carries over from one look to the next, so a process whose parent died meanwhile is still known.
    """
    table = _processes(environ=service.tag is not None)
    by_pid = {p.pid: p for p in table}
    leader = by_pid.get(service.pid)
    # A leader that is gone leaves its pid reserved while its session lives; one that runs must be the same process.
    our_session = service.started is None or leader is None or leader.started == service.started
    for p in table:
        if p.pid in seen:
            continue
        if (
            (our_session and p.sid == service.pid)
            or (service.marker is not None and service.marker in p.cmdline)
            or (service.tag is not None and _carries_tag(p, service.tag))
        ):
            seen[p.pid] = p.started
    grew = True  # descendants, including job drivers that started sessions of their own; repeat until closed
    while grew:
        grew = False
        for p in table:
            parent = by_pid.get(p.ppid)
            if p.pid not in seen and parent is not None and seen.get(parent.pid) == parent.started:
                seen[p.pid] = p.started
                grew = True
    _reap(seen)
    return [p.process for p in table if not p.zombie and seen.get(p.pid) == p.started]


@dataclass(frozen=True)
class _Proc:
    process: psutil.Process
    pid: int
    ppid: int
    sid: int
    started: float
    zombie: bool
    cmdline: str
    environ: Mapping[str, str]


def _processes(*, environ: bool = False) -> list[_Proc]:
    """Every process of the machine but this one, as far as we may look (another user's environment is hidden)."""
    # Fresh objects: each caches its create_time, which follows the clock; create_time - boot_time read together
    # is the start after boot, which does not.
    psutil.process_iter.cache_clear()
    boot, own = psutil.boot_time(), os.getpid()
    table = []
    for proc in psutil.process_iter(["ppid", "status", "create_time", "cmdline"], ad_value=None):
        info = proc.info
        if proc.pid == own or info["create_time"] is None:
            continue
        try:
            sid = os.getsid(proc.pid)
        except OSError:  # exited while we looked
            continue
        table.append(
            _Proc(
                process=proc,
                pid=proc.pid,
                ppid=info["ppid"],
                sid=sid,
                started=round(info["create_time"] - boot, 2),
                zombie=info["status"] == psutil.STATUS_ZOMBIE,
                cmdline=" ".join(info["cmdline"] or ()),
                environ=_environ(proc) if environ else {},
            )
        )
    return table


def _environ(proc: psutil.Process) -> Mapping[str, str]:
    """Its environment; empty for one we may not read (another user's) and for kernel threads (psutil raises)."""
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def _started(proc: psutil.Process) -> float:
    """Seconds after boot at which ``proc`` started (0.01 s steps on Linux)."""
    return round(proc.create_time() - psutil.boot_time(), 2)


def _leader(service: Service) -> psutil.Process | None:
    try:
        proc = psutil.Process(service.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        if service.started is not None and _started(proc) != service.started:
            return None
    except psutil.Error:
        return None
    return proc


def _runs(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE  # is_running: the same start time too
    except psutil.Error:
        return False


def _carries_tag(proc: _Proc, tag: str) -> bool:
    name, _, value = tag.partition("=")
    return proc.environ.get(name) == value


def _send(proc: psutil.Process, sig: signal.Signals) -> None:
    with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
        proc.send_signal(sig)


def _reap(pids: Mapping[int, float]) -> None:
    """Collect the exit status of those that are our children, so they do not linger as zombies."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)
