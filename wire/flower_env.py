"""The environment every Flower process of this project gets, site or coordinator alike."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path


def flower_env(flwr_home: Path | None = None) -> dict[str, str]:
    """The venv's bin on PATH, no telemetry, no update checks, no runtime dependency installs; with ``flwr_home``
    that FLWR_HOME and a Ray temp folder of its own (two simulations on one machine never share one)."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.update(HF_HUB_OFFLINE="1", FLWR_TELEMETRY_ENABLED="0", FLWR_DISABLE_UPDATE_CHECK="1",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", PYTHONUNBUFFERED="1")
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
        # Ray's socket paths must stay under 107 bytes: a short folder per FLWR_HOME, not one under the run dir
        tag = hashlib.sha1(str(Path(flwr_home).resolve()).encode()).hexdigest()[:10]
        env.setdefault("RAY_TMPDIR", str(Path(tempfile.gettempdir()) / f"hdfed-ray-{os.getuid()}-{tag}"))
    return env
