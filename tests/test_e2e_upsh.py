"""End to end through the user's main command: `./up.sh --local --peers 5` runs a real broker and five peers to
the finish; `./up.sh kill controller` during it leads to a re-election and still a finish; nothing is left
running afterwards. (No Docker engine runs here: the container path is checked statically in test_compose.py.)"""
from __future__ import annotations

import os
import subprocess
import sys

from tests.netutil import ROOT, SMALL, assert_rounds_complete, elections, rounds, statuses, wait_until


def leftovers(run_dir) -> list[str]:
    """Processes of this run still alive: peers (their command line names the run dir) or its broker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline or ("mosquitto" in cmdline and "fl-broker-" in cmdline):
            found.append(f"{pid}: {cmdline}")
    return found


def test_up_sh_local_runs_to_the_finish_through_a_controller_kill_and_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHON": sys.executable}
    before = set(leftovers(run_dir))
    up = subprocess.Popen([str(ROOT / "up.sh"), "--local", "--peers", "5", "--run-dir", str(run_dir), "--", *SMALL,
                           "--max-rounds", "4", "--epochs", "3"],
                          cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: rounds(run_dir), 150, "round 1 to finish")
        status = subprocess.run([str(ROOT / "up.sh"), "status", "--run-dir", str(run_dir)], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "controller: peer-" in status.stdout, status.stdout + status.stderr
        killed = subprocess.run([str(ROOT / "up.sh"), "kill", "controller", "--run-dir", str(run_dir)], cwd=ROOT,
                                env=env, capture_output=True, text=True, timeout=30)
        assert killed.returncode == 0, killed.stdout + killed.stderr
        output, _ = up.communicate(timeout=240)
    finally:
        if up.poll() is None:
            up.terminate()
            up.wait(30)
    assert up.returncode == 0, output[-3000:]   # the peer killed on purpose is no failure of the run
    assert "no Docker engine" not in output or "--local" in output
    terms = elections(run_dir)
    assert len(terms) >= 2 and terms[1]["reason"] == "controller-lost"
    assert_rounds_complete(run_dir, 4)
    final = statuses(run_dir)
    assert sum(s["role"] == "finished" for s in final.values()) == 4     # every survivor got the finish
    assert f"python -m graphs {run_dir}" in output                       # where the records are, how to draw them
    assert set(leftovers(run_dir)) - before == set()
