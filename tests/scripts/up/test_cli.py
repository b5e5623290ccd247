"""The launcher's command line (`./up.sh`, `python -m scripts.up`): usage and errors, and the choice between
containers and local processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netutil import ROOT
from tests.scripts.up.helpers import UP, clean_env, upsh


def test_up_sh_is_a_short_shim():
    text = Path(UP).read_text()
    assert os.access(UP, os.X_OK) and text.startswith("#!/bin/sh\n")
    assert len(text.splitlines()) < 15 and "scripts.up" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (apt-get install shellcheck)")
def test_shellcheck_passes_on_the_shell_scripts():
    scripts = [UP, str(ROOT / ".ci" / "run"), str(ROOT / ".ci" / "with-docker")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_ci_checks_lint_format_and_types_before_the_tests():
    """.ci/run (a fresh machine's CI): ruff's lint and format check and mypy (pyproject.toml's settings), with the
    tools the development requirements pin, before the README's test command."""
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith(".")]
    checks = [".venv/bin/ruff check .", ".venv/bin/ruff format --check .", ".venv/bin/mypy"]
    tests = next(i for i, step in enumerate(steps) if "pytest" in step)
    assert all(steps.index(check) < tests for check in checks), steps
    pinned = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^ruff==", pinned, re.M) and re.search(r"^mypy==", pinned, re.M)


def test_help_explains_itself(tmp_path):
    result = upsh(tmp_path, "--help")
    assert result.returncode == 0
    for words in (
        "--peers",
        "--run-dir",
        "--local",
        "status",
        "kill controller",
        "kill random | peer ID",
        "down",
        "broker --publish",
        "--join HOST:PORT",
        "--base",
        "--ca-bundle",
        "--data-dir",
        "Docker",
        "local processes",
        "FL_",
        "docs/RECORDS.md",
    ):
        assert words in result.stdout, words


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--peers", "x"], "argument --peers: invalid int value: 'x'"),
        (["--peers", "1"], "--peers needs at least 2 peers in the federation, not 1"),
        (["--first", "0"], "--first counts from 1, not 0"),
        (["--peers-per-process", "0"], "--peers-per-process must be at least 1, not 0"),
        (["--peers", "4", "--peers-per-process", "2", "--resume", "x"], "--resume needs one peer per process"),
        (["--peers", "3", "--first", "3", "--total", "4"], "peers 3..5 do not fit in --total 4"),
        (["--project", "Bad Name"], "--project 'Bad Name': use lowercase letters"),
        (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder: no such folder"),
        (["--", "--bogus"], "peer flags: unrecognized arguments: --bogus"),
        (["--", "--max-rounds", "0"], "peer flags: --max-rounds: must be at least 1, got 0"),
        (["--", "--peer-id", "x"], "--peer-id is set by up.sh for each peer"),
        (
            ["--", "--run-dir", "x"],
            "--run-dir is set by up.sh for each peer: leave it out of the peer flags (--run-dir goes",
        ),
        (["kill"], "the following arguments are required"),
        (["kill", "a", "b"], "kill takes one target: controller, random or peer ID"),
        (["kill", "controller", "--signal", "HUP"], "--signal must be KILL, TERM, STOP or CONT, not 'HUP'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["status", "--", "x"], "status takes no peer flags"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_wrong_arguments_fail_clearly(tmp_path, args, message):
    result = upsh(tmp_path, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"up.sh: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists(), "nothing may be written on a usage error"


def test_control_commands_without_a_network_say_what_to_do(tmp_path):
    for args in (["status"], ["kill", "controller"], ["down"]):
        result = upsh(tmp_path, *args)
        assert result.returncode == 1 and "no network to act on" in result.stderr, result.stderr


def test_without_docker_engine_says_so_once_and_runs_local(tmp_path, no_docker):
    # The local path stops at its first check here: an interpreter without the project's packages.
    result = upsh(tmp_path, "--peers", "3", "--run-dir", str(tmp_path / "out"), PATH=no_docker, PYTHON="/bin/false")
    lines = result.stdout.splitlines()
    assert (
        lines.count(
            "up.sh: no Docker engine reachable (docker info failed: Cannot connect to the Docker "
            "daemon); running the same network as local processes (./up.sh --local)"
        )
        == 1
    ), result.stdout
    assert result.returncode == 1
    assert "/bin/false cannot import the project's packages" in result.stderr
    assert "pip install -r requirements.txt" in result.stderr


def test_docker_flag_refuses_to_fall_back(tmp_path, no_docker):
    result = upsh(tmp_path, "--docker", PATH=no_docker)
    assert result.returncode == 1
    assert "up.sh: error: no Docker engine reachable" in result.stderr and "local" not in result.stdout


def test_generated_state_is_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [".up/sdfl/login/peer-1.env", ".up/last.json", ".up/sdfl/compose.json"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == paths


def test_the_launcher_runs_on_a_bare_python_with_the_standard_library_only(tmp_path):
    """./up.sh runs on the host's python3, which may have nothing but the standard library: no module of the
    launcher (nor scripts.localnet, which it runs local networks with) may import a third-party package, and what
    needs them (the peer flags' check) runs in the peers' Python. `-S`: no site-packages at all."""
    modules = ["scripts.up." + path.stem for path in (ROOT / "scripts" / "up").glob("*.py")] + ["scripts.localnet"]
    program = (
        "import importlib, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        f"for name in {sorted(modules)!r}:\n"
        "    importlib.import_module(name)\n"
        "third = sorted({m.split('.')[0] for m in sys.modules} & {'numpy', 'paho', 'tensorflow', 'keras', 'yaml'})\n"
        "assert not third, third\n"
        "from scripts.up import main\n"
        "sys.exit(main(['compose-file', '--peers', '2', '--', '--max-rounds', '3']))\n"
    )
    env = {**clean_env(tmp_path), "PYTHON": sys.executable}  # the peers' Python, which has the packages
    done = subprocess.run(
        [sys.executable, "-S", "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "--max-rounds" in done.stdout and "Traceback" not in done.stderr
