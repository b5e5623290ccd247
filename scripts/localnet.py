"""A whole federation on this machine, without Docker: a real mosquitto on a free port (or B bridged into a tree,
`--brokers B`, TLS only with `--tls`) and N peer processes.

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
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from peer.node.signals import StopSignals
from peer.records.run_dir import (
    BROKER_LOG_FILE,
    CheckpointError,
    broker_log,
    host_log,
    killed_on_purpose,
    peer_log,
    read_checkpoint,
    write_brokers,
)
from peer.wire.ids import launched_peer_id, new_run_id
from scripts.certs import Certificate, authority, certificate

ROOT = Path(__file__).resolve().parent.parent
LOCAL_CONF = ROOT / "broker" / "mosquitto.local.conf"
_PEER_FIELD = re.compile(rb" peer=(\S+) ")
BRIDGE_IDENTITY = "bridge"  # the bridges' login, and the common name of their certificate under mutual TLS
OBSERVER_IDENTITY = "observer"  # the live page's login (read-only), and its certificate's common name
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


def peers_topic_prefix(peer_args: list[str], environ) -> str:
    """The topic prefix the peers will use: the last --topic-prefix among their flags, else FL_TOPIC_PREFIX, else sd."""
    prefix = environ.get("FL_TOPIC_PREFIX") or "sd"
    for i, word in enumerate(peer_args):
        if word == "--topic-prefix" and i + 1 < len(peer_args):
            prefix = peer_args[i + 1]
        elif word.startswith("--topic-prefix="):
            prefix = word.split("=", 1)[1]
    return prefix


def read_login(login_dir: Path, peer_id: str) -> dict[str, str]:
    """A launched peer's broker login, FL_USERNAME and FL_PASSWORD, from `login_dir/<id>.env` (KEY=VALUE lines)."""
    pairs = (line.split("=", 1) for line in (Path(login_dir) / f"{peer_id}.env").read_text().splitlines())
    login = {key.strip(): value.strip() for key, value in (pair for pair in pairs if len(pair) == 2)}
    return {name: login[name] for name in ("FL_USERNAME", "FL_PASSWORD") if name in login}


EPHEMERAL_PORTS = Path("/proc/sys/net/ipv4/ip_local_port_range")
LOWEST_PORT = 10_000  # below this, ports are registered services' (and not worth a collision with one)


