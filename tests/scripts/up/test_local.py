"""The launcher's local path: what it needs (mosquitto, the project's Python) and, end to end with a real broker and
real peers, a run through a controller kill, `status`, `kill` and `down`, leaving nothing behind."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time

from scripts.up import cli, local
from tests.netutil import ROOT, SMALL, assert_rounds_complete, elections, rounds, statuses, wait_until
from tests.scripts.up.helpers import UP, clean_env


def test_local_without_mosquitto_prints_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(local, "find_mosquitto", lambda: None)
    monkeypatch.setenv("UP_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["--local", "--peers", "2", "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "the local network needs the mosquitto broker: " in err
    assert re.search(
        r": (sudo )?(apt-get install -y|dnf install -y|brew install|pacman -S|apk add|zypper install) "
        r"mosquitto$",
        err.strip(),
    ), err
    assert not (tmp_path / "r").exists()


def test_local_without_venv_creates_it(tmp_path):
    """In a copy of the checkout without .venv (and a requirements.txt with nothing to install, to stay quick):
    `./up.sh --local` says it creates .venv, creates it, and then says what is still missing."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("up.sh", "scripts", "peer"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, copy / name)
    (copy / "requirements.txt").write_text("# nothing: the test only needs the venv made\n")
    env = clean_env(tmp_path)
    env.pop("PYTHON", None)
    result = subprocess.run(
        [str(copy / "up.sh"), "--local", "--peers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert f"up.sh: no .venv in {copy}: creating it and installing requirements.txt" in result.stdout
    assert (copy / ".venv" / "bin" / "python").exists()
    assert result.returncode == 1 and "cannot import the project's packages" in result.stderr, result.stderr


def leftovers(run_dir) -> list[str]:
    """Processes of this run still alive: peers (their command line names the run dir) or its broker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_local_runs_to_the_finish_through_a_controller_kill_and_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env(tmp_path, PYTHON=sys.executable)
    proc = subprocess.Popen(
        [UP, "--local", "--peers", "5", "--run-dir", str(run_dir), "--", *SMALL, "--max-rounds", "4", "--epochs", "3"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: rounds(run_dir), 150, "round 1 to finish")
        status = subprocess.run([UP, "status"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "controller: peer-" in status.stdout, status.stdout + status.stderr
        killed = subprocess.run(
            [UP, "kill", "controller", "--run-dir", str(run_dir)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert killed.returncode == 0 and "sent SIGKILL to peer-" in killed.stdout, killed.stdout + killed.stderr
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0, output[-3000:]  # the peer killed on purpose is no failure of the run
    for line in (
        "starting the broker and 5 peers as local processes",
        "peers joined 5/5",
        "round 1/4: accuracy",
        "finished (max-rounds)",
        f"records: {run_dir}",
        f"-m graphs {run_dir}",
    ):
        assert line in output, (line, output)
    terms = elections(run_dir)
    assert len(terms) >= 2 and terms[1]["reason"] == "controller-lost"
    assert_rounds_complete(run_dir, 4)
    assert sum(s["role"] == "finished" for s in statuses(run_dir).values()) == 4  # every survivor got the finish
    assert leftovers(run_dir) == []


def test_local_down_stops_the_network(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env(tmp_path, PYTHON=sys.executable)
    proc = subprocess.Popen(
        [UP, "--local", "--peers", "2", "--run-dir", str(run_dir), "--", *SMALL, "--max-rounds", "1000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: rounds(run_dir), 150, "round 1 to finish")
        down = subprocess.run([UP, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and "stopped the local network" in down.stdout, down.stdout + down.stderr
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopping the broker and every peer" in output
    deadline = time.monotonic() + 10
    while leftovers(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(run_dir) == []
    again = subprocess.run([UP, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "no local network is running" in again.stdout
