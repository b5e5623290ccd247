"""What every part of the launcher uses: where the checkout and the launcher's own state are, how it speaks (one
line each, `error:` lines for what the user can act on), how it runs a command, and private files."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent  # the checkout
PROG = os.environ.get("UP_PROG", "python -m scripts.up")


def state_dir() -> Path:
    """The launcher's own state (generated logins, compose files, the last network started): `.up/` at the checkout's
    root, git-ignored and private, or $UP_STATE_DIR."""
    return Path(os.environ.get("UP_STATE_DIR") or ROOT / ".up")


class UpError(Exception):
    """A failure the user can act on: printed as one `error:` line (status 2 for usage, 1 otherwise)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


def run(
    cmd: list[str],
    *,
    check: bool = True,
    capture: bool = True,
    timeout: float | None = None,
    input: str | None = None,
    env: dict | None = None,
) -> subprocess.CompletedProcess:
    """A command in its own session, so a Ctrl-C meant for the launcher does not reach it mid-way: the launcher
    decides what to stop, and in which order."""
    try:
        result = subprocess.run(
            cmd, capture_output=capture, text=True, timeout=timeout, input=input, env=env, start_new_session=True
        )
    except FileNotFoundError:
        raise UpError(f"{cmd[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise UpError(f"`{shlex.join(cmd[:4])} ...` did not answer within {timeout:.0f} s") from None
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip().splitlines()[-5:] if capture else []
        raise UpError(
            f"`{shlex.join(cmd[:5])}{' ...' if len(cmd) > 5 else ''}` failed (status {result.returncode})"
            + ("".join(f"\n  {line}" for line in detail))
        )
    return result


def private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def write_file(path: Path, text: str, mode: int = 0o600) -> None:
    """Whole file or nothing, with its mode from the start (a secret is never readable by others, even briefly)."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w") as out:
        out.write(text)
    os.chmod(temp, mode)
    os.replace(temp, path)


def read_env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def abs_path(text: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(text)))
