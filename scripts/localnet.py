"""A whole federation on this machine, without Docker: a real mosquitto on a free port and N peer processes.

The one local network: `./up.sh --local` (in the launcher's own process), the end-to-end tests, the benchmarks and
the experiment script all run it, so all of them run the network the same way. Standard library only, as the
launcher: the peers run in the Python it is given (`python=`).

    python -m scripts.localnet --peers 5 --run-dir runs/demo -- --dataset fashion-mnist --max-rounds 3

Peers are `peer-1`..`peer-N` on shards `0/N`..`N-1/N` and, unless the peer flags say otherwise, wait for all N
before the first election (`--min-peers N`); their logs go to `RUN_DIR/peers/<id>/peer.log` and, prefixed with the
id, to this terminal. Ctrl-C (or SIGTERM) stops every process it started; none is left behind.

With `--peers-per-process K` the peers run K to a process (`python -m peer.host`: peers 1..K in the first, and so
on), so that a hundred of them fit on one machine; each keeps its own connection, records and `peer.log` (the
host's combined output is also in `RUN_DIR/hosts/<first peer>.log`). Signalling a peer signals its whole process.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import IO

from peer.node.signals import StopSignals
from peer.records.run_dir import (
    BROKER_LOG_FILE,
    CheckpointError,
    host_log,
    killed_on_purpose,
    peer_log,
    read_checkpoint,
)
from peer.wire.ids import launched_peer_id, new_run_id

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONF = ROOT / "broker" / "mosquitto.local.conf"
_PEER_FIELD = re.compile(rb" peer=(\S+) ")
MOSQUITTO_PLACES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto")


# --- the roster: which peers, on which shards, in which processes ------------------------------------------------------


def launched_shard(peer_id: str, shards: int) -> str:
    """The shard of a launched peer: peer-K reads shard K-1 of `shards` (every launcher's one naming rule: peer-1..
    peer-N on shards 0/N..N-1/N, so a peer restarted under its id gets its data back)."""
    return f"{int(peer_id.rsplit('-', 1)[1]) - 1}/{shards}"


def roster(count: int, shards: int | None = None, first: int = 1) -> list[tuple[str, str]]:
    """(id, shard) of `count` launched peers from peer-`first`, on shards of `shards` (default: as many as peers)."""
    shards = shards or first - 1 + count
    return [(launched_peer_id(k), launched_shard(launched_peer_id(k), shards)) for k in range(first, first + count)]


def processes_of(peers: list[str], per_process: int) -> list[list[str]]:
    """The peers K to a process, in order (peer.host runs each group; a group of one is a `python -m peer`)."""
    return [peers[i : i + per_process] for i in range(0, len(peers), per_process)]


# --- the broker -------------------------------------------------------------------------------------------------------


class MosquittoMissing(RuntimeError):
    """No mosquitto on this machine; the message says how to install it here."""


def find_mosquitto() -> str | None:
    """The mosquitto broker's binary: on PATH, or where the distributions put it (often outside a user's PATH)."""
    for candidate in (shutil.which("mosquitto"), *MOSQUITTO_PLACES):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


def install_command(package: str) -> str:
    """The exact command that installs a system package on this host."""
    if platform.system() == "Darwin":
        return f"brew install {package}"
    ids = ""
    try:
        text = Path("/etc/os-release").read_text()
        ids = " ".join(re.findall(r"^(?:ID|ID_LIKE)=\"?([^\"\n]*)", text, re.M))
    except OSError:
        pass
    sudo = "" if os.geteuid() == 0 else "sudo "
    for names, tool in (
        ("debian ubuntu", "apt-get install -y"),
        ("fedora rhel centos", "dnf install -y"),
        ("arch", "pacman -S"),
        ("alpine", "apk add"),
        ("suse", "zypper install"),
    ):
        if any(name in ids.split() for name in names.split()):
            return f"{sudo}{tool} {package}"
    return f"{sudo}apt-get install -y {package}"


# --- logs -------------------------------------------------------------------------------------------------------------


class PeerLogs:
    """Where each line of a peer process's output goes. A process of one peer: every line to its
    `peers/<id>/peer.log`. A host of several (peer.host): each line to the log of the peer its `peer=<id>` field
    names (a line naming none, a traceback's rest or the run summary table, goes with the line before it), and, when
    `combined` is given, every line to the host's own log too (`hosts/<first peer>.log`)."""

    def __init__(self, run_dir: Path, peers: list[str], combined: Path | None = None):
        self.peers = list(peers)
        self.current: str | None = peers[0] if len(peers) == 1 else None
        self._files: dict[str, IO[bytes]] = {}
        try:
            for peer in peers:
                path = peer_log(run_dir, peer)
                path.parent.mkdir(parents=True, exist_ok=True)
                self._files[peer] = open(path, "ab")
            if combined is not None:
                combined.parent.mkdir(parents=True, exist_ok=True)
                self._combined: IO[bytes] | None = open(combined, "ab")
            else:
                self._combined = None
        except OSError:
            self.close()
            raise

    def whose(self, line: bytes) -> str | None:
        """The peer `line` is about (None: a host's line before any peer's, e.g. its own loading)."""
        if len(self.peers) > 1:
            match = _PEER_FIELD.search(line)
            if match:
                self.current = match[1].decode(errors="replace")
        return self.current

    def write(self, line: bytes) -> str | None:
        """Write `line` where it belongs, at once (a reader sees it as soon as it is said); whose line it was."""
        peer = self.whose(line)
        if self._combined is not None:
            self._combined.write(line)
            self._combined.flush()
        out = self._files.get(peer) if peer is not None else None
        if out is not None:
            out.write(line)
            out.flush()
        return peer

    def close(self) -> None:
        for out in [*self._files.values(), *([self._combined] if self._combined else [])]:
            out.close()
        self._files, self._combined = {}, None

    def __enter__(self) -> PeerLogs:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def split_host_log(path: Path, peers: list[str], run_dir: Path) -> None:
    """A host's whole log, kept at `path` (a container's, saved after it ran), line by line into its peers' logs."""
    with PeerLogs(run_dir, peers) as logs, open(path, "rb") as combined:
        for line in combined:
            logs.write(line)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


class Broker:
    """A real mosquitto process on 127.0.0.1 with the project's local configuration and a port of its own."""

    def __init__(self, port: int | None = None, log_path: Path | None = None, settings: dict[str, str] | None = None):
        """`settings`: mosquitto options that replace or add to the local configuration's (e.g. `sys_interval`, for
        a benchmark that reads the broker's $SYS counters, or a smaller `message_size_limit`)."""
        self.port = port or free_port()
        self.log_path = log_path
        self.settings = dict(settings or {})
        self.proc: subprocess.Popen | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="fl-broker-"))
        self.conf = self._dir / "mosquitto.conf"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        lines = LOCAL_CONF.read_text().splitlines()
        lines = [f"listener {self.port} 127.0.0.1" if line.startswith("listener ") else line for line in lines]
        lines = [line for line in lines if line.split(" ", 1)[0] not in self.settings]
        lines += [f"{name} {value}" for name, value in self.settings.items()]
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> Broker:
        binary = find_mosquitto()
        if not binary:
            raise MosquittoMissing(f"the local network needs the mosquitto broker: {install_command('mosquitto')}")
        self._write_conf()
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        if not wait_for_port(self.port, 10):
            self.stop()
            raise RuntimeError(f"mosquitto did not start listening on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self, pause: float = 0.5) -> None:
        self.stop()
        time.sleep(pause)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


class LearningService:
    """The machine's learning service for a network of local peers (`python -m peer.learning.service`): one
    TensorFlow for all of them, its jobs `workers` at a time with `threads` threads in all."""

    def __init__(
        self,
        log_path: Path | None = None,
        workers: int = 1,
        threads: int | None = None,
        python: str = sys.executable,
        env: dict | None = None,
    ):
        self._dir = Path(tempfile.mkdtemp(prefix="fl-learn-"))  # 0700: only this user reaches the socket
        self.socket = self._dir / "learn.sock"
        self.log_path, self.workers, self.threads = log_path, workers, threads or os.cpu_count() or 1
        self.python, self.env = python, env
        self.proc: subprocess.Popen | None = None

    def start(self) -> LearningService:
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [
                self.python,
                "-m",
                "peer.learning.service",
                "--socket",
                str(self.socket),
                "--workers",
                str(self.workers),
                "--threads",
                str(self.threads),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self  # not waited for: a peer waits for the socket when it first needs the service

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)


class LocalNetwork:
    """N peer processes against one broker. Every process it starts, it stops."""

    def __init__(
        self,
        run_dir: Path,
        peers: int = 5,
        peer_args: list[str] | tuple = (),
        broker: Broker | None = None,
        env: dict | None = None,
        echo: bool = False,
        python: str = sys.executable,
        broker_port: int | None = None,
        num_shards: int | None = None,
        run_id: str | None = None,
        secret: bool = True,
        peer_env: dict[str, dict] | None = None,
        peers_per_process: int = 1,
        learning_workers: int | None = None,
    ):
        """Every network is a run of its own (`run_id`, new by default) and, unless `secret=False`, has its own
        federation secret, in a file only this user can read, removed when the network stops. With
        `peers_per_process` K > 1 the peers run K to a process (peer.host)."""
        if peers_per_process < 1:
            raise ValueError(f"peers_per_process must be at least 1, not {peers_per_process}")
        self.run_dir = Path(run_dir)
        self.run_id = run_id or new_run_id(time.time())
        self._secret_dir = Path(tempfile.mkdtemp(prefix="fl-secret-")) if secret else None
        self.secret_file = self._secret_dir / "federation.key" if self._secret_dir else None
        if self.secret_file:
            self.secret_file.write_bytes(secrets.token_hex(32).encode())
            self.secret_file.chmod(0o600)
        self.count, self.peer_args = peers, list(peer_args)
        self.num_shards = num_shards or peers  # more shards than peers leaves room for peers that join later
        self.broker = broker
        self.owns_broker = broker is None
        self.broker_port = broker_port
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        self.peer_env = peer_env or {}  # per peer id: variables of its own (e.g. its broker login)
        self.echo, self.python = echo, python
        self.per_process = peers_per_process
        self.procs: dict[str, subprocess.Popen] = {}  # per peer id; the K peers of one host share one
        self.hosts: dict[str, list[str]] = {}  # host name (its first peer's id) -> the peers it runs
        self._threads: list[threading.Thread] = []
        self._print_lock = threading.Lock()
        # One learning service for every peer of the network (their jobs share the machine's cores); 0: none, each
        # peer process starts its own.
        workers = int(os.environ.get("SDFL_LEARNING_WORKERS", "1")) if learning_workers is None else learning_workers
        self.learning = (
            LearningService(self.run_dir / "learning.log", workers, python=python, env=self.env)
            if workers > 0
            else None
        )

    @staticmethod
    def peer_id(index: int) -> str:
        return launched_peer_id(index + 1)

    def start_services(self) -> LocalNetwork:
        """The broker (unless one was given) and the learning service, without peers: for a peer that must come
        before the others (a test's). Once: `start` calls it too."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.learning is not None and self.learning.proc is None:
            self.learning.start()
        if self.broker is None:
            self.broker = Broker(self.broker_port, log_path=self.run_dir / BROKER_LOG_FILE).start()
        return self

    def start(self) -> LocalNetwork:
        self.start_services()
        shards = dict(roster(self.count, self.num_shards))
        for group in processes_of(list(shards), self.per_process):
            if self.per_process == 1:
                self.start_peer(group[0], shards[group[0]])
            else:
                self.start_host([(peer_id, shards[peer_id]) for peer_id in group])
        return self

    def _common_args(self) -> list[str]:
        assert self.broker is not None, "start() first"
        run = ["--run-id", self.run_id] + (["--secret-file", str(self.secret_file)] if self.secret_file else [])
        if self.learning is not None:
            run += ["--learning-service", str(self.learning.socket)]
        return ["--broker", self.broker.address, *run, "--run-dir", str(self.run_dir)]

    def start_peer(
        self, peer_id: str, shard: str, extra_args: Iterable[str] = (), module: str = "peer"
    ) -> subprocess.Popen:
        """One peer process (`python -m peer`, or another `module` that takes the peer's flags: a test's liar)."""
        cmd = [self.python, "-m", module, "--peer-id", peer_id, "--shard", shard, *self._common_args()]
        return self._launch([peer_id], [*cmd, *self.peer_args, *extra_args], hosted=False)

    def start_peer_by_id(self, peer_id: str, extra_args: Iterable[str] = ()) -> subprocess.Popen:
        """The launched peer `peer_id` (peer-K) on its own shard (K-1): one joining late, or one started again under its
        id after a kill, as a user restarting it would."""
        return self.start_peer(peer_id, launched_shard(peer_id, self.num_shards), extra_args)

    def start_host(self, members: list[tuple[str, str]], extra_args: Iterable[str] = ()) -> subprocess.Popen:
        """One process (peer.host) running the peers `members` [(id, shard)]; its name is its first peer's id."""
        hosted = ",".join(f"{peer_id}={shard}" for peer_id, shard in members)
        cmd = [self.python, "-m", "peer.host", "--hosted", hosted, *self._common_args()]
        ids = [peer_id for peer_id, _ in members]
        proc = self._launch(ids, [*cmd, *self.peer_args, *extra_args], hosted=True)
        self.hosts[ids[0]] = ids
        return proc

    def _launch(self, ids: list[str], cmd: list[str], hosted: bool) -> subprocess.Popen:
        """Start one process for the peers `ids`; a thread of its own takes its output to their logs."""
        logs = PeerLogs(self.run_dir, ids, host_log(self.run_dir, ids[0]) if hosted else None)
        env = {**self.env, **self.peer_env.get(ids[0], {})}
        try:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
            )
        except OSError:
            logs.close()
            raise
        for peer_id in ids:
            self.procs[peer_id] = proc
        thread = threading.Thread(target=self._pump, args=(proc, logs, ids[0]), daemon=True)
        thread.start()
        self._threads.append(thread)
        return proc

    def host_of(self, peer_id: str) -> list[str]:
        """The peers that share `peer_id`'s process (itself alone if it has one of its own)."""
        return next((ids for ids in self.hosts.values() if peer_id in ids), [peer_id])

    def _pump(self, proc: subprocess.Popen, logs: PeerLogs, name: str) -> None:
        with logs:
            assert proc.stdout is not None
            for line in proc.stdout:
                whose = logs.write(line)
                if self.echo:
                    with self._print_lock:
                        sys.stdout.write(f"{whose or name:>8} | {line.decode(errors='replace')}")
                        sys.stdout.flush()

    def signal(self, peer_id: str, sig: int) -> None:
        proc = self.procs[peer_id]
        if proc.poll() is None:
            proc.send_signal(sig)

    def running(self) -> list[str]:
        return [pid for pid, proc in self.procs.items() if proc.poll() is None]

    def wait(self, timeout: float) -> dict[str, int | None]:
        """Wait until every peer has exited or the timeout passes; the exit codes (None: still running)."""
        deadline = time.monotonic() + timeout
        while self.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        for thread in self._threads:
            thread.join(timeout=1)
        return {peer_id: proc.poll() for peer_id, proc in self.procs.items()}

    def processes(self) -> list[subprocess.Popen]:
        return list({id(proc): proc for proc in self.procs.values()}.values())

    def stop(self) -> None:
        """SIGCONT (a stopped peer cannot die of SIGTERM), SIGTERM, then SIGKILL whatever is left."""
        for proc in self.processes():
            if proc.poll() is None:
                for sig in (signal.SIGCONT, signal.SIGTERM):
                    try:
                        proc.send_signal(sig)
                    except ProcessLookupError:
                        pass
        deadline = time.monotonic() + 10 + 5 * (self.per_process > 1)  # a host says goodbye for K peers
        for proc in self.processes():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self.owns_broker and self.broker:
            self.broker.close()
        if self.learning is not None:
            self.learning.stop()
        if self._secret_dir:
            shutil.rmtree(self._secret_dir, ignore_errors=True)

    def peer_log(self, peer_id: str) -> str:
        path = peer_log(self.run_dir, peer_id)
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def split_peer_args(argv: list[str] | None) -> tuple[list[str], list[str]]:
    """(the script's own arguments, the peer flags after `--`) of a command line that runs peers."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        return argv, []
    split = argv.index("--")
    return argv[:split], argv[split + 1 :]


def with_min_peers(peer_args: list[str], peers: int, environ=os.environ) -> list[str]:
    """The peer flags, `--min-peers N` first so that the first election waits for all N peers. Put before them, it
    loses to a --min-peers among them (a peer keeps the last value of a flag); left out when FL_MIN_PEERS is set,
    which the flag would beat. A single peer gets no default: --min-peers must be at least 2."""
    if peers < 2 or environ.get("FL_MIN_PEERS"):
        return list(peer_args)
    return ["--min-peers", str(peers), *peer_args]


def start_dashboard(net: LocalNetwork, port: int) -> subprocess.Popen:
    """The live page of this network (graphs.live): an observer process; the federation does not depend on it."""
    assert net.broker is not None, "start the network first"
    cmd = [net.python, "-m", "graphs.live", "--broker", net.broker.address, "--run-id", net.run_id, "--port", str(port)]
    if net.secret_file:
        cmd += ["--secret-file", str(net.secret_file)]
    return subprocess.Popen(
        cmd, cwd=ROOT, env=net.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )


def main(argv: list[str] | None = None) -> int:
    argv, peer_args = split_peer_args(argv)
    parser = argparse.ArgumentParser(
        prog="python -m scripts.localnet",
        description="Run a broker and N peers as local processes (no Docker). "
        "Flags after -- go to every peer (see python -m peer --help).",
    )
    parser.add_argument(
        "--peers", type=int, default=5, help="number of peers (default 5); the peers' --min-peers defaults to it"
    )
    parser.add_argument(
        "--run-dir", type=Path, default=Path("runs/latest"), help="records folder (default runs/latest)"
    )
    parser.add_argument("--port", type=int, default=None, help="broker port (default: a free one)")
    parser.add_argument("--timeout", type=float, default=0, help="stop everything after this many seconds (0: never)")
    parser.add_argument("--quiet", action="store_true", help="do not echo the peers' logs")
    parser.add_argument(
        "--peers-per-process",
        type=int,
        default=1,
        metavar="K",
        help="run the peers K to a process (python -m peer.host), sharing one TensorFlow: a hundred "
        "peers fit on one machine (default 1: a process each)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with the run whose checkpoint is in --run-dir (its run id, model and rounds)",
    )
    parser.add_argument(
        "--dashboard-port",
        type=int,
        default=0,
        metavar="PORT",
        help="also serve the live page (python -m graphs.live, an observer) on 127.0.0.1:PORT",
    )
    args = parser.parse_args(argv)
    if args.peers < 1:
        parser.error("--peers must be at least 1")
    if args.peers_per_process < 1:
        parser.error("--peers-per-process must be at least 1")
    run_id = os.environ.get("FL_RUN_ID") or None  # a launcher's (./up.sh), or a new one
    if args.resume:
        if args.peers_per_process > 1:
            parser.error("--resume needs one peer per process (leave --peers-per-process out)")
        try:
            checkpoint = read_checkpoint(args.run_dir)
        except CheckpointError as err:
            parser.exit(2, f"{parser.prog}: error: --resume: {err}\n")
        if checkpoint is None:
            parser.exit(
                2,
                f"{parser.prog}: error: --resume: no checkpoint in {args.run_dir} (a run writes one after "
                "every finished round)\n",
            )
        run_id, peer_args = checkpoint.run_id, ["--resume", *peer_args]
        print(f"localnet: going on with run {run_id} after round {checkpoint.round}", flush=True)

    net = LocalNetwork(
        args.run_dir,
        args.peers,
        with_min_peers(peer_args, args.peers),
        echo=not args.quiet,
        broker_port=args.port,
        run_id=run_id,
        peers_per_process=args.peers_per_process,
    )
    with StopSignals():  # SIGTERM stops every process it started, as Ctrl-C does
        return _run(net, args)


def _run(net: LocalNetwork, args: argparse.Namespace) -> int:
    page = None
    try:
        net.start()
        if args.dashboard_port:
            page = start_dashboard(net, args.dashboard_port)
            print(f"localnet: live page http://127.0.0.1:{args.dashboard_port}/", flush=True)
        hosted = f" ({len(net.processes())} processes)" if args.peers_per_process > 1 else ""
        assert net.broker is not None  # (started)
        print(
            f"localnet: broker {net.broker.address}, run {net.run_id}, {args.peers} peers{hosted}, records in "
            f"{args.run_dir}",
            flush=True,
        )
        codes = net.wait(args.timeout or float("inf"))
    except KeyboardInterrupt:
        print("\nlocalnet: stopping every peer and the broker", flush=True)
        net.stop()
        return 130
    except MosquittoMissing as err:
        print(f"python -m scripts.localnet: error: {err}", file=sys.stderr, flush=True)
        net.stop()
        return 1
    finally:
        if page is not None:
            page.terminate()
            page.wait(10)
    net.stop()
    # Peers killed on purpose (python -m scripts.chaos, ./up.sh kill) are not failures of the run.
    # Killing a peer hosted with others (--peers-per-process) kills its whole process: those peers went on purpose too.
    killed = {peer for victim in killed_on_purpose(args.run_dir) for peer in net.host_of(victim)}
    failed = {peer: code for peer, code in codes.items() if code != 0 and not (peer in killed and code and code < 0)}
    print(f"localnet: records in {args.run_dir}; draw the graphs with: python -m graphs {args.run_dir}", flush=True)
    if failed:
        print(f"localnet: peers that did not exit 0: {failed}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