def free_port() -> int:
    """A port nothing listens on, below the kernel's range of ephemeral ports where there is room: a broker that
    restarts must get its port back, and an ephemeral one may meanwhile be taken by any outgoing connection (a
    peer reconnecting to 127.0.0.1 may even be handed the broker's own port as its local one: it connects to
    itself)."""
    try:
        low = int(EPHEMERAL_PORTS.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    for _ in range(50 if low - LOWEST_PORT >= 1000 else 0):
        port = LOWEST_PORT + secrets.randbelow(low - LOWEST_PORT)  # (not `random`: a test may have seeded it)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def end_process(proc: subprocess.Popen | None, grace_s: float) -> None:
    """SIGTERM, and SIGKILL if it has not ended within `grace_s`; waited for either way."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> bool:
    """Whether something listens on the loopback `port` within `timeout` (False at once if `proc` exits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass(frozen=True)
class BrokerLogin:
    """What a broker that refuses anonymous clients reads (mosquitto's hashed password file and ACL, from
    scripts.up.logins.make_credentials), and the login its bridge uses on both ends (the ACL lets it read and write
    the federation's topics: it carries every peer's messages)."""

    passwd: Path
    acl: Path
    bridge_username: str
    bridge_password: str


@dataclass(frozen=True)
class BrokerTls:
    """A broker's TLS (scripts.certs): its one listener takes TLS only, with `cert` and `key`, and its bridge checks
    the parent's certificate against `ca`. With `clients_certified`, every client must present a certificate `ca`
    signed, whose common name is its login (mutual TLS: require_certificate, use_identity_as_username); the
    bridge presents `bridge_cert`/`bridge_key` (common name: the bridges' login)."""

    ca: Path
    cert: Path
    key: Path
    clients_certified: bool = False
    bridge_cert: Path | None = None
    bridge_key: Path | None = None

    def listener_lines(self) -> list[str]:
        lines = [f"cafile {self.ca}", f"certfile {self.cert}", f"keyfile {self.key}", "tls_version tlsv1.2"]
        if self.clients_certified:
            lines += ["require_certificate true", "use_identity_as_username true"]
        return lines

    def bridge_lines(self) -> list[str]:
        lines = [f"bridge_cafile {self.ca}", "bridge_insecure false", "bridge_tls_version tlsv1.2"]
        if self.clients_certified and self.bridge_cert and self.bridge_key:
            lines += [f"bridge_certfile {self.bridge_cert}", f"bridge_keyfile {self.bridge_key}"]
        return lines


@dataclass(frozen=True)
class Uplink:
    """A broker's one bridge, up to its parent in the tree of brokers (MQTT v5, mosquitto `connection`): every
    topic under `prefix` both ways. `addresses`: the parent first, then its stand-ins, which mosquitto tries in turn
    when the parent is lost, going back to the parent once it answers again (round_robin false)."""

    name: str
    addresses: tuple[str, ...]
    prefix: str = "sd"
    keepalive: int = 5  # mosquitto's least: a hung parent is noticed after about 1.5x this

    def conf_lines(self, login: BrokerLogin | None, tls: BrokerTls | None = None) -> list[str]:
        lines = [
            f"connection {self.name}",
            f"address {' '.join(self.addresses)}",
            "round_robin false",
            "bridge_protocol_version mqttv50",
            # mosquitto marks its own bridges' subscriptions no-local and retain-as-published (try_private): a message
            # never goes back over the bridge it came in by, and a retained one stays retained on every broker.
            "try_private true",
            "cleansession true",
            f"remote_clientid {self.name}",
            f"local_clientid local.{self.name}",
            f"keepalive_interval {self.keepalive}",
            # A lost parent is tried again, and then its stand-in, after 1 s each (mosquitto 2.0.11 here: a constant
            # `restart_timeout 1` waited 5 s; base 1 with cap 1 waits 1 s; a lost root cut its spokes off ~2 s).
            "restart_timeout 1 1",
            "start_type automatic",
            "notifications false",
            f"topic {self.prefix}/# both 1",
        ]
        if login is not None:
            lines += [
                f"remote_username {login.bridge_username}",
                f"remote_password {login.bridge_password}",
                f"local_username {login.bridge_username}",
                f"local_password {login.bridge_password}",
            ]
        return lines + (tls.bridge_lines() if tls else [])


class Broker:
    """A real mosquitto process on 127.0.0.1 with the project's local configuration and a port of its own; with an
    `uplink`, bridged to its parent broker; with a `login`, refusing anonymous clients and holding each login to
    the ACL."""

    def __init__(
        self,
        port: int | None = None,
        log_path: Path | None = None,
        settings: dict[str, str] | None = None,
        name: str = "broker",
        uplink: Uplink | None = None,
        login: BrokerLogin | None = None,
        tls: BrokerTls | None = None,
    ):
        """`settings`: mosquitto options that replace or add to the local configuration's (e.g. `sys_interval`, for
        a benchmark that reads the broker's $SYS counters, or a smaller `message_size_limit`)."""
        self.port = port or free_port()
        self.log_path = log_path
        self.settings = dict(settings or {})
        self.name, self.uplink, self.login, self.tls = name, uplink, login, tls
        if login is not None:
            self.settings.update(
                {"allow_anonymous": "false", "password_file": str(login.passwd), "acl_file": str(login.acl)}
            )
        self.proc: subprocess.Popen | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="fl-broker-"))
        self.conf = self._dir / "mosquitto.conf"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _write_conf(self) -> None:
        lines = LOCAL_CONF.read_text().splitlines()
        listener = [f"listener {self.port} 127.0.0.1", *(self.tls.listener_lines() if self.tls else [])]
        lines = [part for line in lines for part in (listener if line.startswith("listener ") else [line])]
        lines = [line for line in lines if line.split(" ", 1)[0] not in self.settings]
        lines += [f"{name} {value}" for name, value in self.settings.items()]
        if (self.login is not None or self.tls is not None) and os.geteuid() == 0:
            # As root, mosquitto drops to the mosquitto user before it reads the login and key files, which sit in
            # this user's private folders: a local broker stays this user's process, as the peers are.
            lines.append("user root")
        if self.uplink is not None:  # last: a bridge's options run from its `connection` line to the file's end
            lines += self.uplink.conf_lines(self.login, self.tls)
        self.conf.write_text("\n".join(lines) + "\n")
        self.conf.chmod(0o600)  # a bridge's password may be in it

    def start(self) -> Broker:
        binary = find_mosquitto()
        if not binary:
            raise MosquittoMissing(f"the local network needs the mosquitto broker: {install_command('mosquitto')}")
        self._write_conf()
        if self.log_path:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        if not wait_for_port(self.port, 10, self.proc):
            self.stop()
            raise RuntimeError(f"mosquitto did not start listening on port {self.port}{self._last_words()}")
        return self

    def _last_words(self) -> str:
        """The broker's last line of output (why it would not start), if its log holds one."""
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines() if self.log_path else []
        except OSError:
            lines = []
        return f": {lines[-1]}" if lines else ""

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a stopped broker cannot die of SIGTERM
        end_process(self.proc, 5)
        self.proc = None

    def restart(self, pause: float = 0.5) -> None:
        self.stop()
        time.sleep(pause)
        self.start()

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def record(self) -> dict:
        """What brokers.json says of it (`./up.sh status` and `kill broker` read it)."""
        return {
            "name": self.name,
            "address": self.address,
            "pid": self.proc.pid if self.proc else None,
            "uplink": list(self.uplink.addresses) if self.uplink else [],
        }

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def broker_name(index: int) -> str:
    """The name of the broker `index` (from 1) of a network: broker-1 is the root of the tree."""
    return f"broker-{index}"


