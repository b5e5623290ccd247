"""The network as local processes (no Docker): a real mosquitto and the peers of scripts.localnet, run by the
project's Python (its .venv, made if missing, or $PYTHON)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from peer.node.signals import StopSignals, exit_status
from scripts import chaos
from scripts.localnet import find_mosquitto, free_port, install_command
from scripts.up.common import ROOT, UpError, run, say
from scripts.up.network import Network, launcher_alive, remember
from scripts.up.progress import Progress, report_end


def local_python() -> str:
    """$PYTHON, else the checkout's .venv (created, with the requirements, if missing)."""
    if os.environ.get("PYTHON"):
        return os.environ["PYTHON"]
    venv_python = ROOT / ".venv" / "bin" / "python"
    if not venv_python.exists():
        say(f"no .venv in {ROOT}: creating it and installing requirements.txt (a few minutes, once)")
        run([sys.executable, "-m", "venv", str(ROOT / ".venv")], capture=False)
        code = subprocess.run(
            [str(venv_python), "-m", "pip", "install", "-q", "-r", str(ROOT / "requirements.txt")],
            start_new_session=True,
        ).returncode
        if code != 0:
            raise UpError(
                f"installing requirements.txt into .venv failed (status {code}); fix the cause and run "
                f"`.venv/bin/pip install -r requirements.txt`, or remove .venv to start over"
            )
    return str(venv_python)


def run_local(net: Network) -> int:
    if net.join or net.first != 1 or net.total != len(net.peers):
        raise UpError(
            "--join, --first and --total need containers; a local peer joins another broker with "
            "`python -m peer --broker HOST:PORT ...` (README: Several machines)",
            2,
        )
    mosquitto = find_mosquitto()
    if mosquitto is None:
        raise UpError(f"the local network needs the mosquitto broker: {install_command('mosquitto')}")
    python = local_python()
    probe = (
        "import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ('paho', 'numpy', 'tensorflow')))"
    )
    if subprocess.run([python, "-c", probe], capture_output=True).returncode != 0:
        raise UpError(
            f"{python} cannot import the project's packages (paho-mqtt, numpy, tensorflow): "
            f"`{python} -m pip install -r requirements.txt`, or set PYTHON"
        )
    net.run_dir.mkdir(parents=True, exist_ok=True)
    page_port = free_port()
    cmd = [
        python,
        "-m",
        "scripts.localnet",
        "--peers",
        str(len(net.peers)),
        "--run-dir",
        str(net.run_dir),
        "--quiet",
        "--dashboard-port",
        str(page_port),
        *(["--resume"] if net.resume else []),
        *(["--peers-per-process", str(net.per_process)] if net.per_process > 1 else []),
    ]
    if net.peer_flags:
        cmd += ["--", *net.peer_flags]
    env = {**os.environ, **net.env, "FL_MIN_PEERS": net.env.get("FL_MIN_PEERS", str(net.total))}
    say(f"starting the broker and {len(net.peers)} peers as local processes; records in {net.run_dir}")
    say(f"live page: http://127.0.0.1:{page_port}/ (python -m graphs.live; it only watches)")
    started = time.time()
    progress = Progress(net, started)
    interrupted: KeyboardInterrupt | None = None
    # Ctrl-C, SIGTERM (./up.sh down) and SIGHUP stop the network; during the clean-up they are ignored, so that a
    # second Ctrl-C cannot leave anything behind.
    with StopSignals(signal.SIGTERM, signal.SIGHUP) as signals:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        remember(mode="local", project="local", run_dir=str(net.run_dir), pid=os.getpid(), peers=net.peers)
        try:
            while proc.poll() is None:
                progress.update()
                time.sleep(0.5)
        except KeyboardInterrupt as stop:
            interrupted = stop
            signals.shield()
            say("stopping the broker and every peer")
            proc.terminate()
        signals.shield()
        code = proc.wait()
        progress.update()
    report_end(net.run_dir, {} if code == 0 or interrupted else {"the launcher": code}, interrupted is not None)
    if interrupted:
        return exit_status(interrupted)
    return 0 if code == 0 else 1


def status(run_dir: Path) -> str:
    if not run_dir.is_dir():
        raise UpError(f"run dir {run_dir} does not exist")
    return chaos.format_status(run_dir)


def kill(run_dir: Path, target: str, sig: str) -> str:
    """Signal the local peer `target` (controller, random or an id) by its pid; recorded in chaos.csv."""
    if not run_dir.is_dir():
        raise UpError(f"run dir {run_dir} does not exist")
    try:
        peer, pid = chaos.kill(run_dir, target, sig)
    except (chaos.ChaosError, ProcessLookupError, PermissionError) as err:
        raise UpError(f"nothing to act on: {err}") from None
    return f"sent SIG{sig} to {peer} (pid {pid})"


def down(launcher_pid: int | None) -> str:
    """Stop the local network through the launcher that runs it (SIGTERM: it stops every process it started)."""
    if not launcher_alive(launcher_pid):
        return "no local network is running"
    assert launcher_pid is not None
    os.kill(launcher_pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while launcher_alive(launcher_pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return f"stopped the local network (launcher pid {launcher_pid})"
