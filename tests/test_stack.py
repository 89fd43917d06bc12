"""`mri-platform stack up | status | down` through the real CLI: the servers answer, a Ray job logs to the stack's
MLflow with its artifact in S3, a second `up` starts nothing, a dead server is restarted, `down` leaves nothing.

One stack (on free ports) is shared by the module's tests, which run in file order: up, use, restart, down.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mri_platform import servers, stack, supervisor
from mri_platform.supervisor import HOST

RAY = str(Path(sys.executable).parent / "ray")
ROOT = Path(__file__).resolve().parents[1]  # `ray job submit --working-dir .` uploads it, as the README does


def _env(home: Path) -> dict[str, str]:
    """The caller's environment without settings that would point the stack or its clients elsewhere."""
    drop = ("RAY_", "AWS_", "MLFLOW_TRACKING_URI", "BENTOML_HOME")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    return {**env, "MRI_PLATFORM_HOME": str(home)}


def _cli(env: dict[str, str], *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "mri_platform", "stack", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _status(env: dict[str, str]) -> dict:
    done = _cli(env, "status", "--json", timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


def _get(url: str, headers: dict[str, str] | None = None) -> int | None:
    """The HTTP status a GET of ``url`` answers with, None when nothing answers."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


def _stack_processes(folder: Path) -> list[psutil.Process]:
    """Every live process of the stack, as the supervisor knows them: sessions, tags, Ray's temp folder, children."""
    return [proc for service in stack.load(folder).values() for proc in supervisor.members(service)]


def _naming(folder: Path) -> list[psutil.Process]:
    """Processes whose command line names the stack's folder, found without the supervisor's help."""
    return [p for p in psutil.process_iter(["cmdline"]) if str(folder) in " ".join(p.info["cmdline"] or ())]


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`stack up` in platform mode on free ports; stopped at the end whatever the tests did."""
    home = tmp_path_factory.mktemp("stack-home")
    ray_port, mlflow_port, s3_port, bento_port = supervisor.free_ports(4)
    ports = {"ray": ray_port, "mlflow": mlflow_port, "s3": s3_port, "bento": bento_port}
    args = [f"--ray-dashboard-port={ray_port}", f"--mlflow-port={mlflow_port}", f"--s3-port={s3_port}"]
    args.append(f"--bento-port={bento_port}")
    env = _env(home)
    started = time.monotonic()
    up = _cli(env, "up", *args)
    up_s = time.monotonic() - started
    print(f"\nstack up: {up_s:.1f} s")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        yield {"env": env, "args": args, "ports": ports, "folder": home / "stack", "up": up, "up_s": up_s}
    finally:
        stack.down(timeout=5, folder=home / "stack")  # a no-op once the down test ran


@pytest.mark.slow
def test_up_serves_every_part_on_the_asked_ports(platform: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import boto3

    info = _status(platform["env"])
    ports = platform["ports"]
    assert info["ray_dashboard"] == info["ray_address"] == f"http://{HOST}:{ports['ray']}"
    assert info["mlflow"] == f"http://{HOST}:{ports['mlflow']}"
    assert info["s3"] == f"http://{HOST}:{ports['s3']}"
    assert info["bento"] is None  # none built in this state folder, and `up` says how to build one
    assert "mri-platform build" in platform["up"].stdout
    assert f"export MLFLOW_TRACKING_URI={info['mlflow']}" in platform["up"].stdout

    assert _get(f"{info['mlflow']}/health") == 200
    password_file = Path(info["mlflow_password_file"])
    assert info["mlflow_env"] == {
        "MLFLOW_TRACKING_URI": info["mlflow"],
        "MLFLOW_TRACKING_USERNAME": stack.MLFLOW_USERNAME,
        "MLFLOW_TRACKING_PASSWORD": password_file.read_text().strip(),
    }
    assert info["mlflow_env"]["MLFLOW_TRACKING_PASSWORD"] not in platform["up"].stdout  # printed as $(cat FILE)
    assert f'MLFLOW_TRACKING_PASSWORD="$(cat {password_file})"' in platform["up"].stdout
    assert info["mlflow_artifacts_destination"] == f"s3://{info['s3_bucket']}/mlflow"
    token = Path(info["ray_auth_token_path"]).read_text().strip()
    assert token not in platform["up"].stdout  # the plain view names the file, never the token
    jobs = f"{info['ray_dashboard']}/api/jobs/"
    assert _get(jobs, {"Authorization": f"Bearer {token}"}) == 200
    assert _get(jobs) != 200  # token auth is on

    for name, value in info["s3_env"].items():  # the printed AWS_ENDPOINT_URL and keys file are all a client needs
        monkeypatch.setenv(name, value)
    s3 = boto3.client("s3")
    s3.put_object(Bucket=info["s3_bucket"], Key="hello.txt", Body=b"from a client")
    assert s3.get_object(Bucket=info["s3_bucket"], Key="hello.txt")["Body"].read() == b"from a client"
    secrets = [platform["folder"] / name for name in (stack.RECORD, stack.S3_ADMIN_CREDENTIALS, stack.MLFLOW_PASSWORD)]
    secrets += [Path(info["s3_credentials_file"]), platform["folder"] / "mlflow" / "basic_auth.ini"]
    for secret in secrets:
        assert secret.stat().st_mode & 0o077 == 0, secret  # the Ray token, S3 keys, the MLflow password


@pytest.mark.slow
def test_a_second_up_finds_the_running_stack(platform: dict) -> None:
    before = {name: entry["pid"] for name, entry in _status(platform["env"])["services"].items()}
    again = _cli(platform["env"], "up", *platform["args"])
    assert again.returncode == 0, again.stdout + again.stderr
    for name in ("ray", "mlflow", "s3"):
        assert f"{name}: already running" in again.stdout
    assert {name: entry["pid"] for name, entry in _status(platform["env"])["services"].items()} == before


@pytest.mark.slow
def test_a_training_job_submitted_to_the_stack_lands_in_its_mlflow_and_s3(
    platform: dict, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's journey: `ray job submit` a real training run; it logs, registers and checkpoints on the stack."""
    from mlflow import MlflowClient

    info = _status(platform["env"])
    bucket = info["s3_bucket"]
    # No tracking URI and no S3 keys on the command line: the head gives its jobs the stack's MLflow and S3.
    command = [
        RAY, "job", "submit", "--working-dir", ".", "--",
        "python", "-m", "mri_platform", "train", "--model", "ae1", "--filters", "8", "--epochs", "2", "--lr", "0.003",
        "--workers", "1", "--run-name", "stack-journey", "--storage", f"s3://{bucket}/checkpoints",
    ]  # fmt: skip
    env = {**platform["env"], **info["ray_env"]}  # RAY_ADDRESS, RAY_AUTH_MODE, RAY_AUTH_TOKEN_PATH, as printed
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "epoch   2/2" in done.stdout

    for name, value in info["mlflow_env"].items():  # the login, as `stack status` hands it out
        monkeypatch.setenv(name, value)
    client = MlflowClient(tracking_uri=info["mlflow"], registry_uri=info["mlflow"])
    [run] = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], "attributes.run_name = 'stack-journey'"
    )
    assert run.data.metrics["final_psnr"] > run.data.metrics["final_noisy_psnr"]
    [version] = client.search_model_versions("name = 'mri-denoiser'")
    assert version.run_id == run.info.run_id
    s3 = servers.s3_client(stack.load(platform["folder"])["s3"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert any(k.startswith("checkpoints/") and k.endswith("checkpoint.pt") for k in keys)  # Ray Train's, on S3
    assert any(k.startswith("mlflow/") and run.info.run_id in k for k in keys)  # MLflow's artifacts, on S3
    platform["journey"] = {"run_id": run.info.run_id, "experiment_id": run.info.experiment_id}


@pytest.mark.slow
def test_registry_writes_without_the_login_are_refused(platform: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nobody without the stack's MLflow login moves `champion` (which `build` ships), or even reads the registry."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if "journey" not in platform:
        pytest.skip("needs the model the training job registered")
    info = _status(platform["env"])
    url, login = info["mlflow"], info["mlflow_env"]
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    anonymous = MlflowClient(tracking_uri=url, registry_uri=url)
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        anonymous.set_registered_model_alias("mri-denoiser", "champion", "1")
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        anonymous.search_model_versions("name = 'mri-denoiser'")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    with pytest.raises(MlflowException, match="401|Unauthorized|credentials"):
        anonymous.set_registered_model_alias("mri-denoiser", "champion", "1")
    assert _get(f"{url}/api/2.0/mlflow/registered-models/search") == 401

    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login["MLFLOW_TRACKING_PASSWORD"])
    allowed = MlflowClient(tracking_uri=url, registry_uri=url)
    allowed.set_registered_model_alias("mri-denoiser", "checked", "1")
    assert allowed.get_model_version_by_alias("mri-denoiser", "checked").version == "1"
    allowed.delete_registered_model_alias("mri-denoiser", "checked")


@pytest.mark.slow
def test_s3_is_reachable_only_through_its_gateway_with_keys(platform: dict) -> None:
    """The filer's HTTP API is off and the master and volume servers want a client certificate (test_services
    has the TLS and gRPC checks): objects are not readable, writable, deletable or listable
    without S3 keys; the jobs' keys work in the stack's bucket only; no Ray process holds the admin keys."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = stack.load(platform["folder"])["s3"]
    bucket, ports = s3.extra["bucket"], s3.extra["ports"]
    admin = servers.s3_client(s3)
    admin.put_object(Bucket=bucket, Key="guarded.txt", Body=b"secret scan")
    filer = f"http://{HOST}:{ports['filer']}"
    for url in (f"{filer}/", f"{filer}/buckets/{bucket}/guarded.txt", f"{filer}/buckets/{bucket}/?pretty=y"):
        assert _get(url) in (None, 404), url  # nothing served, whatever the path
    upload = urllib.request.Request(f"{filer}/buckets/{bucket}/planted.txt", data=b"x", method="PUT")
    with pytest.raises(urllib.error.HTTPError, match="404"):
        urllib.request.urlopen(upload, timeout=10)
    # The master and volume HTTP ports speak TLS with client certificates only: plain HTTP gets 400, and the
    # master's /col/delete (which used to delete the bucket's objects with one GET) reaches nothing.
    master, volume = f"http://{HOST}:{ports['master']}", f"http://{HOST}:{ports['volume']}"
    assert _get(f"{master}/col/delete?collection={bucket}") == 400
    for fid in ("1,01637037d6", "2,01637037d6", "3,01637037d6"):
        assert _get(f"{volume}/{fid}") == 400
    plant = urllib.request.Request(f"{volume}/1,01637037d6", data=b"x", method="POST")
    with pytest.raises(urllib.error.HTTPError, match="400"):
        urllib.request.urlopen(plant, timeout=10)
    assert admin.get_object(Bucket=bucket, Key="guarded.txt")["Body"].read() == b"secret scan"

    job = servers.s3_client(s3, job=True)
    assert job.get_object(Bucket=bucket, Key="guarded.txt")["Body"].read() == b"secret scan"
    job.put_object(Bucket=bucket, Key="from-a-job.txt", Body=b"ok")
    with pytest.raises(ClientError, match="AccessDenied"):
        job.create_bucket(Bucket="another-bucket")
    admin.create_bucket(Bucket="another-bucket")
    with pytest.raises(ClientError, match="AccessDenied"):
        job.put_object(Bucket="another-bucket", Key="x", Body=b"x")
    wrong = boto3.client("s3", endpoint_url=s3.url, aws_access_key_id=s3.extra["access_key"],
                         aws_secret_access_key="wrong", region_name="us-east-1")  # fmt: skip
    with pytest.raises(ClientError, match="SignatureDoesNotMatch|AccessDenied|InvalidAccessKeyId"):
        wrong.list_objects_v2(Bucket=bucket)

    admin_secret, checked = s3.extra["secret_key"], 0
    for proc in _stack_processes(platform["folder"]):  # Ray's daemons and workers, MLflow, SeaweedFS
        with contextlib.suppress(psutil.Error):
            assert admin_secret not in "\0".join(f"{k}={v}" for k, v in proc.environ().items()), proc.pid
            checked += 1
    assert checked > 5


@pytest.mark.slow
def test_the_stack_listens_on_loopback_only(platform: dict) -> None:
    """Every listening socket of every stack process (Ray's GCS, raylet and agents included) is on 127.0.0.1."""
    pids = {proc.pid for proc in _stack_processes(platform["folder"])}
    listening = [c for c in psutil.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN and c.pid in pids]
    assert len({c.pid for c in listening}) >= 4  # SeaweedFS, MLflow, and Ray's GCS, raylet, dashboard, agents
    beyond = [(c.laddr.ip, c.laddr.port, psutil.Process(c.pid).name()) for c in listening if not _loopback(c.laddr.ip)]
    assert not beyond, f"listening beyond loopback: {beyond}"


def _loopback(ip: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(ip)
    return address.is_loopback or bool(address.version == 6 and address.ipv4_mapped and address.ipv4_mapped.is_loopback)


@pytest.mark.slow
def test_the_mlflow_ui_shows_the_run_and_the_registered_model(platform: dict, browser) -> None:
    import base64

    from selenium.webdriver.support.ui import WebDriverWait

    if "journey" not in platform:
        pytest.skip("needs the training job of the previous test")
    info = _status(platform["env"])
    mlflow_url, journey = info["mlflow"], platform["journey"]
    login = f"{info['mlflow_env']['MLFLOW_TRACKING_USERNAME']}:{info['mlflow_env']['MLFLOW_TRACKING_PASSWORD']}"

    def shows(url: str, text: str) -> None:
        browser.get(url)
        WebDriverWait(browser, 60).until(lambda d: text in d.find_element("tag name", "body").text)

    # What a browser sends once the user typed the login into its basic-auth prompt.
    browser.execute_cdp_cmd("Network.enable", {})
    headers = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()}
    browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": headers})
    try:
        shows(f"{mlflow_url}/#/experiments/{journey['experiment_id']}/runs/{journey['run_id']}", "stack-journey")
        assert "val_psnr" in browser.find_element("tag name", "body").text
        shows(f"{mlflow_url}/#/models", "mri-denoiser")
    finally:
        browser.execute_cdp_cmd("Network.setExtraHTTPHeaders", {"headers": {}})


@pytest.mark.slow
def test_the_trained_model_is_built_from_the_stack_registry_and_served(platform: dict) -> None:
    """Journey 3: `mri-platform build` against the stack's MLflow server, then `stack up` adds the Bento."""
    if "journey" not in platform:
        pytest.skip("needs the training job of the previous tests")
    info = _status(platform["env"])
    build = subprocess.run(
        [sys.executable, "-m", "mri_platform", "build", "--model-uri", "models:/mri-denoiser/1",
         "--tracking-uri", info["mlflow"]],
        env=platform["env"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    assert "built Bento mri-denoiser:v1" in build.stdout
    again = _cli(platform["env"], "up", *platform["args"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "bento: started" in again.stdout and "ray: already running" in again.stdout
    bento = _status(platform["env"])["bento"]
    assert bento == f"http://{HOST}:{platform['ports']['bento']}"
    with urllib.request.urlopen(f"{bento}/info", timeout=30) as response:
        served = json.load(response)
    assert served["model_uri"] == "models:/mri-denoiser/1" and served["run_id"] == platform["journey"]["run_id"]


@pytest.mark.slow
def test_up_restarts_a_server_that_died_and_says_so(platform: dict) -> None:
    record = stack.load(platform["folder"])
    old = record["mlflow"]
    old_procs = supervisor.members(old)
    assert supervisor.send_signal(old, signal.SIGKILL)
    assert not supervisor.wait_gone([p for p in old_procs if p.pid == old.pid], 10)

    again = _cli(platform["env"], "up", *platform["args"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "mlflow: restarted: it had exited" in again.stdout
    assert "ray: already running" in again.stdout and "s3: already running" in again.stdout
    after = stack.load(platform["folder"])
    assert after["mlflow"].pid != old.pid and after["mlflow"].url == old.url
    assert {name: after[name].pid for name in ("ray", "s3")} == {name: record[name].pid for name in ("ray", "s3")}
    assert _get(f"{old.url}/health") == 200
    assert not supervisor.wait_gone(old_procs, 10)  # what the dead server left was stopped before the new one started


@pytest.mark.slow
def test_down_stops_everything_and_a_second_down_is_harmless(platform: dict) -> None:
    folder = platform["folder"]
    procs = _stack_processes(folder)
    assert len(procs) > 5  # Ray's daemons, MLflow, SeaweedFS

    started = time.monotonic()
    done = _cli(platform["env"], "down")
    down_s = time.monotonic() - started
    print(f"\nstack down: {down_s:.1f} s")
    assert done.returncode == 0, done.stdout + done.stderr
    for name in ("ray", "mlflow", "s3"):
        assert f"stopped {name}" in done.stdout
    assert not supervisor.wait_gone(procs, 0)
    assert not supervisor.wait_gone(_naming(folder), 0)
    assert not (folder / stack.RECORD).exists()

    again = _cli(platform["env"], "down")
    assert again.returncode == 0 and "nothing to stop" in again.stdout
    info = _status(platform["env"])
    assert [info[key] for key in ("ray_dashboard", "ray_address", "mlflow", "s3", "bento")] == [None] * 5


# ----------------------------------------------------------------------------- the README's first command


@pytest.mark.slow
def test_the_embedded_mode_serves_the_store_training_wrote(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What `make demo` ends with: the MLflow UI on the embedded sqlite store (and the Bento, when built)."""
    from mlflow import MlflowClient

    store = stack.embedded_store_uri()
    assert store.startswith("sqlite:") and str(tmp_path) in store  # the test's own state folder
    written = MlflowClient(tracking_uri=store)
    run_id = written.create_run(written.create_experiment("trained-before")).info.run_id
    written.log_metric(run_id, "val_psnr", 19.39)

    mlflow_port, bento_port = supervisor.free_ports(2)
    info = stack.up(("mlflow", "bento"), backend_store_uri=store, mlflow_port=mlflow_port, bento_port=bento_port)
    try:
        assert info["actions"] == {"mlflow": "started"}
        assert info["bento"] is None and "mri-platform build" in info["notes"][0]
        assert info["mlflow"] == f"http://{HOST}:{mlflow_port}"
        assert (info["ray_dashboard"], info["s3"]) == (None, None)
        assert _get(f"{info['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1") == 401  # a login, here too
        for name, value in info["mlflow_env"].items():  # the login `status` hands out
            monkeypatch.setenv(name, value)
        served = MlflowClient(tracking_uri=info["mlflow"]).get_run(run_id)
        assert served.data.metrics["val_psnr"] == 19.39
    finally:
        assert stack.down() == ["mlflow"]
    assert stack.status()["mlflow"] is None


# ------------------------------------------------------------------------------------- no servers needed


def test_a_taken_port_fails_at_once_naming_the_option(tmp_path: Path) -> None:
    import socket

    env = _env(tmp_path / "home")
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = _cli(env, "up", "--only", "mlflow", "--mlflow-port", str(port), timeout=60)
    assert done.returncode == 1
    assert f"port {port}" in done.stderr and "--mlflow-port" in done.stderr
    assert _status(env)["services"] == {}  # nothing was started


def test_nothing_running_is_reported_not_an_error(tmp_path: Path) -> None:
    env = _env(tmp_path / "home")
    assert "no stack is running" in _cli(env, "status", timeout=60).stdout
    done = _cli(env, "down", timeout=60)
    assert done.returncode == 0 and "nothing to stop" in done.stdout
    with pytest.raises(ValueError, match="choose among ray,mlflow,s3,bento"):
        stack.up(["redis"])


# ------------------------------------------------------------------------------------------------ the Bento


@pytest.mark.slow
def test_up_serves_the_built_bento_and_a_second_up_keeps_it(built_bento: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BENTOML_HOME", str(built_bento["bentoml_home"]))  # where `mri-platform build` left it
    [port] = supervisor.free_ports(1)
    info = stack.up(("bento",), bento_port=port)
    try:
        assert info["actions"] == {"bento": "started"} and info["notes"] == []
        assert info["bento"] == f"http://{HOST}:{port}" and info["bento_tag"] == built_bento["tag"]
        assert _get(f"{info['bento']}/readyz") == 200
        again = stack.up(("bento",), bento_port=port)
        assert again["actions"] == {"bento": "already running"}
        assert again["services"]["bento"]["pid"] == info["services"]["bento"]["pid"]
    finally:
        assert stack.down() == ["bento"]
    assert _get(f"http://{HOST}:{port}/readyz") is None