def broker_tls(certs: Path, name: str, clients_certified: bool = False) -> BrokerTls:
    """The TLS of the local broker `name`, its certificate (for 127.0.0.1 and localhost) made in `certs` with the
    network's CA (scripts.certs), and the bridges' client certificate when clients need one."""
    ca = authority(certs)
    own = certificate(ca, name, ["127.0.0.1", "localhost"])
    bridge = certificate(ca, BRIDGE_IDENTITY) if clients_certified else None
    return BrokerTls(
        ca.ca, own.cert, own.key, clients_certified, bridge.cert if bridge else None, bridge.key if bridge else None
    )


def bridged_brokers(
    count: int,
    run_dir: Path | None = None,
    prefix: str = "sd",
    login: BrokerLogin | None = None,
    certs: Path | None = None,
    clients_certified: bool = False,
) -> list[Broker]:
    """`count` brokers bridged into one tree (not started). broker-1 is the root; broker-2 bridges up to it; every
    other broker bridges up to broker-1, with broker-2 as its stand-in. Each broker has one uplink at a time, so the
    bridges always form a tree (no loop, so no message goes round, and a message reaches each broker once): a
    broker killed takes only its own bridges down, and when the root is lost, the others join up under broker-2.
    (A broker and its peers cut off from every parent are cut off: peers fail over to another broker of their list
    only when theirs is lost.) With `certs`, a folder for the network's CA and certificates, every broker takes TLS
    only and every bridge checks its parent's certificate; with `clients_certified` too, every client must present
    a certificate of that CA, whose common name is its login (mutual TLS)."""
    if count < 1:
        raise ValueError(f"a network needs at least one broker, not {count}")
    ports = [free_port() for _ in range(count)]
    addresses = [f"127.0.0.1:{port}" for port in ports]
    brokers = []
    for index, port in enumerate(ports, start=1):
        name = broker_name(index)
        parents = tuple(addresses[parent - 1] for parent in uplink_parents(index))
        uplink = Uplink(f"bridge-{name}", parents, prefix) if parents else None
        log = broker_log(run_dir, name) if run_dir is not None else None
        tls = broker_tls(certs, name, clients_certified) if certs is not None else None
        brokers.append(Broker(port, log_path=log, name=name, uplink=uplink, login=login, tls=tls))
    return brokers


