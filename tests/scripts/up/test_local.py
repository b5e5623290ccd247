"""The launcher's local path: what it needs (mosquitto, the project's Python) and, end to end with a real broker and
real peers, a run through a controller kill, `status`, `kill` and `down`, leaving nothing behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

from scripts.up import cli, local
from tests.netutil import FASHION, ROOT, SMALL, assert_rounds_complete, elections, rounds, statuses, wait_until
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
    for k in range(1, 6):  # each log opens with the peer's own lines, not TensorFlow's start-up banners
        log = (run_dir / "peers" / f"peer-{k}" / "peer.log").read_text()
        assert "oneDNN custom operations" not in log and "absl::InitializeLog" not in log, log[:1000]
    assert leftovers(run_dir) == []


def test_local_down_stops_the_network(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env(tmp_path, PYTHON=sys.executable)
    proc = subprocess.Popen(
        # (--data-dir after --: the host's folder, as local peers read it; they were once given the containers' path)
        [
            UP,
            "--local",
            "--peers",
            "2",
            "--run-dir",
            str(run_dir),
            "--",
            *SMALL,
            "--max-rounds",
            "1000",
            "--data-dir",
            str(FASHION),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: rounds(run_dir), 150, "round 1 to finish")
        down = subprocess.run([UP, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "stopped the local network" in down.stdout, down.stdout + down.stderr
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(60)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopping the broker and every peer" in output
    assert f"dataset fashion-mnist: {FASHION} (peer-1's shard 0/2: 500 train, 200 test samples)" in output
    for peer in ("peer-1", "peer-2"):
        assert json.loads((run_dir / "peers" / peer / "data.json").read_text())["source"] == str(FASHION)
    deadline = time.monotonic() + 60
    while leftovers(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(run_dir) == []
    again = subprocess.run([UP, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "no local network is running" in again.stdout


def test_a_first_run_without_its_dataset_says_why_once_and_starts_no_peer(tmp_path, no_docker):
    """A new user's first `./up.sh`: no Docker, so local processes, with the default dataset (mnist), which is not
    on the machine and cannot be downloaded. The peer's own reason and how to get the data, once; no peer started."""
    run_dir = tmp_path / "run"
    env = clean_env(
        tmp_path,
        PATH=no_docker,
        PYTHON=sys.executable,
        KERAS_HOME=str(tmp_path / "keras"),  # nothing cached
        HTTPS_PROXY="http://127.0.0.1:9",  # no internet: the download is refused at once
        https_proxy="http://127.0.0.1:9",
    )
    result = subprocess.run(
        [UP, "--peers", "3", "--run-dir", str(run_dir)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 1, result.stdout + result.stderr
    err = result.stderr
    assert "up.sh: error: the peers cannot start: dataset 'mnist': not in the Keras cache" in err, err
    assert err.count("How to get it: MNIST: ") == 1 and "--data-dir FOLDER" in err
    assert "Traceback" not in err and "oneDNN" not in err
    assert not (run_dir / "peers").exists(), "no peer may start without its data"


def test_peers_that_fail_say_why_in_one_line(tmp_path):
    """Peers that stop on an error of their own (here a --model file that is not there, which only a peer checks):
    the launcher prints their reason, once for the peers that failed alike, not their logs' tails."""
    run_dir = tmp_path / "run"
    env = clean_env(tmp_path, PYTHON=sys.executable)
    missing = tmp_path / "nowhere" / "model.py"
    result = subprocess.run(
        [UP, "--local", "--peers", "2", "--run-dir", str(run_dir), "--", *SMALL, "--model", f"{missing}:build"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    said = [line for line in result.stdout.splitlines() if " failed (exit " in line]
    assert said == [
        f"up.sh: peer-1, peer-2 failed (exit 2): --model {missing}:build: there is no file {missing} "
        f"(a relative path counts from the folder the peer runs in, {ROOT})"
    ], result.stdout
    assert "no round finished" in result.stdout and "its last lines" not in result.stdout
