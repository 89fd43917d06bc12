"""From the MLflow registry to a Bento: import a registered version into BentoML's store, then `bentoml build`.

The Bento is built from the registry (``models:/mri-denoiser@champion`` by default), never from a file lying
around: the imported BentoML model carries the registry version, its run, its kind, architecture and width,
whether it applies at native resolution, its noise and held-out metrics, and the Bento's tag names the version
(``mri-denoiser:v3``). BentoML reads ``BENTOML_HOME`` when it is first imported, so these functions set it (to
:func:`mri_platform.config.bentoml_home`) before importing it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mri_platform.checkpoints import FILENAME, applies_natively, read_checkpoint, trained_size
from mri_platform.config import bentoml_home
from mri_platform.executables import find_bentoml
from mri_platform.models import ModelConfig

BENTO_NAME = "mri-denoiser"
"""The service's (and so the Bento's) name."""
MODEL_NAME = "mri-denoiser"
"""The model's name in BentoML's store (the same as in the MLflow registry)."""
MODEL_ENV = "MRI_SERVICE_MODEL"
"""Which stored model the service loads (a BentoML tag); `build` sets it so that the Bento embeds that model."""
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def _bentoml():
    os.environ.setdefault("BENTOML_HOME", str(bentoml_home()))
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "true")
    import bentoml

    return bentoml


def resolve_version(model_uri: str, tracking_uri: str) -> tuple[str, str]:
    """The registered model name and version behind ``models:/name@alias`` or ``models:/name/N``."""
    from mlflow.exceptions import MlflowException

    from mri_platform.tracking import client

    match = re.fullmatch(r"models:/([^/@]+)(?:@([\w-]+)|/(\d+))", model_uri)
    if not match:
        raise ValueError(
            "expected a registry URI such as models:/mri-denoiser@champion or models:/mri-denoiser/3, "
            f"got {model_uri!r}"
        )
    name, alias, version = match.groups()
    if alias:
        try:
            version = client(tracking_uri).get_model_version_by_alias(name, alias).version
        except MlflowException as exc:
            raise ValueError(
                f"{model_uri}: no version of {name!r} carries the alias {alias!r} in {tracking_uri} "
                f"({exc.message}); train and promote one first (`mri-platform demo` or `mri-platform promote`)"
            ) from None
    return name, str(version)


def import_model(model_uri: str = "models:/mri-denoiser@champion", tracking_uri: str | None = None) -> dict[str, Any]:
    """Copy a registered version's checkpoint into BentoML's store as ``mri-denoiser:v<N>`` with its metadata.

    Importing the same version again replaces the stored copy. Returns the stored model's tag and metadata.
    """
    from mri_platform.evaluate import download_checkpoint  # imported here: the service needs none of it
    from mri_platform.tracking import client, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    name, version = resolve_version(model_uri, uri)
    details = client(uri).get_model_version(name, version)
    download = Path(tempfile.mkdtemp(prefix="mri-import-"))
    checkpoint = download_checkpoint(f"models:/{name}/{version}", uri, dst=download)
    payload = read_checkpoint(checkpoint)
    data = payload.get("data", {})
    tags = details.tags
    metadata = {
        "registered_model": name,
        "registry_version": version,
        "model_uri": f"models:/{name}/{version}",
        "requested_uri": model_uri,
        "tracking_uri": uri,
        "run_id": details.run_id,
        "model_kind": tags.get("model_kind", ""),
        "architecture": ModelConfig(**payload["model"]).architecture,
        "filters": int(payload["model"]["filters"]),
        "image_size": data.get("size", 64),  # the slices' side, or "native" (trained at their own sizes)
        "patch": data.get("patch"),  # the side of the random patches it was trained on, if any
        "native": applies_natively(payload),  # served at every image's own resolution, else resized
        "trained_size": trained_size(payload),
        "noise": payload["noise"],
        "psnr": float(tags["psnr"]) if "psnr" in tags else None,
        "ssim": float(tags["ssim"]) if "ssim" in tags else None,
        "scored_on": tags.get("scored_on"),  # what psnr / ssim were measured on (the run's own held-out split)
        "description": details.description or "",
    }
    metadata = {k: v for k, v in metadata.items() if v is not None}  # BentoML refuses None: leave the key out
    bentoml = _bentoml()
    tag = f"{MODEL_NAME}:v{version}"
    with contextlib.suppress(bentoml.exceptions.NotFound):
        bentoml.models.delete(tag)
    labels = {"registry_version": version, "model_kind": metadata["model_kind"] or "custom"}
    with bentoml.models.create(tag, labels=labels, metadata=metadata) as stored:
        shutil.copy2(checkpoint, Path(stored.path) / FILENAME)
    shutil.rmtree(download, ignore_errors=True)
    return {"tag": tag, "metadata": metadata}


def build(
    model_uri: str = "models:/mri-denoiser@champion", tracking_uri: str | None = None, *, quiet: bool = True
) -> dict[str, Any]:
    """Import the model and run ``bentoml build`` on the project's bentofile; returns the Bento's tag and model.

    A Bento of the same version is replaced, so building again after a new promotion is always safe.
    """
    imported = import_model(model_uri, tracking_uri)
    version = f"v{imported['metadata']['registry_version']}"
    bentoml = _bentoml()
    with contextlib.suppress(bentoml.exceptions.NotFound):
        bentoml.bentos.delete(f"{BENTO_NAME}:{version}")
    env = {**os.environ, MODEL_ENV: imported["tag"], "BENTOML_HOME": os.environ["BENTOML_HOME"]}
    cmd = [find_bentoml(), "build", str(PROJECT_ROOT), "--version", version, "--output", "tag"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        raise RuntimeError(f"`bentoml build` failed (exit {result.returncode}):\n{output}")
    return {
        "bento": f"{BENTO_NAME}:{version}",
        "model": imported["tag"],
        "metadata": imported["metadata"],
        "bentoml_home": os.environ["BENTOML_HOME"],
        "log": "" if quiet else result.stdout,
    }
