"""The servers start, do their real job on 127.0.0.1, and stop without leaving processes behind."""

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from mri_platform import servers, supervisor
from mri_platform.supervisor import Service

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")


def _client_env(service: Service) -> dict[str, str]:
    """The test's environment without stray Ray settings, plus what the head says a client needs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, **service.extra["env"]}


# ------------------------------------------------------------------------------------------------ S3


def test_s3_multipart_upload_reads_back_equal(s3_server: Service) -> None:
    from pyarrow import fs

    s3 = fs.S3FileSystem(
        endpoint_override=s3_server.extra["endpoint"],
        scheme="http",
        access_key=s3_server.extra["access_key"],
        secret_key=s3_server.extra["secret_key"],
        region="us-east-1",
    )
    payload = os.urandom(20 * 2**20)
    key = f"tests/{uuid.uuid4().hex}.bin"
    with s3.open_output_stream(f"{s3_server.extra['bucket']}/{key}") as out:
        out.write(payload)
    with s3.open_input_stream(f"{s3_server.extra['bucket']}/{key}") as src:
        assert src.read() == payload

    head = servers.s3_client(s3_server).head_object(Bucket=s3_server.extra["bucket"], Key=key)
    assert head["ContentLength"] == len(payload)
    assert "-" in head["ETag"], f"expected a multipart ETag (md5-parts), got {head['ETag']}"


def test_s3_refuses_a_wrong_secret_key(s3_server: Service) -> None:
    from botocore.exceptions import ClientError

    intruder = Service(**{**vars(s3_server), "extra": {**s3_server.extra, "secret_key": "not-the-secret"}})
    client = servers.s3_client(intruder)
    key = f"tests/{uuid.uuid4().hex}.txt"
    with pytest.raises(ClientError) as refused:
        client.put_object(Bucket=s3_server.extra["bucket"], Key=key, Body=b"x")
    assert refused.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}
    listing = servers.s3_client(s3_server).list_objects_v2(Bucket=s3_server.extra["bucket"], Prefix=key)
    assert listing.get("KeyCount", 0) == 0


def test_seaweedfs_master_volume_and_grpc_ports_refuse_anyone_without_the_certificate(s3_server: Service) -> None:
    """Only the S3 gateway answers without the per-start client certificate: the master's admin API (which
    deletes a bucket's objects with one GET), the volume server's HTTP port and all four gRPC ports refuse
    plain connections and TLS without a certificate; with the certificate they answer."""
    import ssl
    import urllib.error
    import urllib.request

    import grpc

    bucket, ports, tls = s3_server.extra["bucket"], s3_server.extra["ports"], s3_server.extra["tls"]
    client = servers.s3_client(s3_server)
    key = f"tests/{uuid.uuid4().hex}.txt"
    client.put_object(Bucket=bucket, Key=key, Body=b"kept")

    def status(url: str, context: ssl.SSLContext | None = None) -> int | str:
        try:
            with urllib.request.urlopen(url, timeout=10, context=context) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError as error:
            return str(error)

    def tls_context(*, certificate: bool) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=tls["ca"])
        if certificate:
            context.load_cert_chain(tls["cert"], tls["key"])
        return context

    delete = f"/col/delete?collection={bucket}"
    for name in ("master", "volume"):
        port = ports[name]
        for path in (delete, "/vol/grow?count=1&collection=x", "/dir/status", "/status"):
            assert status(f"http://{supervisor.HOST}:{port}{path}") == 400, (name, path)  # "HTTP to an HTTPS server"
            refused = status(f"https://{supervisor.HOST}:{port}{path}", tls_context(certificate=False))
            assert isinstance(refused, str) and "CERTIFICATE_REQUIRED" in refused.upper(), (name, path, refused)
    # The certificate is what is missing: with it the same ports answer.
    with_certificate = tls_context(certificate=True)
    assert status(f"https://{supervisor.HOST}:{ports['master']}/dir/status", with_certificate) == 200
    assert status(f"https://{supervisor.HOST}:{ports['volume']}/status", with_certificate) == 200
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"kept"

    def ready(channel: grpc.Channel) -> bool:
        try:
            grpc.channel_ready_future(channel).result(timeout=3)
            return True
        except grpc.FutureTimeoutError:
            return False
        finally:
            channel.close()

    ca = Path(tls["ca"]).read_bytes()
    options = [("grpc.ssl_target_name_override", "localhost")]
    for name in ("master_grpc", "volume_grpc", "filer_grpc", "s3_grpc"):
        address = f"{supervisor.HOST}:{ports[name]}"
        assert not ready(grpc.insecure_channel(address)), name
        assert not ready(grpc.secure_channel(address, grpc.ssl_channel_credentials(ca), options)), name
    address = f"{supervisor.HOST}:{ports['master_grpc']}"
    credentials = grpc.ssl_channel_credentials(ca, Path(tls["key"]).read_bytes(), Path(tls["cert"]).read_bytes())
    assert ready(grpc.secure_channel(address, credentials, options))

    folder = Path(tls["key"]).parent
    assert folder.stat().st_mode & 0o777 == 0o700
    assert {f.name: f.stat().st_mode & 0o777 for f in folder.iterdir()} == dict.fromkeys(
        ("ca.crt", "node.crt", "node.key"), 0o600
    )
    assert client.get_object(Bucket=bucket, Key=key)["Body"].read() == b"kept"


def test_stopping_seaweedfs_is_bounded(state_dir: Callable[[str], Path]) -> None:
    service = servers.start_seaweedfs(state_dir("s3-stop"), bucket=None)
    assert supervisor.is_running(service)

    started = time.monotonic()
    supervisor.stop(service, timeout=2)
    assert time.monotonic() - started < 2 + 5
    assert not supervisor.is_running(service)
    assert service.leftovers and not any(Path(p).exists() for p in service.leftovers)

    started = time.monotonic()
    supervisor.stop(service, timeout=2)  # idempotent, and quick when nothing is left
    assert time.monotonic() - started < 1


# -------------------------------------------------------------------------------------------- MLflow


def _log_note(client, experiment: str, text: str, folder: Path) -> str:
    """Log a metric and a text artifact in a new run; return the run id."""
    run = client.create_run(client.create_experiment(f"{experiment}-{uuid.uuid4().hex[:8]}"))
    client.log_metric(run.info.run_id, "psnr", 31.5, step=2)
    note = folder / "note.txt"
    note.write_text(text)
    client.log_artifact(run.info.run_id, str(note))
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_mlflow_server_tracks_metrics_and_serves_artifacts(mlflow_server: Service, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = _log_note(client, "services", "denoised", tmp_path)

    [metric] = client.get_metric_history(run_id, "psnr")
    assert (metric.value, metric.step) == (31.5, 2)
    assert client.get_run(run_id).info.artifact_uri.startswith("mlflow-artifacts:")
    downloaded = client.download_artifacts(run_id, "note.txt", str(tmp_path / "back"))
    assert Path(downloaded).read_text() == "denoised"
    stored = list(Path(mlflow_server.extra["artifacts_destination"]).rglob("note.txt"))
    assert [p.read_text() for p in stored] == ["denoised"]


def test_mlflow_server_keeps_artifacts_in_s3_without_client_credentials(
    s3_server: Service, state_dir: Callable[[str], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow import MlflowClient

    for name in list(os.environ):
        if name.startswith("AWS_") or name == "MLFLOW_S3_ENDPOINT_URL":
            monkeypatch.delenv(name)
    # No credentials file either: only the server can reach the bucket.
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    bucket = s3_server.extra["bucket"]
    server = servers.start_mlflow_server(
        state_dir("mlflow-s3"), artifacts_destination=f"s3://{bucket}/mlflow", s3=s3_server
    )
    try:
        client = MlflowClient(tracking_uri=server.url)
        run_id = _log_note(client, "s3-artifacts", "on seaweedfs", tmp_path)
        downloaded = client.download_artifacts(run_id, "note.txt", str(tmp_path / "back"))
        assert Path(downloaded).read_text() == "on seaweedfs"
    finally:
        supervisor.stop(server)

    s3 = servers.s3_client(s3_server)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="mlflow/").get("Contents", [])]
    [key] = [k for k in keys if run_id in k and k.endswith("/note.txt")]
    assert s3.get_object(Bucket=bucket, Key=key)["Body"].read() == b"on seaweedfs"


def test_a_failed_start_raises_with_the_log(state_dir: Callable[[str], Path]) -> None:
    with pytest.raises(RuntimeError, match="exited with status") as failed:
        servers.start_mlflow_server(state_dir("mlflow-bad"), backend_store_uri="nosuchdb://nowhere")
    assert "nosuchdb" in str(failed.value)  # the log's tail names the problem


# ----------------------------------------------------------------------------------------------- Ray


def test_ray_job_runs_with_the_head_token(ray_head: Service, tmp_path: Path) -> None:
    (tmp_path / "script.py").write_text("import sys\nprint('denoiser job says', 6 * 7, sys.prefix)\n")
    cmd = [RAY, "job", "submit", "--address", ray_head.url, "--working-dir", str(tmp_path)]
    done = subprocess.run(
        [*cmd, "--", "python", "script.py"],
        env=_client_env(ray_head),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"denoiser job says 42 {sys.prefix}" in done.stdout  # and it ran the project's Python

    anonymous = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    anonymous["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on
    refused = subprocess.run(
        [*cmd, "--", "python", "script.py"], env=anonymous, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "authentication" in (refused.stdout + refused.stderr).lower()
    assert "denoiser job says" not in refused.stdout


def test_stopping_ray_leaves_none_of_its_processes(state_dir: Callable[[str], Path], tmp_path: Path) -> None:
    head = servers.start_ray_head(state_dir("ray-stop"), num_cpus=1)
    head_procs: list[psutil.Process] = []
    try:
        pid_file = tmp_path / "driver.pid"
        (tmp_path / "sleeper.py").write_text(
            f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\ntime.sleep(600)\n"
        )
        submit = [RAY, "job", "submit", "--no-wait", "--address", head.url, "--working-dir", str(tmp_path)]
        done = subprocess.run(
            [*submit, "--", "python", "sleeper.py"],
            env=_client_env(head),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        deadline = time.monotonic() + 60
        while not pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert pid_file.exists(), "the job's driver did not start within 60 s"
        driver = int(pid_file.read_text())
        # The job's driver runs in a session of its own, outside the head's: stop must still find it.
        head_procs = supervisor.members(head)
        assert driver in {p.pid for p in head_procs} and os.getsid(driver) != head.pid
        assert len(head_procs) > 5  # GCS, raylet, dashboard, agents, workers
    finally:
        supervisor.stop(head)
    assert supervisor.wait_gone(head_procs, 0) == []
