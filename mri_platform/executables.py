"""Where this environment's command-line tools are (``weed``, ``ray``, ``bentoml``).

Kept apart from the supervisor so that the serving side (``service/build.py`` runs ``bentoml build``) finds its tool
without importing the code that starts and stops servers.
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
from pathlib import Path


def find_executable(name: str, *, hint: str) -> str:
    """The ``name`` command that this Python's environment installs, else the one on PATH.

    This environment's own first: a ``ray`` or ``bentoml`` from elsewhere would run another interpreter, without the
    project. ``hint`` says how to install it, for the FileNotFoundError raised when there is none.
    """
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"the `{name}` command was not found beside this Python or on PATH; {hint}")
    return found


def find_bentoml() -> str:
    """The ``bentoml`` CLI of this environment, so that it sees this project and its BentoML version."""
    return find_executable("bentoml", hint="install the project (`pip install -e .`, which brings bentoml)")