def uplink_parents(index: int) -> tuple[int, ...]:
    """The brokers (indices from 1) broker `index` bridges up to, in the order its bridge tries them: none for the
    root (broker-1), broker-1 for broker-2, and broker-1 then its stand-in broker-2 for every other."""
    return () if index == 1 else tuple(range(1, min(index - 1, 2) + 1))


def home_broker(peer_id: str, count: int) -> int:
    """The broker (index from 0) of `count` a launched peer connects to first: peer-K's is (K-1) mod count (the
    first for an id of another form)."""
    number = peer_id.rsplit("-", 1)[-1]
    return (int(number) - 1) % count if number.isdigit() and int(number) > 0 else 0


def broker_order(own: int, count: int) -> list[int]:
    """The brokers (indices from 0) a peer on broker `own` tries: its own, then the ones after it, round the list."""
    return [(own + step) % count for step in range(count)]


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
                *(["--processes"] if self.workers > 1 else []),
            ],
            cwd=ROOT,
            env=self.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self  # not waited for: a peer waits for the socket when it first needs the service

    def stop(self) -> None:
        end_process(self.proc, 10)
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
        brokers: int = 1,
        broker_login: BrokerLogin | None = None,
        topic_prefix: str | None = None,
        login_dir: Path | None = None,
        tls: bool = False,
        mutual_tls: bool = False,
    ):
        """Every network is a run of its own (`run_id`, new by default) and, unless `secret=False`, has its own
        federation secret, in a file only this user can read, removed when the network stops. With
        `peers_per_process` K > 1 the peers run K to a process (peer.host). With `brokers` B > 1 it runs B brokers
        bridged into a tree (`bridged_brokers`, under `topic_prefix`) and spreads the peers over them: peer-K on
        broker (K-1) mod B, given every broker, its own first (`broker_order`). With `broker_login` the brokers
        refuse anonymous clients; each peer then logs in with its login from `login_dir/<id>.env`. With `tls` every
        broker takes TLS only, with a certificate of the network's own CA (made in a private folder, removed when
        the network stops), which the peers and bridges check (--tls-ca). With `mutual_tls` too, every client
        presents a certificate of that CA naming its login (the broker takes its identity from it: require_certificate,
        use_identity_as_username): each peer its own (--tls-cert, --tls-key), the bridges theirs, observers
        `client_certificate(name)`; one peer to a process (peer.host has one certificate for all its peers)."""
        if mutual_tls and (not tls or peers_per_process > 1):
            raise ValueError("mutual TLS needs tls, and one peer to a process (a certificate is a peer's)")
        if peers_per_process < 1:
            raise ValueError(f"peers_per_process must be at least 1, not {peers_per_process}")
        if brokers < 1 or (brokers > 1 and broker is not None):
            raise ValueError(f"brokers must be at least 1 (and 1 with a broker given), not {brokers}")
        self.run_dir = Path(run_dir)
        self.run_id = run_id or new_run_id(time.time())
        self._secret_dir = Path(tempfile.mkdtemp(prefix="fl-secret-")) if secret else None
        self.secret_file = self._secret_dir / "federation.key" if self._secret_dir else None
        if self.secret_file:
            self.secret_file.write_bytes(secrets.token_hex(32).encode())
            self.secret_file.chmod(0o600)
        self.count, self.peer_args = peers, list(peer_args)
        self.num_shards = num_shards or peers  # more shards than peers leaves room for peers that join later
        self.broker = broker  # the first (the root of the tree of several)
        self.owns_broker = broker is None
        self.broker_port = broker_port
        self.broker_count, self.broker_login = brokers, broker_login
        # What the bridges carry: the peers' topics (their --topic-prefix, else FL_TOPIC_PREFIX, else sd).
        self.topic_prefix = topic_prefix or peers_topic_prefix(self.peer_args, {**os.environ, **(env or {})})
        self.brokers: list[Broker] = [broker] if broker is not None else []
        self.certs = Path(tempfile.mkdtemp(prefix="fl-certs-")) if tls else None
        self.mutual_tls = mutual_tls
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), self.env.get("PYTHONPATH")]))
        self.peer_env = dict(peer_env or {})  # per peer id: variables of its own (e.g. its broker login)
        self.login_dir = login_dir
        if login_dir is not None:
            for peer_id, _ in roster(peers, self.num_shards):
                self.peer_env.setdefault(peer_id, read_login(login_dir, peer_id))
        self.echo, self.python = echo, python
        self.per_process = peers_per_process
        self.procs: dict[str, subprocess.Popen] = {}  # per peer id; the K peers of one host share one
        self.hosts: dict[str, list[str]] = {}  # host name (its first peer's id) -> the peers it runs
        self._threads: list[threading.Thread] = []
        self._print_lock = threading.Lock()
        # One learning service for every peer of the network (their jobs share the machine's cores), a worker process
        # per core (SDFL_LEARNING_WORKERS: another count; 0: none, each peer process starts its own).
        if learning_workers is None:
            learning_workers = int(os.environ.get("SDFL_LEARNING_WORKERS") or os.cpu_count() or 1)
        workers = learning_workers
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
            self.start_brokers()
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

    def start_brokers(self) -> None:
        """The network's own broker, or its brokers bridged into a tree (the root first: the others' bridges find
        it listening); brokers.json names them for `./up.sh status` and `kill broker`."""
        if self.broker_count == 1:
            log, name = self.run_dir / BROKER_LOG_FILE, broker_name(1)
            tls = broker_tls(self.certs, name, self.mutual_tls) if self.certs else None
            self.brokers = [Broker(self.broker_port, log_path=log, name=name, login=self.broker_login, tls=tls)]
        else:
            self.brokers = bridged_brokers(
                self.broker_count, self.run_dir, self.topic_prefix, self.broker_login, self.certs, self.mutual_tls
            )
        for broker in self.brokers:
            broker.start()
        self.broker = self.brokers[0]
        self.record_brokers()

    def record_brokers(self) -> None:
        write_brokers(self.run_dir, [broker.record() for broker in self.brokers])

    def broker_list(self, peer_id: str) -> str:
        """--broker of a launched peer: every broker of the network, its own (home_broker) first."""
        own = home_broker(peer_id, len(self.brokers))
        return ",".join(self.brokers[i].address for i in broker_order(own, len(self.brokers)))

    def _common_args(self, peer_id: str) -> list[str]:
        assert self.broker is not None, "start() first"
        run = ["--run-id", self.run_id] + (["--secret-file", str(self.secret_file)] if self.secret_file else [])
        if self.learning is not None:
            run += ["--learning-service", str(self.learning.socket)]
        run += self.tls_args(peer_id)
        return ["--broker", self.broker_list(peer_id), *run, "--run-dir", str(self.run_dir)]

    def client_certificate(self, name: str) -> Certificate | None:
        """Under mutual TLS, the certificate of the client `name` (a peer, an observer), made with the network's CA
        (its common name is the login the brokers take from it); else None."""
        return certificate(authority(self.certs), name) if self.mutual_tls and self.certs else None

    def tls_args(self, client: str) -> list[str]:
        """The TLS flags of a client of this network (a peer, the live page, a recorder): the CA, and under mutual TLS
        its own certificate."""
        if self.certs is None:
            return []
        own = self.client_certificate(client)
        return ["--tls-ca", str(authority(self.certs).ca)] + (
            ["--tls-cert", str(own.cert), "--tls-key", str(own.key)] if own else []
        )

    def start_peer(
        self, peer_id: str, shard: str, extra_args: Iterable[str] = (), module: str = "peer"
    ) -> subprocess.Popen:
        """One peer process (`python -m peer`, or another `module` that takes the peer's flags: a test's liar)."""
        cmd = [self.python, "-m", module, "--peer-id", peer_id, "--shard", shard, *self._common_args(peer_id)]
        return self._launch([peer_id], [*cmd, *self.peer_args, *extra_args], hosted=False)

    def start_peer_by_id(self, peer_id: str, extra_args: Iterable[str] = ()) -> subprocess.Popen:
        """The launched peer `peer_id` (peer-K) on its own shard (K-1): one joining late, or one started again under its
        id after a kill, as a user restarting it would."""
        return self.start_peer(peer_id, launched_shard(peer_id, self.num_shards), extra_args)

    def start_host(self, members: list[tuple[str, str]], extra_args: Iterable[str] = ()) -> subprocess.Popen:
        """One process (peer.host) running the peers `members` [(id, shard)]; its name is its first peer's id."""
        hosted = ",".join(f"{peer_id}={shard}" for peer_id, shard in members)
        ids = [peer_id for peer_id, _ in members]
        cmd = [self.python, "-m", "peer.host", "--hosted", hosted, *self._common_args(ids[0])]
        if self.login_dir is not None:
            cmd += ["--login-dir", str(self.login_dir)]
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
        if self.owns_broker:
            for broker in self.brokers:
                broker.close()
        if self.learning is not None:
            self.learning.stop()
        if self._secret_dir:
            shutil.rmtree(self._secret_dir, ignore_errors=True)
        if self.certs:
            shutil.rmtree(self.certs, ignore_errors=True)

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


