"""``bentoml serve`` of a built Bento or of the service's import path, on 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from mri_platform import supervisor
from mri_platform.executables import find_bentoml
from mri_platform.supervisor import HOST, Service


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
    supervisor.require_free(port)
    port = port or supervisor.free_port()
    server_env = dict(os.environ)
    server_env["BENTOML_DO_NOT_TRACK"] = "true"
    if bentoml_home is not None:
        server_env["BENTOML_HOME"] = str(Path(bentoml_home).resolve())
    server_env.update(env or {})
    cmd = [find_bentoml(), "serve", target, "--host", HOST]
    cmd += ["--port", str(port)]
    url = f"http://{HOST}:{port}"
    service = supervisor.spawn("bento", cmd, Path(state_dir), env=server_env, cwd=Path(cwd or Path.cwd()), url=url)
    service.extra.update(target=target, bentoml_home=server_env.get("BENTOML_HOME"))
    supervisor.await_ready(
        service,
        lambda: supervisor.http_status(f"{url}/readyz") == 200,
        timeout,
        what=f"GET {url}/readyz to answer 200",
        hint="build the Bento first (`mri-platform build`), check BENTOML_HOME and that the port is free",
    )
    return service


def answers(service: Service) -> bool:
    return supervisor.http_status(f"{service.url}/readyz") == 200
