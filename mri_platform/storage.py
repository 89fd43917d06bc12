"""Where Ray Train keeps a run's checkpoints: a local folder or any S3 server, reached so that a stall is waited out.

A paused or restarting S3 server must cost at most the epoch in flight, not the run. Two layers see to it: the S3
filesystem retries each request with backoff (`S3_*` below), and Ray Train's own retries (three per checkpoint upload,
`FailureConfig.max_failures` for a lost worker) sit on top; `mri-platform train --auto-resume` is the last one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow.fs

from mri_platform.config import state_dir

S3_CONNECT_TIMEOUT_S = 5.0
S3_REQUEST_TIMEOUT_S = 10.0
S3_MAX_ATTEMPTS = 12
"""How a request to a stalled S3 server is retried. The request timeout is how long a transfer may move less than a
byte a second (curl's low-speed limit in the AWS SDK, honoured on Linux too), not a cap on a whole upload. With the
SDK's defaults (3 s, 3 attempts) a write failed 11 s into a stall; 12 attempts of 10 s with the standard backoff
outlast a 60 s SIGSTOP of SeaweedFS (measured: the write completes about 7 s after the server resumes)."""

SNAPSHOT = "checkpoint_manager_snapshot.json"
"""The file in which Ray Train's controller lists the checkpoints it keeps (Ray 2.60)."""


def _s3(kwargs: dict[str, Any]) -> RetryingS3FileSystem:
    return RetryingS3FileSystem(**kwargs)


class RetryingS3FileSystem(pyarrow.fs.S3FileSystem):
    """pyarrow's S3FileSystem that keeps its retry strategy when pickled.

    Ray ships the storage filesystem to its controller and to every worker by pickling it, and pyarrow 25 leaves
    `retry_strategy` out of what it pickles: without this the workers, which upload the checkpoints, retry 3 times
    whatever the driver asked.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._kwargs = kwargs

    def __reduce__(self):
        return _s3, (self._kwargs,)


def s3_options() -> dict[str, Any]:
    """S3FileSystem options from the environment ($AWS_ENDPOINT_URL for any S3 server, keys), with the retries."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    kwargs: dict[str, Any] = {
        "region": os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "request_timeout": S3_REQUEST_TIMEOUT_S,
        "retry_strategy": pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host or scheme, scheme=scheme if host else "https")
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        kwargs.update(access_key=os.environ["AWS_ACCESS_KEY_ID"], secret_key=os.environ["AWS_SECRET_ACCESS_KEY"])
    return kwargs


def resolve_storage(storage: str | None) -> tuple[str, Any]:
    """(storage_path, pyarrow filesystem or None) for RunConfig; s3:// honours $AWS_ENDPOINT_URL for any S3 server."""
    if not storage:
        return str(state_dir() / "ray_results"), None
    if not storage.startswith("s3://"):
        return str(Path(storage).resolve()), None
    return storage.removeprefix("s3://").rstrip("/"), RetryingS3FileSystem(**s3_options())


def prune_unlisted_checkpoints(storage_path: str, filesystem: Any, run_name: str) -> list[str]:
    """Delete the checkpoint folders of a run that its controller's snapshot does not list; returns their names.

    A checkpoint uploaded by a worker but never registered by the controller (the run failed between the two: a worker
    lost, the snapshot write refused by a stalled S3) is known to no one, so `num_to_keep` never deletes it: after a
    failure a run kept three checkpoints with num_to_keep=2. Called before a run is resumed, when nothing writes there.
    """
    fs = filesystem or pyarrow.fs.LocalFileSystem()
    run_dir = f"{storage_path.rstrip('/')}/{run_name}"
    try:
        with fs.open_input_stream(f"{run_dir}/{SNAPSHOT}") as stream:
            snapshot = json.loads(stream.read())
    except (FileNotFoundError, OSError):
        return []  # no snapshot: nothing was registered, and a fresh start overwrites nothing it could lose
    listed = {r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])}
    latest = snapshot.get("latest_checkpoint_result") or {}
    listed |= {r["checkpoint_dir_name"] for r in snapshot.get("pending_training_results", [])}
    listed.add(latest.get("checkpoint_dir_name"))
    found = fs.get_file_info(pyarrow.fs.FileSelector(run_dir, allow_not_found=True))
    orphans = sorted(
        Path(info.path).name
        for info in found
        if info.type == pyarrow.fs.FileType.Directory
        and Path(info.path).name.startswith("checkpoint_")
        and Path(info.path).name not in listed
    )
    for name in orphans:
        fs.delete_dir(f"{run_dir}/{name}")
    return orphans
