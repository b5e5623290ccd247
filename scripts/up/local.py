"""The network as local processes (no Docker): a real mosquitto and the peers of scripts.localnet (the one local
network, the tests' and benchmarks' too), run by the project's Python (its .venv, made if missing, or $PYTHON). The
launcher itself stays on the standard library: what needs the project's packages (checking the peer flags and the
dataset, once, before the peers start) runs in that Python (scripts/preflight.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from peer.node.signals import StopSignals, exit_status
from peer.wire.ids import launched_peer_id
from scripts import chaos
from scripts.localnet import LocalNetwork, find_mosquitto, free_port, install_command, start_dashboard
from scripts.up.common import ROOT, UpError, read_env_file, run, say
from scripts.up.logins import OBSERVER, make_credentials
from scripts.up.network import (
    Network,
    apply_settings,
    launcher_alive,
    preflight,
    preflight_env,
    remember,
    run_settings,
)
from scripts.up.progress import Progress, report_end, verdict


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
    if find_mosquitto() is None:
        raise UpError(f"the local network needs the mosquitto broker: {install_command('mosquitto')}")
    python = local_python()
    # Once, before N peers: refused flags or a missing dataset are said here, in a peer's own words.
    found = preflight([python, "-m", "scripts.preflight"], net, preflight_env(net.data_dir), load_data=True)
    apply_settings(net, found)
    data = found["data"]
    say(
        f"dataset {net.dataset}: {data['source']} (peer-1's shard {data['shard']}: {data['train']} train, {data['test']} test samples)"
    )
    run_settings(net)
    env = {**net.env, "FL_MIN_PEERS": net.env.get("FL_MIN_PEERS", str(net.total))}
    if net.data_dir is not None:
        env["FL_DATA_DIR"] = str(net.data_dir)  # the host's folder itself (no container to mount it in)
    login, page_login = None, None
    if net.brokers > 1:
        # Brokers bridged to each other, as they would be across machines: TLS only, with the network's own CA; each
        # refuses anonymous clients, its bridge logs in with a login of its own, and every peer with its own (the
        # ACL lets a login publish only as its peer, on every broker).
        peer_ids = [launched_peer_id(k) for k in range(1, net.total + 1)]
        login = make_credentials(net.state / "login", peer_ids, net.topic_prefix)
        observer = read_env_file(login.observer_env)
        page_login = {"FL_USERNAME": OBSERVER, "FL_PASSWORD": observer["FL_PASSWORD"]}
    peers = LocalNetwork(
        net.run_dir,
        len(net.peers),
        net.peer_flags,
        env=env,
        python=python,
        run_id=net.run_id,
        peers_per_process=net.per_process,
        brokers=net.brokers,
        broker_login=login.broker_login() if login else None,
        login_dir=login.folder if login else None,
        topic_prefix=net.topic_prefix,
        tls=net.brokers > 1,
        mutual_tls=net.mutual_tls,
    )
    page_port = free_port()
    tls = "mutual TLS, a certificate per peer" if net.mutual_tls else "TLS, a login per peer"
    brokers = f"{net.brokers} bridged brokers ({tls})" if net.brokers > 1 else "the broker"
    say(f"starting {brokers} and {len(net.peers)} peers as local processes; records in {net.run_dir}")
    progress = Progress(net, time.time())
    interrupted: KeyboardInterrupt | None = None
    codes: dict[str, int | None] = {}
    page = None
    # Ctrl-C, SIGTERM (./up.sh down) and SIGHUP stop the network (Ctrl-C even if the launcher was started with it
    # ignored, as a background job is); during the clean-up they are ignored: a second Ctrl-C cannot leave
    # a process behind.
    with StopSignals(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        remember(mode="local", project="local", run_dir=str(net.run_dir), pid=os.getpid(), peers=net.peers)
        try:
            peers.start()
            page = start_dashboard(peers, page_port, page_login)
            say(f"live page: http://127.0.0.1:{page_port}/ (python -m graphs.live; it only watches)")
            progress.started = time.time()
            while peers.running():
                progress.update(exit_states(peers))
                time.sleep(0.5)
            codes = peers.wait(0)
        except KeyboardInterrupt as stop:
            interrupted = stop
            signals.shield()
            say("stopping the broker and every peer")
        finally:
            signals.shield()
            if page is not None:
                page.terminate()
                page.wait(10)
            peers.stop()
        progress.update(exit_states(peers))
    failed = verdict({p: exit_code(c) for p, c in codes.items()}, net.killed_on_purpose()) if not interrupted else {}
    report_end(net.run_dir, failed, interrupted is not None)
    if interrupted:
        return exit_status(interrupted)
    return 1 if failed else 0


def exit_code(code: int | None) -> int | None:
    """A process's exit code as a shell (and docker) gives it: 128 + N for one killed by signal N."""
    return 128 - code if code is not None and code < 0 else code


def exit_states(peers: LocalNetwork) -> dict[str, str]:
    """Each peer process's state, as the progress lines say a container's: running, or exited with its code."""
    return {
        peer: "running" if proc.poll() is None else f"exited {exit_code(proc.poll())}"
        for peer, proc in peers.procs.items()
    }


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


def kill_broker(run_dir: Path, target: str | None, sig: str) -> str:
    """Signal a local broker (None: the controller's; else broker-N or N) by its pid; recorded in chaos.csv."""
    if not run_dir.is_dir():
        raise UpError(f"run dir {run_dir} does not exist")
    try:
        name, pid = chaos.kill_broker(run_dir, target, sig)
    except (chaos.ChaosError, ProcessLookupError, PermissionError) as err:
        raise UpError(f"nothing to act on: {err}") from None
    return f"sent SIG{sig} to {name} (pid {pid})"


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
