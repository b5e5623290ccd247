"""A whole federation on this machine, without Docker: a real mosquitto on a free port and N peer processes.

Used by `./up.sh --local`, the end-to-end tests, the benchmarks and the experiment script, so all of them run the
network the same way.

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
from pathlib import Path

from peer.records.run_dir import PEER_LOG_FILE, CheckpointError, killed_on_purpose, peer_dir, read_checkpoint
from peer.wire.ids import launched_peer_id, new_run_id

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONF = ROOT / "broker" / "mosquitto.local.conf"
_PEER_FIELD = re.compile(rb" peer=(\S+) ")


class HostLines:
    """Whose line this is, in the output of a host (peer.host) of several peers: the peer its `peer=<id>` field
    names; a line naming none (a traceback's rest, the run summary table) belongs to the peer of the line before."""

    def __init__(self):
        self.current: str | None = None

    def __call__(self, line: bytes) -> str | None:
        match = _PEER_FIELD.search(line)
        if match:
            self.current = match[1].decode(errors="replace")
        return self.current


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
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if not binary:
            raise SystemExit("mosquitto is not installed: `sudo apt-get install mosquitto` (Debian/Ubuntu)")
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
        self.secret_file = self._secret_dir / "federation.key" if secret else None
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

    def start(self) -> LocalNetwork:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.learning is not None:
            self.learning.start()
        if self.broker is None:
            self.broker = Broker(self.broker_port, log_path=self.run_dir / "broker.log").start()
        if self.per_process == 1:
            for index in range(self.count):
                self.start_peer(self.peer_id(index), shard=f"{index}/{self.num_shards}")
            return self
        for first in range(0, self.count, self.per_process):
            self.start_host(
                [
                    (self.peer_id(index), f"{index}/{self.num_shards}")
                    for index in range(first, min(first + self.per_process, self.count))
                ]
            )
        return self

    def _common_args(self) -> list[str]:
        run = ["--run-id", self.run_id] + (["--secret-file", str(self.secret_file)] if self.secret_file else [])
        if self.learning is not None:
            run += ["--learning-service", str(self.learning.socket)]
        return ["--broker", self.broker.address, *run, "--run-dir", str(self.run_dir)]

    def start_host(self, members: list[tuple[str, str]], extra_args: list[str] = ()) -> subprocess.Popen:
        """One process (peer.host) running the peers `members` [(id, shard)]; its name is its first peer's id."""
        name = members[0][0]
        ids = [peer_id for peer_id, _ in members]
        log_path = self.run_dir / "hosts" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        for peer_id in ids:
            peer_dir(self.run_dir, peer_id).mkdir(parents=True, exist_ok=True)
        hosted = ",".join(f"{peer_id}={shard}" for peer_id, shard in members)
        cmd = [self.python, "-m", "peer.host", "--hosted", hosted, *self._common_args(), *self.peer_args, *extra_args]
        env = {**self.env, **self.peer_env.get(name, {})}
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        for peer_id in ids:
            self.procs[peer_id] = proc
        self.hosts[name] = ids
        thread = threading.Thread(target=self._pump_host, args=(name, ids, proc, log_path), daemon=True)
        thread.start()
        self._threads.append(thread)
        return proc

    def host_of(self, peer_id: str) -> list[str]:
        """The peers that share `peer_id`'s process (itself alone if it has one of its own)."""
        return next((ids for ids in self.hosts.values() if peer_id in ids), [peer_id])

    def _pump_host(self, name: str, ids: list[str], proc: subprocess.Popen, log_path: Path) -> None:
        """Each line to the log of the peer it names (`peer=<id>`); a line naming none (a traceback's rest, the run
        summary) goes with the line before it. Everything also to the host's own log."""
        logs = {peer_id: open(peer_dir(self.run_dir, peer_id) / PEER_LOG_FILE, "ab") for peer_id in ids}
        whose = HostLines()
        try:
            with open(log_path, "ab") as combined:
                for line in proc.stdout:
                    combined.write(line)
                    current = whose(line)
                    if current in logs:
                        logs[current].write(line)
                        logs[current].flush()
                    combined.flush()
                    if self.echo:
                        with self._print_lock:
                            sys.stdout.write(f"{current or name:>8} | {line.decode(errors='replace')}")
                            sys.stdout.flush()
        finally:
            for log in logs.values():
                log.close()

    def start_peer(self, peer_id: str, shard: str, extra_args: list[str] = ()) -> subprocess.Popen:
        log_path = peer_dir(self.run_dir, peer_id) / PEER_LOG_FILE
        log_path.parent.mkdir(parents=True, exist_ok=True)
        run = ["--run-id", self.run_id] + (["--secret-file", str(self.secret_file)] if self.secret_file else [])
        if self.learning is not None:
            run += ["--learning-service", str(self.learning.socket)]
        cmd = [
            self.python,
            "-m",
            "peer",
            "--broker",
            self.broker.address,
            "--peer-id",
            peer_id,
            "--shard",
            shard,
            *run,
            "--run-dir",
            str(self.run_dir),
            *self.peer_args,
            *extra_args,
        ]
        env = {**self.env, **self.peer_env.get(peer_id, {})}
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.procs[peer_id] = proc
        thread = threading.Thread(target=self._pump, args=(peer_id, proc, log_path), daemon=True)
        thread.start()
        self._threads.append(thread)
        return proc

    def _pump(self, peer_id: str, proc: subprocess.Popen, log_path: Path) -> None:
        with open(log_path, "ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if self.echo:
                    with self._print_lock:
                        sys.stdout.write(f"{peer_id:>8} | {line.decode(errors='replace')}")
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
        path = peer_dir(self.run_dir, peer_id) / PEER_LOG_FILE
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
    cmd = [net.python, "-m", "graphs.live", "--broker", net.broker.address, "--run-id", net.run_id, "--port", str(port)]
    if net.secret_file:
        cmd += ["--secret-file", str(net.secret_file)]
    page = subprocess.Popen(
        cmd, cwd=ROOT, env=net.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    print(f"localnet: live page http://127.0.0.1:{port}/", flush=True)
    return page


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

    def interrupted(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    net = LocalNetwork(
        args.run_dir,
        args.peers,
        with_min_peers(peer_args, args.peers),
        echo=not args.quiet,
        broker_port=args.port,
        run_id=run_id,
        peers_per_process=args.peers_per_process,
    )
    page = None
    try:
        net.start()
        if args.dashboard_port:
            page = start_dashboard(net, args.dashboard_port)
        hosted = f" ({len(net.processes())} processes)" if args.peers_per_process > 1 else ""
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
