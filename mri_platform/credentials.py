"""Where a client finds the local stack's secrets, without the supervisor: the stack folder and its record.

`tracking` uses it to log in to the stack's MLflow server; `stack` owns the files (it writes them, 0600).
"""

from __future__ import annotations

import json
from pathlib import Path

RECORD = "stack.json"
"""The record `stack up` writes: each started service's pids, URLs and what a client needs."""
MLFLOW_USERNAME = "mri-platform"
"""The stack's MLflow user (its admin): the platform's clients log, register and promote as it."""
MLFLOW_PASSWORD = "mlflow-password"
"""The file, in the stack folder, holding that user's password."""
MLFLOW_AUTH_VARIABLES = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def stack_dir() -> Path:
    """The stack's one folder: ``stack/`` in the state folder ($MRI_PLATFORM_HOME or ./.state)."""
    from mri_platform.config import state_dir

    return state_dir() / "stack"


def local_mlflow_env(uri: str) -> dict[str, str]:
    """The login for the MLflow server at ``uri`` when that server is this machine's stack, else {}.

    Read from the stack's record (readable by its owner only), so ``--tracking-uri http://127.0.0.1:5000`` works
    for the user who ran ``stack up`` with nothing exported.
    """
    try:
        mlflow = json.loads((stack_dir() / RECORD).read_text())["services"]["mlflow"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if str(mlflow.get("url", "")).rstrip("/") != uri.rstrip("/"):
        return {}
    env = (mlflow.get("extra") or {}).get("env") or {}
    return {k: v for k, v in env.items() if k in MLFLOW_AUTH_VARIABLES}
