"""Running the launcher as a user does (./up.sh) in a clean environment, its state in a folder of the test's own."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests.netutil import ROOT

UP = str(ROOT / "up.sh")


def clean_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "UP_"))}
    return {**env, "UP_STATE_DIR": str(tmp_path / "state"), **extra}


def upsh(tmp_path: Path, *args: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [UP, *args], cwd=ROOT, env=clean_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout
    )