def start_dashboard(net: LocalNetwork, port: int, login: dict[str, str] | None = None) -> subprocess.Popen:
    """The live page of this network (graphs.live): an observer process; the federation does not depend on it.
    `login`: its FL_USERNAME and FL_PASSWORD on brokers that want one."""
    assert net.broker is not None, "start the network first"
    brokers = ",".join(broker.address for broker in net.brokers)
    cmd = [net.python, "-m", "graphs.live", "--broker", brokers, "--run-id", net.run_id, "--port", str(port)]
    if net.secret_file:
        cmd += ["--secret-file", str(net.secret_file)]
    cmd += net.tls_args(OBSERVER_IDENTITY)
    cmd += ["--signals-from", str(net.run_dir)]  # the kills chaos.csv records: the wire does not carry them
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**net.env, **(login or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
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
    parser.add_argument(
        "--brokers",
        type=int,
        default=1,
        metavar="B",
        help="run B brokers bridged into a tree and spread the peers over them, each peer given every broker, its "
        "own first (default 1)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="brokers take TLS only, with certificates of the network's own CA"
    )
    parser.add_argument(
        "--mutual-tls",
        action="store_true",
        help="with --tls: every client presents a certificate of that CA naming its login (one peer to a process)",
    )
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
    if args.brokers < 1 or (args.brokers > 1 and args.port):
        parser.error("--brokers must be at least 1 (and --port goes with one broker)")
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
        brokers=args.brokers,
        tls=args.tls or args.mutual_tls,
        mutual_tls=args.mutual_tls,
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
            f"localnet: broker {','.join(b.address for b in net.brokers)}, run {net.run_id}, {args.peers} "
            f"peers{hosted}, records in {args.run_dir}",
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
