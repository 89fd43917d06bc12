"""The supervisor on real, short-lived processes (plain Python, no servers): start, wait until ready, stop; a recycled
pid is left alone; orphans are found by their tag and stopped. Seconds in all."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mri_platform import supervisor
from mri_platform.supervisor import Service

# Prints "> ready" once it listens for SIGTERM, which it ignores when told to (as SeaweedFS does for a long time).
SERVER = """
import signal, sys, time
if sys.argv[1:] == ["stubborn"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("> ready", flush=True)
time.sleep(120)
"""
# Starts a child in a session of its own (as BentoML's workers do), says so, then waits to be killed.
PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
print("> child", child.pid, flush=True)
time.sleep(120)
"""


def _said(service: Service, word: str) -> list[str]:
    """The lines it printed starting with ``word`` (what the programs above print starts with "> ": the log begins
    with the command, whose lines do not)."""
    return [line for line in service.log_path.read_text().splitlines() if line.startswith(f"> {word}")]


def _start(tmp_path: Path, code: str, *args: str, ready: str = "ready") -> Service:
    service = supervisor.spawn(
        "toy", [sys.executable, "-c", code, *args], tmp_path, env=os.environ, cwd=tmp_path, url=""
    )
    supervisor.await_ready(
        service, lambda: bool(_said(service, ready)), 30, what=f"it to say {ready}", hint="see the log"
    )
    return service


def test_a_process_is_started_tagged_waited_for_and_stopped(tmp_path: Path) -> None:
    service = _start(tmp_path, SERVER)
    assert supervisor.is_running(service) and supervisor.exit_status(service) is None
    [leader] = supervisor.members(service)
    assert leader.pid == service.pid and os.getsid(service.pid) == service.pid  # a session of its own
    name, value = service.tag.split("=", 1)
    assert leader.environ()[name] == value and value.startswith("toy-")
    assert service.log_path.read_text().splitlines()[0].startswith(f"$ {sys.executable} -c")

    started = time.monotonic()
    supervisor.stop(service)
    assert time.monotonic() - started < 5
    assert not supervisor.is_running(service) and supervisor.wait_gone([leader], 0) == []
    supervisor.stop(service)  # idempotent


def test_a_process_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path: Path) -> None:
    service = _start(tmp_path, SERVER, "stubborn")
    started = time.monotonic()
    supervisor.stop(service, timeout=1)
    assert 1 <= time.monotonic() - started < 1 + 5  # SIGTERM went unheard for the whole timeout, SIGKILL did not
    assert not supervisor.is_running(service)


def test_a_failed_start_raises_with_the_log_tail_and_leaves_nothing(tmp_path: Path) -> None:
    code = "import sys; print('cannot open the store: nosuchdb', flush=True); sys.exit(3)"
    service = supervisor.spawn("broken", [sys.executable, "-c", code], tmp_path, env=os.environ, cwd=tmp_path, url="")
    with pytest.raises(RuntimeError, match="exited with status 3") as failed:
        supervisor.await_ready(service, lambda: False, 30, what="never", hint="fix the store")
    assert "What to do: fix the store" in str(failed.value) and "nosuchdb" in str(failed.value)

    slow = supervisor.spawn("slow", [sys.executable, "-c", SERVER], tmp_path, env=os.environ, cwd=tmp_path, url="")
    with pytest.raises(RuntimeError, match="did not start within 0.5 s"):
        supervisor.await_ready(slow, lambda: False, 0.5, what="never", hint="wait longer")
    assert not supervisor.is_running(slow)  # stopped on the way out


def test_a_pid_whose_start_time_differs_is_never_signalled(tmp_path: Path) -> None:
    """A record whose leader died and whose pid now belongs to another process: stop and signals leave it alone."""
    stranger = subprocess.Popen([sys.executable, "-c", SERVER], start_new_session=True, stdout=subprocess.PIPE)
    try:
        assert stranger.stdout.readline() == b"> ready\n"
        recorded = Service("old", "", stranger.pid, tmp_path / "old.log", started=1.0)  # started long before
        assert not supervisor.is_running(recorded)
        assert supervisor.members(recorded) == []  # not its session, though the stranger leads one with that id
        assert not supervisor.send_signal(recorded, signal.SIGKILL)
        supervisor.stop(recorded, timeout=1)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait(timeout=10)


def test_orphans_are_found_by_tag_and_stopped(tmp_path: Path) -> None:
    service = _start(tmp_path, PARENT, ready="child")
    child = int(_said(service, "child")[0].split()[2])
    assert {p.pid for p in supervisor.members(service)} == {service.pid, child}

    assert supervisor.send_signal(service, signal.SIGKILL)  # the leader dies; its child, in another session, lives on
    assert supervisor.wait_exit(service, 10) == -signal.SIGKILL
    orphans = supervisor.find_tagged(service.tag)
    assert [p.pid for p in orphans] == [child] and os.getsid(child) != service.pid
    assert psutil.Process(child).ppid() != service.pid  # neither in its session nor its descendant: only the tag

    supervisor.stop(service, timeout=2)
    assert supervisor.wait_gone(orphans, 0) == [] and supervisor.find_tagged(service.tag) == []


def test_a_record_survives_json_and_one_from_before_psutil_is_migrated(tmp_path: Path) -> None:
    service = _start(tmp_path, SERVER)
    try:
        assert Service.from_json(json.loads(json.dumps(service.to_json()))) == service
        ticks = round(service.started * os.sysconf("SC_CLK_TCK"))  # what the supervisor recorded before psutil
        old = {**service.to_json(), "start_ticks": ticks, "extra": {"stack_tag": "t1"}}
        del old["started"], old["tag"]
        migrated = Service.from_json(old)
        assert migrated.started == service.started and supervisor.is_running(migrated)
        assert migrated.tag == "MRI_PLATFORM_STACK_TAG=t1" and migrated.extra == {}
    finally:
        supervisor.stop(service)


def test_free_ports_are_distinct_and_bindable() -> None:
    import socket

    ports = supervisor.free_ports(5)
    assert len(set(ports)) == 5 and all(supervisor.port_free(port) for port in ports)
    # never in the range outbound connections take their local ports from, so none can take a server's port
    assert all(supervisor.PORTS_FROM <= port < supervisor._ephemeral_range()[0] for port in ports)
    with socket.socket() as sock:
        sock.bind((supervisor.HOST, ports[0]))
        sock.listen()
        assert not supervisor.port_free(ports[0])
        with pytest.raises(RuntimeError, match=f"port {ports[0]} on 127.0.0.1 is taken"):
            supervisor.require_free(ports[0])


def test_secrets_are_written_private(tmp_path: Path) -> None:
    path = tmp_path / "token"
    supervisor.write_private(path, "s3cret")
    assert path.read_text() == "s3cret" and path.stat().st_mode & 0o777 == 0o600
