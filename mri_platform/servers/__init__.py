"""The real servers the platform runs on one machine, one module each, all started by :mod:`mri_platform.supervisor`.

SeaweedFS (S3), an MLflow tracking server, a Ray head and ``bentoml serve``. Each binds 127.0.0.1 on free ports (or
the port asked for), so that parallel test sessions do not clash, keeps its state and log under the caller's state
folder and is stopped with :func:`mri_platform.supervisor.stop`. Used by the test fixtures, the benchmarks and
``mri-platform stack``.
"""

from __future__ import annotations

from mri_platform.servers import bento, mlflow_server, ray_head, seaweedfs
from mri_platform.servers.bento import start_bento
from mri_platform.servers.mlflow_server import start_mlflow_server
from mri_platform.servers.ray_head import start_ray_head
from mri_platform.servers.seaweedfs import s3_client, start_seaweedfs
from mri_platform.supervisor import Service

__all__ = ["answers", "s3_client", "start_bento", "start_mlflow_server", "start_ray_head", "start_seaweedfs"]

_PROBES = {
    "seaweedfs": seaweedfs.answers,
    "mlflow": mlflow_server.answers,
    "ray": ray_head.answers,
    "bento": bento.answers,
}


def answers(service: Service) -> bool:
    """True when the service answers on its URL as its kind of server should (one request, <= 5 s)."""
    return _PROBES[service.name](service)
