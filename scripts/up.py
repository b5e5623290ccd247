"""./up.sh: start a federation (one Mosquitto broker, N peers) in containers, or as local processes, follow it to
the finish, poke it (status, kill) and take it down. Standard library only: it runs on the host's python3.

    python -m scripts.up [--peers N] [--run-dir DIR] [--local | --docker] [-- PEER_FLAGS...]
    python -m scripts.up status | kill controller|random|peer ID [--signal S] | down
    python -m scripts.up broker --publish ADDR [--peers N]          # several hosts: the broker alone
    python -m scripts.up --join HOST:PORT --login DIR --peers N --first K --total T   # peers only
    python -m scripts.up images | credentials | compose-file

It owns the rules of a network once: peer ids and shards (`peer-K` reads shard `K-1/T`), FL_MIN_PEERS following
the number of peers, the signals of `kill`, the logins (make_credentials), the compose file (compose_config, data
written as JSON, which is valid YAML) and the images (ensure_images). Records go through peer.records (via
scripts.chaos); the run dir's layout is docs/RECORDS.md.

State of its own (generated logins, the compose file, the last network started) lives in `.up/` at the checkout's
root, git-ignored and private (0700); nothing of the checkout is modified by a container, and nothing tracked by git
is written.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from peer.records.run_dir import (
    CheckpointError,
    killed_on_purpose,
    read_checkpoint,
    read_elections,
    read_rounds,
    read_run_summary,
)
from peer.wire.ids import launched_peer_id, new_run_id, valid_run_id
from scripts import chaos
from scripts.localnet import HostLines, free_port

ROOT = Path(__file__).resolve().parent.parent
STATE = Path(os.environ.get("UP_STATE_DIR") or ROOT / ".up")
PROG = os.environ.get("UP_PROG", "python -m scripts.up")

PEER_IMAGE = "sd-fl-peer:latest"
BROKER_IMAGE = "sd-fl-broker:latest"
# The official bases (the Dockerfiles' defaults) and their stand-ins built from Debian packages.
BASES = {
    "python": ("python:3.11-slim", "sdfl-local/python:3.11-bookworm", ["python3", "python3-venv", "ca-certificates"]),
    "mosquitto": ("eclipse-mosquitto:2", "sdfl-local/mosquitto:2-bookworm", ["mosquitto", "mosquitto-clients"]),
}
BUILD_ARG = {"python": "PYTHON_BASE", "mosquitto": "MOSQUITTO_BASE"}
IMAGES = {PEER_IMAGE: ("peer/Dockerfile", "python"), BROKER_IMAGE: ("broker/Dockerfile", "mosquitto")}
DEBIAN_SUITE = "bookworm"  # its python3 is 3.11, as in python:3.11-slim
# The official eclipse-mosquitto image declares these VOLUMEs; the local stand-in does too, so that the compose file's
# tmpfs over them (no anonymous volume left behind by a run) is exercised wherever the tests run.
MOSQUITTO_VOLUMES = ["/mosquitto/data", "/mosquitto/log"]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

LABEL_RUN_DIR = "org.sdfl.run-dir"
LABEL_PEER = "org.sdfl.peer"  # on a peer container: the peers it runs (its id, or ids joined by commas on a host)
LABEL_PROJECT = "com.docker.compose.project"
DEFAULT_PROJECT = "sdfl"
DEFAULT_PUBLISH = "127.0.0.1::1883"
OBSERVER = "observer"  # the live page's read-only broker login
DASHBOARD = "dashboard"  # its compose service; the page listens on DASHBOARD_PORT inside
DASHBOARD_PORT = 8765
HOSTED_LOGINS = "/run/secrets/logins"  # where a host container finds its peers' logins (peer.host --login-dir)
DOWN_GRACE_S = 5  # a peer gets this long to leave after SIGTERM (it takes well under a second)
SIGNALS = {"KILL": "kill", "TERM": "kill", "STOP": "stop", "CONT": "cont"}  # signal -> chaos.csv action
# Settings the launcher sets for each peer itself; a peer flag or FL_* variable for them would be a mistake.
OWNED_FLAGS = {
    "--broker": "FL_BROKER",
    "--peer-id": "FL_PEER_ID",
    "--shard": "FL_SHARD",
    "--run-dir": "FL_RUN_DIR",
    "--username": "FL_USERNAME",
    "--password": "FL_PASSWORD",
}


class UpError(Exception):
    """A failure the user can act on: printed as one `error:` line (status 2 for usage, 1 otherwise)."""

    def __init__(self, message: str, status: int = 1):
        super().__init__(message)
        self.status = status


class Interrupted(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.status = 128 + signum


def say(message: str) -> None:
    print(f"{PROG}: {message}", flush=True)


def warn(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ small helpers


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


peer_id = launched_peer_id  # peer K (from 1) is peer-K, on shard K-1 of T, as scripts.localnet names them


def abs_path(text: str) -> Path:
    return Path(os.path.abspath(os.path.expanduser(text)))


def default_run_dir() -> Path:
    base = ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S")
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def peer_flag(flags: list[str], name: str) -> str | None:
    """The value of `name X` or `name=X` among the peer flags (the last one wins, as argparse does)."""
    value = None
    for i, word in enumerate(flags):
        if word == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif word.startswith(name + "="):
            value = word[len(name) + 1 :]
    return value


def without_flag(flags: list[str], name: str) -> list[str]:
    out, skip = [], False
    for word in flags:
        if skip:
            skip = False
        elif word == name:
            skip = True
        elif not word.startswith(name + "="):
            out.append(word)
    return out


# ------------------------------------------------------------------------------------------------ logins


def mosquitto_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """A Mosquitto 2 password-file hash ($7$: PBKDF2-SHA512, as mosquitto_passwd writes), so no mosquitto_passwd
    is needed on the host and no container writes into the login folder."""
    salt = salt or os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def acl_text(peers: list[str], topic_prefix: str, observer: bool = True) -> str:
    lines = [
        "# Generated by ./up.sh (scripts/up.py, make_credentials) for this network. Anything not granted is denied.",
        "",
        "# The broker's healthcheck only proves a login round trip by reading one retained $SYS value.",
        "user health",
        "topic read $SYS/broker/uptime",
        "",
    ]
    lines += [
        "# A peer reads its federation's topics and publishes only on topics that name it as sender",
        f"# ({topic_prefix}/<run>/<kind>/<sender>, and <sender>/<i> for the chunks of a large model): no login "
        "can speak for another peer.",
    ]
    for peer in peers:
        lines += [
            f"user {peer}",
            f"topic read {topic_prefix}/#",
            f"topic write {topic_prefix}/+/+/{peer}",
            f"topic write {topic_prefix}/+/+/{peer}/+",
            "",
        ]
    if observer:
        lines += [
            "# The live page's observer (graphs.live) only reads: nothing it could do reaches the federation.",
            f"user {OBSERVER}",
            f"topic read {topic_prefix}/#",
            "",
        ]
    return "\n".join(lines)


@dataclass
class Login:
    """A network's generated secrets, all in one private folder (.up/<project>/login, mode 0700):
    `<peer>.env` (FL_USERNAME/FL_PASSWORD, one login per peer), `health.env` (the healthcheck's), `passwd` (hashed,
    for the broker), `acl`, and `federation.secret` (a per-network secret for the peers, FL_SECRET_FILE)."""

    folder: Path

    def env_file(self, peer: str) -> Path:
        return self.folder / f"{peer}.env"

    @property
    def health_env(self) -> Path:
        return self.folder / "health.env"

    @property
    def observer_env(self) -> Path:
        """The live page's read-only login (not a .env file: it is no peer's)."""
        return self.folder / f"{OBSERVER}.login"

    @property
    def passwd(self) -> Path:
        return self.folder / "passwd"

    @property
    def acl(self) -> Path:
        return self.folder / "acl"

    @property
    def secret(self) -> Path:
        return self.folder / "federation.secret"

    @property
    def run_id_file(self) -> Path:
        """The run id of the broker's current run (written by `./up.sh broker`): peers joining from other machines
        with a copy of this folder take part in that run."""
        return self.folder / "run-id"

    def peers(self) -> list[str]:
        return sorted(
            (p.name[:-4] for p in self.folder.glob("*.env") if p.name != "health.env"),
            key=lambda name: (len(name), name),
        )

    def check(self, peers: list[str]) -> None:
        missing = [p for p in peers if not self.env_file(p).is_file()]
        if missing:
            raise UpError(
                f"no login for {', '.join(missing)} in {self.folder}: on the broker's machine, "
                f"`./up.sh credentials --peers T` makes logins for peer-1..peer-T; copy its login folder here"
            )


def make_credentials(folder: Path, peers: list[str], topic_prefix: str = "sd") -> Login:
    """The one place a network's secrets are made. Logins that exist are kept (peers on other machines may hold
    copies); missing ones are added; the broker's `passwd` and `acl` are rewritten to match every login in the
    folder. Passwords are random (24 bytes), written 0600; `passwd` (hashed) and `acl` are 0644 inside the 0700
    folder, so the broker reads them as its own unprivileged user through a read-only mount."""
    login = Login(private_dir(folder))
    for peer in peers:
        if not login.env_file(peer).is_file():
            write_file(
                login.env_file(peer),
                f"# Broker login of {peer} (generated by ./up.sh; never committed).\n"
                f"FL_USERNAME={peer}\nFL_PASSWORD={secrets.token_hex(24)}\n",
            )
    if not login.health_env.is_file():
        write_file(
            login.health_env,
            f"# The broker healthcheck's login (generated by ./up.sh).\nMQTT_HEALTH_PASSWORD={secrets.token_hex(24)}\n",
        )
    if not login.secret.is_file():
        write_file(login.secret, secrets.token_hex(32) + "\n")
    if not login.observer_env.is_file():
        write_file(
            login.observer_env,
            "# The live page's read-only broker login (generated by ./up.sh).\n"
            f"FL_USERNAME={OBSERVER}\nFL_PASSWORD={secrets.token_hex(24)}\n",
        )
    users = {
        "health": read_env_file(login.health_env)["MQTT_HEALTH_PASSWORD"],
        OBSERVER: read_env_file(login.observer_env)["FL_PASSWORD"],
    }
    for peer in login.peers():
        users[peer] = read_env_file(login.env_file(peer))["FL_PASSWORD"]
    write_file(login.passwd, "".join(f"{user}:{mosquitto_hash(pw)}\n" for user, pw in users.items()), 0o644)
    write_file(login.acl, acl_text(login.peers(), topic_prefix), 0o644)
    return login


# ------------------------------------------------------------------------------------------------ docker


def docker_problem(timeout: float) -> str | None:
    """Why containers cannot run here (None: they can)."""
    if shutil.which("docker") is None:
        return "no docker command"
    try:
        info = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=timeout,
            start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        return f"docker info timed out after {timeout:g}s"
    if info.returncode != 0:
        return "docker info failed: " + ((info.stderr or "").strip().splitlines() or ["no engine"])[-1]
    if subprocess.run(["docker", "compose", "version"], capture_output=True, start_new_session=True).returncode:
        return "the docker compose plugin (compose v2) is missing"
    return None


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], check=False).returncode == 0


def build_local_base(kind: str) -> None:
    """A base image from Debian packages: mmdebstrap writes a minimal Debian as a tarball, docker imports it."""
    official, local, packages = BASES[kind]
    if shutil.which("mmdebstrap") is None:
        raise UpError(
            f"{official} cannot be pulled and mmdebstrap is missing to build {local} from Debian packages: "
            "`sudo apt-get install mmdebstrap` (or `docker load` the official image)"
        )
    cmd = ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(packages)}", DEBIAN_SUITE, "-"]
    if os.environ.get("UP_DEBIAN_MIRROR"):
        cmd.append(os.environ["UP_DEBIAN_MIRROR"])
    changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8"]
    if kind == "mosquitto":
        changes.append(f"VOLUME {json.dumps(MOSQUITTO_VOLUMES)}")
    log = private_dir(STATE) / f"base-{kind}.log"
    with open(log, "w") as err:
        debootstrap = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        importer = subprocess.run(
            ["docker", "import", *sum((["--change", c] for c in changes), []), "-", local],
            stdin=debootstrap.stdout,
            capture_output=True,
            text=True,
        )
        debootstrap.stdout.close()
        code = debootstrap.wait()
    if code != 0 or importer.returncode != 0:
        tail = "".join(f"\n  {line}" for line in log.read_text().splitlines()[-8:])
        raise UpError(
            f"building {local} from Debian packages failed (mmdebstrap {code}, docker import "
            f"{importer.returncode} {importer.stderr.strip()}); full log: {log}{tail}"
        )


def choose_bases(choice: str) -> dict[str, str]:
    """kind -> base image. `official` pulls the official images if absent; `local` builds stand-ins from Debian
    packages if absent; `auto` takes what is here (official first), else pulls, else builds the stand-ins."""
    bases, unpullable = {}, []
    for kind, (official, local, _) in BASES.items():
        if choice == "local":
            bases[kind] = local
        elif image_exists(official):
            bases[kind] = official
        elif choice == "auto" and image_exists(local):
            bases[kind] = local
        elif run(["docker", "pull", "-q", official], check=False, timeout=300).returncode == 0:
            bases[kind] = official
        elif choice == "official":
            raise UpError(
                f"cannot pull {official} (no registry reachable?); --base local builds a stand-in from "
                "Debian packages instead"
            )
        else:
            unpullable.append(official)
            bases[kind] = local
    if unpullable:
        say(
            f"cannot pull {' or '.join(unpullable)}: building local base images from Debian packages instead "
            "(mmdebstrap, about a minute, once)"
        )
    for kind, image in bases.items():
        if image == BASES[kind][1] and not image_exists(image):
            started = time.monotonic()
            build_local_base(kind)
            say(f"images: base {image} built from Debian {DEBIAN_SUITE} in {time.monotonic() - started:.0f} s")
    return bases


def ensure_images(base: str = "auto", ca_bundle: Path | None = None) -> None:
    """Build the peer and broker images (Docker's layer cache makes a rebuild take seconds)."""
    bases = choose_bases(base)
    extra_ca = ca_bundle.read_text() if ca_bundle else ""
    network = os.environ.get("UP_BUILD_NETWORK", "host")
    for tag, (dockerfile, kind) in IMAGES.items():
        started = time.monotonic()
        cmd = [
            "docker",
            "build",
            "--network",
            network,
            "-f",
            str(ROOT / dockerfile),
            "-t",
            tag,
            "--build-arg",
            f"{BUILD_ARG[kind]}={bases[kind]}",
        ]
        if kind == "python" and extra_ca:
            cmd += ["--build-arg", f"EXTRA_CA_CERTS={extra_ca}"]
        if not image_exists(tag):
            say(
                f"images: building {tag} on {bases[kind]}"
                + (" (the first time takes a few minutes: TensorFlow)" if kind == "python" else "")
            )
        log = private_dir(STATE) / f"build-{tag.split(':')[0]}.log"
        with open(log, "w") as out:
            # In the launcher's process group: a Ctrl-C stops the build too.
            code = subprocess.run([*cmd, str(ROOT)], stdout=out, stderr=subprocess.STDOUT).returncode
        if code != 0:
            lines = log.read_text(errors="replace").splitlines()
            tail = "".join(f"\n  | {line}" for line in lines[-15:])
            hint = ""
            if "CERTIFICATE_VERIFY_FAILED" in "".join(lines):
                hint = (
                    "\n  TLS is intercepted on the way out: pass your proxy's CA certificates with "
                    "--ca-bundle FILE (or UP_CA_BUNDLE=FILE)"
                )
            raise UpError(
                f"building {tag} ({dockerfile}) failed (status {code}); its last lines:{tail}{hint}\n  full log: {log}"
            )
        say(f"images: {tag} ready ({time.monotonic() - started:.1f} s, base {bases[kind]})")


def compose_cmd(project: str, compose_file: Path) -> list[str]:
    return ["docker", "compose", "-p", project, "-f", str(compose_file)]


def containers(**labels: str) -> list[dict]:
    """Every container (running or not) with these labels, as `docker inspect` describes it."""
    filters = sum((["--filter", f"label={k}={v}"] for k, v in labels.items()), [])
    ids = run(["docker", "ps", "-aq", "--no-trunc", *filters]).stdout.split()
    if not ids:
        return []
    result = run(["docker", "inspect", *ids], check=False)
    try:
        return json.loads(result.stdout or "[]")
    except ValueError:
        return []


def state_of(container: dict) -> str:
    state = container["State"]
    if state.get("Paused"):
        return "paused"
    if state.get("Running"):
        return "running"
    return f"{state.get('Status', '?')} {state.get('ExitCode')}"


def service_of(container: dict) -> str:
    return container["Config"]["Labels"].get("com.docker.compose.service", container["Name"].lstrip("/"))


# ------------------------------------------------------------------------------------------------ the network


@dataclass
class Network:
    """One network as the launcher starts it: which peers run here, against which broker, with what settings."""

    project: str
    run_dir: Path
    peers: list[str]  # the peers started here
    total: int  # peers in the whole federation (the shards' N)
    first: int = 1
    peer_flags: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)  # FL_* settings passed to every peer
    join: str | None = None  # HOST:PORT of a broker elsewhere (no broker here)
    publish: str = DEFAULT_PUBLISH
    data_dirs: list[tuple[Path, str]] = field(default_factory=list)  # (host folder, container path), read-only
    max_rounds: int = 10
    topic_prefix: str = "sd"
    run_id: str = ""  # the run (FL_RUN_ID); empty: a new one, or with --join the broker's
    resume: bool = False  # go on from run_dir's checkpoint (run_id is the checkpoint's)
    per_process: int = 1  # peers per process (local) or per container (python -m peer.host)

    @property
    def state(self) -> Path:
        return STATE / self.project

    @property
    def compose_file(self) -> Path:
        return self.state / "compose.json"

    def shard(self, peer: str) -> str:
        return f"{int(peer.rsplit('-', 1)[1]) - 1}/{self.total}"

    def containers(self) -> dict[str, list[str]]:
        """Each peer container's compose service and the peers it runs: a peer each (`peer-K`), or `per_process`
        peers to a host (`host-peer-K`, python -m peer.host, named after its first peer as a local host is)."""
        if self.per_process == 1:
            return {peer: [peer] for peer in self.peers}
        k = self.per_process
        return {f"host-{self.peers[i]}": self.peers[i : i + k] for i in range(0, len(self.peers), k)}

    def killed_on_purpose(self) -> set[str]:
        """The peers chaos.csv says were killed, with those that shared their container: they died of it too."""
        killed = killed_on_purpose(self.run_dir)
        return {peer for peers in self.containers().values() if killed & set(peers) for peer in peers} | killed


def dollar(text: str) -> str:
    """Compose interpolates $ in every value: a literal $ is $$."""
    return text.replace("$", "$$")


def compose_config(net: Network, login: Login, uid: int, gid: int) -> dict:
    """The compose file for this network, as data. Paths are absolute, so it works from any folder."""
    services: dict[str, dict] = {}
    labels = {LABEL_RUN_DIR: dollar(str(net.run_dir))}
    if not net.join:
        health = (
            'mosquitto_sub -h 127.0.0.1 -p 1883 -u health -P "$MQTT_HEALTH_PASSWORD" '
            "-t '$SYS/broker/uptime' -C 1 -W 5 > /dev/null"
        )
        services["broker"] = {
            "image": BROKER_IMAGE,
            "pull_policy": "never",
            "hostname": "broker",
            "labels": labels,
            "env_file": [str(login.health_env)],
            # Read-only, and outside /mosquitto: no container ever writes to (or re-owns) a file of the host.
            "volumes": [
                {"type": "bind", "source": str(path), "target": f"/etc/sdfl/login/{path.name}", "read_only": True}
                for path in (login.passwd, login.acl)
            ],
            # The base image's VOLUMEs would each leave an anonymous volume behind: tmpfs instead.
            "tmpfs": MOSQUITTO_VOLUMES,
            "ports": [net.publish],
            "healthcheck": {"test": ["CMD-SHELL", dollar(health)], "interval": "2s", "timeout": "6s", "retries": 30},
            "restart": "no",
        }
    broker = net.join or "broker:1883"
    for name, peers in net.containers().items():
        env = {
            "FL_BROKER": broker,
            "FL_RUN_DIR": "/run-dir",
            "FL_MIN_PEERS": str(net.total),
            "FL_SECRET_FILE": "/run/secrets/federation",
            **net.env,
        }
        volumes = [
            {"type": "bind", "source": str(net.run_dir), "target": "/run-dir"},
            {"type": "bind", "source": str(login.secret), "target": "/run/secrets/federation", "read_only": True},
            {"type": "volume", "source": "datasets", "target": "/data/keras"},
        ]
        volumes += [
            {"type": "bind", "source": str(host), "target": target, "read_only": True} for host, target in net.data_dirs
        ]
        command = list(net.peer_flags)
        if name in peers:  # one peer: `python -m peer`, its login in its environment
            env.update(FL_PEER_ID=name, FL_SHARD=net.shard(name))
            env_file = [str(login.env_file(name))]
        else:  # a host: its peers' logins mounted, and only theirs (the ACL binds a login to a peer)
            env_file = []
            volumes += [
                {
                    "type": "bind",
                    "source": str(login.env_file(peer)),
                    "target": f"{HOSTED_LOGINS}/{peer}.env",
                    "read_only": True,
                }
                for peer in peers
            ]
            command = [
                "--hosted",
                ",".join(f"{peer}={net.shard(peer)}" for peer in peers),
                "--login-dir",
                HOSTED_LOGINS,
                *command,
            ]
        service = {
            "image": PEER_IMAGE,
            "pull_policy": "never",
            "hostname": name,
            "labels": {**labels, LABEL_PEER: ",".join(peers)},
            # The invoking user's uid: the records in the run dir are theirs, and so is the secret it reads.
            "user": f"{uid}:{gid}",
            # An init as PID 1 forwards SIGTERM to the peer (Python as PID 1 would ignore it until its handler
            # is installed, after TensorFlow loads).
            "init": True,
            "environment": {k: dollar(v) for k, v in env.items()},
            "volumes": [{**v, "source": dollar(v["source"])} if v["type"] == "bind" else v for v in volumes],
            # A lookup of a name that is gone (the broker's container stopped) answers in 1 s, not 10.
            "dns_opt": ["timeout:1", "attempts:1"],
            "stop_grace_period": f"{DOWN_GRACE_S}s",
            "restart": "no",
        }
        if env_file:
            service["env_file"] = env_file
        if name not in peers:
            service["entrypoint"] = ["python", "-m", "peer.host"]
        if command:
            service["command"] = [dollar(word) for word in command]
        if not net.join:
            service["depends_on"] = {"broker": {"condition": "service_healthy"}}
        services[name] = service
    if not net.join:
        # The live page: an observer in the peer image, logged in read-only; the federation does not depend on it.
        services[DASHBOARD] = {
            "image": PEER_IMAGE,
            "pull_policy": "never",
            "hostname": DASHBOARD,
            "labels": labels,
            "user": f"{uid}:{gid}",
            "init": True,
            "entrypoint": ["python", "-m", "graphs.live"],
            "command": [
                "--broker",
                broker,
                "--run-id",
                dollar(net.run_id or "default"),
                "--bind",
                "0.0.0.0",
                "--port",
                str(DASHBOARD_PORT),
                "--secret-file",
                "/run/secrets/federation",
            ],
            "env_file": [str(login.observer_env)],
            "volumes": [
                {
                    "type": "bind",
                    "source": dollar(str(login.secret)),
                    "target": "/run/secrets/federation",
                    "read_only": True,
                }
            ],
            "ports": [f"127.0.0.1::{DASHBOARD_PORT}"],
            "depends_on": {"broker": {"condition": "service_healthy"}},
            "stop_grace_period": "1s",
            "restart": "no",
        }
    return {
        "name": net.project,
        "services": services,
        # The Keras download cache (mnist, cifar10 when the host has no copy), kept between runs.
        "volumes": {"datasets": {}},
    }


# ------------------------------------------------------------------------------------------------ progress


class Progress:
    """Turns what the run dir shows into one line per step: peers joined, elections, rounds, exits, the finish."""

    def __init__(self, net: Network, started: float):
        self.net, self.started = net, started
        self.joined: set[str] = set()
        self.terms_seen = 0
        self.rounds_seen: set[tuple] = set()
        self.exited: set[str] = set()
        self.finished = False

    def update(self, states: dict[str, str] | None = None) -> None:
        run_dir = self.net.run_dir
        statuses = chaos.read_statuses(run_dir)
        joined = {p for p in statuses if p in self.net.peers}
        if len(joined) > len(self.joined):
            self.joined = joined
            say(f"peers joined {len(joined)}/{len(self.net.peers)}")
        elections = read_elections(run_dir)
        for row in elections[self.terms_seen :]:
            say(f"term {row.term}: {row.controller} is controller ({row.reason})")
        self.terms_seen = max(self.terms_seen, len(elections))
        for row in read_rounds(run_dir):
            key = (row.round, row.term, row.finished_at)
            if key in self.rounds_seen:
                continue
            self.rounds_seen.add(key)
            say(
                f"round {row.round}/{self.net.max_rounds}: accuracy {row.accuracy:.4f} ({row.duration_s:.1f} s; "
                f"{time.time() - self.started:.0f} s since the peers started)"
            )
        exits: dict[str, list[str]] = {}  # one line for the peers that exit alike (a host's K peers do at once)
        for peer, state in (states or {}).items():
            if peer not in self.exited and state.startswith(("exited", "dead")):
                self.exited.add(peer)
                code = state.split()[-1]
                why = " (killed on purpose)" if code != "0" and peer in self.net.killed_on_purpose() else ""
                exits.setdefault(f"exited {code}{why}", []).append(peer)
        for what, peers in exits.items():
            say(f"{spans(peers)} {what}")
        summary = read_run_summary(run_dir)
        if summary and not self.finished:
            outcome = summary.outcome
            if (summary.finished_at or 0) >= self.started - 1:
                self.finished = True
                accuracy = summary.final_accuracy
                say(
                    f"finished ({outcome.get('reason')}): {outcome.get('rounds')} rounds, final accuracy "
                    f"{'n/a' if accuracy is None else format(accuracy, '.4f')}, {outcome.get('terms')} term(s), "
                    f"{time.time() - self.started:.0f} s since the peers started"
                )


def spans(peers: list[str]) -> str:
    """peer-1, peer-2, peer-3, peer-7 as `peer-1..peer-3, peer-7`: a hundred peers in one short line."""
    if not all(re.fullmatch(r"peer-\d+", p) for p in peers):
        return ", ".join(peers)
    numbers = sorted(int(p.rsplit("-", 1)[1]) for p in peers)
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(
        f"peer-{r[0]}" + (f"..peer-{r[-1]}" if len(r) > 2 else f", peer-{r[-1]}" if len(r) == 2 else "") for r in runs
    )


def verdict(codes: dict[str, int | None], killed: set[str]) -> dict[str, int | None]:
    """The peers whose exit is a failure of the run: not 0, and not killed on purpose (`killed`)."""
    return {p: c for p, c in codes.items() if c != 0 and not (p in killed and c is not None)}


def graphs_command(run_dir: Path, tool: str = "graphs") -> str:
    python = ".venv/bin/python" if (ROOT / ".venv" / "bin" / "python").exists() else "python3"
    command = f"{python} -m {tool} {'--run-dir ' if tool == 'graphs.live' else ''}{shlex.quote(str(run_dir))}"
    return command if Path.cwd() == ROOT else f"cd {shlex.quote(str(ROOT))} && {command}"


def report_end(run_dir: Path, failed: dict[str, int | None], interrupted: bool) -> None:
    for peer, code in sorted(failed.items()):
        log = run_dir / "peers" / peer / "peer.log"
        lines = log.read_text(errors="replace").splitlines()[-4:] if log.exists() else []
        say(f"{peer} failed (exit {code}); its last lines:" + "".join(f"\n    {line}" for line in lines))
    if read_rounds(run_dir):
        say(f"records: {run_dir} (layout: docs/RECORDS.md)")
        say(f"graphs:  {graphs_command(run_dir)}")
        say(f"page:    {graphs_command(run_dir, 'graphs.live')} (the live page, of the finished run)")
    elif failed or interrupted:
        say(f"no round finished; logs in {run_dir}/peers/<id>/peer.log")


# ------------------------------------------------------------------------------------------------ last network


def remember(**info) -> None:
    write_file(private_dir(STATE) / "last.json", json.dumps(info, indent=2) + "\n")


def last() -> dict:
    """What `remember` wrote of the last network, or {} (none yet, or unreadable)."""
    try:
        info = json.loads((STATE / "last.json").read_text())
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def launcher_alive(pid) -> bool:
    """The launcher that started the last network still runs (and the pid was not reused by something else)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        return "scripts.up" in cmdline or "scripts/up" in cmdline or "scripts.localnet" in cmdline
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except OSError:
            return False


# ------------------------------------------------------------------------------------------------ run: containers


class Signals:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted in the main thread, once; during the clean-up they are
    ignored, so a second Ctrl-C cannot leave containers behind."""

    def __enter__(self):
        self.saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        for s in self.saved:
            signal.signal(s, self._raise)
        return self

    @staticmethod
    def _raise(signum, frame):
        raise Interrupted(signum)

    def shield(self) -> None:
        for s in self.saved:
            signal.signal(s, signal.SIG_IGN)

    def __exit__(self, *exc):
        for s, handler in self.saved.items():
            signal.signal(s, handler)


def save_logs(net: Network, found: list[dict]) -> None:
    """Each container's whole log, where a local run keeps it (peers/<id>/peer.log, broker.log; a host's in
    hosts/<service>.log and split by peer into theirs): written by the launcher, so they belong to the same user as
    every other record."""
    for container in found:
        service = service_of(container)
        hosted = hosted_with(container)
        if service == "broker":
            path = net.run_dir / "broker.log"
        elif len(hosted) > 1:
            path = net.run_dir / "hosts" / f"{service}.log"
        else:
            path = net.run_dir / "peers" / service / "peer.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as out:
            subprocess.run(
                ["docker", "logs", container["Id"]], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        if len(hosted) > 1:
            split_host_log(path, hosted, net.run_dir)


def split_host_log(path: Path, peers: list[str], run_dir: Path) -> None:
    """A host's combined log, line by line into peers/<id>/peer.log of the peer each line is about."""
    whose = HostLines()
    logs = {}
    try:
        for peer in peers:
            (run_dir / "peers" / peer).mkdir(parents=True, exist_ok=True)
            logs[peer] = open(run_dir / "peers" / peer / "peer.log", "wb")
        with open(path, "rb") as combined:
            for line in combined:
                peer = whose(line)
                if peer in logs:
                    logs[peer].write(line)
    finally:
        for log in logs.values():
            log.close()


def take_down(project: str, compose_file: Path | None, net: Network | None = None) -> float:
    """Stop the project's containers (thawing paused ones first: a frozen peer cannot take SIGTERM), keep their
    logs when a run dir is known, remove containers and network. Returns the seconds it took."""
    started = time.monotonic()
    found = containers(**{LABEL_PROJECT: project})
    paused = [c["Id"] for c in found if c["State"].get("Paused")]
    if paused:
        run(["docker", "unpause", *paused], check=False)
    # Peers first, then the broker: a peer says goodbye to the broker (clears its retained presence) on its way out.
    for group in (
        [c for c in found if LABEL_PEER in c["Config"]["Labels"]],
        [c for c in found if LABEL_PEER not in c["Config"]["Labels"]],
    ):
        running = [c["Id"] for c in group if c["State"].get("Running")]
        if running:
            run(["docker", "stop", "-t", str(DOWN_GRACE_S), *running], check=False)
    if net is not None and found:
        save_logs(net, found)
    if compose_file and compose_file.exists():
        run([*compose_cmd(project, compose_file), "down", "--remove-orphans", "-t", "1"], check=False)
    # Whatever the compose file no longer names (or if it is gone): by label.
    left = containers(**{LABEL_PROJECT: project})
    if left:
        run(["docker", "rm", "-f", "-v", *[c["Id"] for c in left]], check=False)
    networks = run(
        ["docker", "network", "ls", "-q", "--filter", f"label={LABEL_PROJECT}={project}"], check=False
    ).stdout.split()
    if networks:
        run(["docker", "network", "rm", *networks], check=False)
    return time.monotonic() - started


def start_broker(net: Network, compose: list[str]) -> str:
    """Start the broker and wait until its healthcheck logs in; returns where it is published on the host."""
    started = time.monotonic()
    run([*compose, "up", "-d", "--force-recreate", "--remove-orphans", "broker"], timeout=120)
    deadline = started + 90
    while True:
        found = containers(**{LABEL_PROJECT: net.project, "com.docker.compose.service": "broker"})
        state = found[0]["State"] if found else {}
        health = state.get("Health", {}).get("Status")
        if health == "healthy":
            break
        if not state.get("Running") or health == "unhealthy" or time.monotonic() > deadline:
            logs = run(["docker", "logs", "--tail", "15", found[0]["Id"]], check=False) if found else None
            tail = "".join(f"\n  | {line}" for line in ((logs.stdout + logs.stderr) if logs else "").splitlines())
            raise UpError(
                f"the broker did not become healthy (state {state.get('Status')}, health {health});"
                f" its last words:{tail}"
            )
        time.sleep(0.3)
    port = run([*compose, "port", "broker", "1883"], check=False).stdout.strip() or net.publish
    say(
        f"broker healthy in {time.monotonic() - started:.1f} s (published at {port}; "
        f"{len(Login(net.state / 'login').peers())} peer logins)"
    )
    return port


def run_containers(net: Network, login: Login, base: str, ca_bundle: Path | None) -> int:
    busy = [c for c in containers(**{LABEL_PROJECT: net.project}) if c["State"].get("Running")]
    if busy:
        raise UpError(
            f"network {net.project} is already running ({len(busy)} containers): `./up.sh status`, "
            f"`./up.sh down`, or start another with --project NAME"
        )
    ensure_images(base, ca_bundle)
    uid, gid = os.getuid(), os.getgid()
    net.run_dir.mkdir(parents=True, exist_ok=True)
    write_file(net.compose_file, json.dumps(compose_config(net, login, uid, gid), indent=2) + "\n")
    compose = compose_cmd(net.project, net.compose_file)
    remember(mode="docker", project=net.project, run_dir=str(net.run_dir), pid=os.getpid(), peers=net.peers)
    progress = Progress(net, time.time())
    interrupted: Interrupted | None = None
    with Signals() as signals:
        try:
            take_down(net.project, net.compose_file)  # an earlier run's exited containers, if any
            if not net.join:
                start_broker(net, compose)
            groups = net.containers()
            run(
                [*compose, "up", "-d", "--force-recreate", "--no-deps", *groups, *([] if net.join else [DASHBOARD])],
                timeout=120,
            )
            progress.started = time.time()
            if net.per_process > 1:
                say(
                    f"{len(net.peers)} peers started in {len(groups)} containers, up to {net.per_process} to a "
                    f"container ({', '.join(f'{g}: {ps[0]}..{ps[-1]}' for g, ps in groups.items())}); records in "
                    f"{net.run_dir}"
                )
            else:
                say(f"{len(net.peers)} peer containers started ({', '.join(net.peers)}); records in {net.run_dir}")
            if not net.join:
                page = run([*compose, "port", DASHBOARD, str(DASHBOARD_PORT)], check=False).stdout.strip()
                if page:
                    say(f"live page: http://{page}/ (python -m graphs.live; it only watches)")
            while True:
                found = {p: c for p, c in peer_containers(net.project).items() if p in net.peers}
                states = {p: state_of(c) for p, c in found.items()}
                progress.update(states)
                if found and all(s.startswith(("exited", "dead")) for s in states.values()):
                    break
                if not found:
                    raise UpError(f"the peer containers of {net.project} are gone (taken down from elsewhere?)")
                time.sleep(0.5)
            codes = {p: c["State"].get("ExitCode") for p, c in found.items()}
        except Interrupted as stop:
            interrupted = stop
            signals.shield()
            say("stopping the network (Ctrl-C again is ignored until it is down)")
            codes = {}
        except UpError:
            signals.shield()
            took = take_down(net.project, net.compose_file, net)
            say(f"network {net.project} taken down in {took:.1f} s")
            raise
        signals.shield()
        took = take_down(net.project, net.compose_file, net)
        progress.update()
        say(f"network {net.project} taken down in {took:.1f} s: no container or network left")
    failed = verdict(codes, net.killed_on_purpose()) if not interrupted else {}
    report_end(net.run_dir, failed, interrupted is not None)
    if interrupted:
        return interrupted.status
    return 1 if failed else 0


# ------------------------------------------------------------------------------------------------ run: local


def find_mosquitto() -> str | None:
    for candidate in (
        shutil.which("mosquitto"),
        "/usr/sbin/mosquitto",
        "/usr/local/sbin/mosquitto",
        "/opt/homebrew/sbin/mosquitto",
    ):
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
    interrupted: Interrupted | None = None
    with Signals() as signals:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, start_new_session=True)
        remember(mode="local", project="local", run_dir=str(net.run_dir), pid=os.getpid(), peers=net.peers)
        try:
            while proc.poll() is None:
                progress.update()
                time.sleep(0.5)
        except Interrupted as stop:
            interrupted = stop
            signals.shield()
            say("stopping the broker and every peer")
            proc.terminate()
        signals.shield()
        code = proc.wait()
        progress.update()
    report_end(net.run_dir, {} if code == 0 or interrupted else {"the launcher": code}, interrupted is not None)
    if interrupted:
        return interrupted.status
    return 0 if code == 0 else 1


# ------------------------------------------------------------------------------------------------ commands


def peer_settings(flags: list[str], env: dict[str, str]):
    """The peers' settings as they will read them, validated now: a typo fails here, not in N containers."""
    from peer.config import SettingsError, build_parser, load_settings

    class Refusal(Exception):
        pass

    class Parser(type(build_parser())):
        def error(self, message):
            raise Refusal(message)

    parser = build_parser()
    parser.__class__ = Parser
    try:
        parser.parse_args(flags)
        return load_settings([*flags, "--peer-id", "peer-1", "--shard", "0/2"], {**env, "FL_MIN_PEERS": "2"})
    except (Refusal, SettingsError) as err:
        raise UpError(f"peer flags: {err} (python -m peer --help lists them)", 2) from None


def network_from_args(args, peer_flags: list[str]) -> Network:
    from peer.config import ENV_NAMES

    project = args.project or DEFAULT_PROJECT
    if not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", project):
        raise UpError(f"--project {project!r}: use lowercase letters, digits, '-' and '_'", 2)
    if args.peers < 1 or (args.total or args.first - 1 + args.peers) < 2:
        raise UpError(f"--peers needs at least 2 peers in the federation, not {args.peers}", 2)
    if args.first < 1:
        raise UpError(f"--first counts from 1, not {args.first}", 2)
    if args.peers_per_process < 1:
        raise UpError(f"--peers-per-process must be at least 1, not {args.peers_per_process}", 2)
    if args.peers_per_process > 1 and args.resume:
        raise UpError("--resume needs one peer per process: leave --peers-per-process out", 2)
    total = args.total or args.first - 1 + args.peers
    if args.first - 1 + args.peers > total:
        raise UpError(f"peers {args.first}..{args.first + args.peers - 1} do not fit in --total {total}", 2)
    for flag, env_name in OWNED_FLAGS.items():
        if peer_flag(peer_flags, flag) is not None:
            raise UpError(
                f"{flag} is set by up.sh for each peer: leave it out of the peer flags "
                + ("(--run-dir goes before --)" if flag == "--run-dir" else ""),
                2,
            )
    # Every FL_* setting of the calling shell reaches the peers, except those the launcher sets itself.
    env = {k: v for k, v in os.environ.items() if k in ENV_NAMES and v and k not in OWNED_FLAGS.values()}
    data_dirs = []
    data_dir = args.data_dir or peer_flag(peer_flags, "--data-dir") or env.pop("FL_DATA_DIR", None)
    peer_flags = without_flag(peer_flags, "--data-dir")
    if data_dir:
        host = abs_path(data_dir)
        if not host.is_dir():
            raise UpError(f"--data-dir {data_dir}: no such folder", 2)
        data_dirs.append((host, "/data/input"))
        env["FL_DATA_DIR"] = "/data/input"
    if FASHION_MNIST.is_dir():
        data_dirs.append((FASHION_MNIST, str(FASHION_MNIST)))  # where the peers look for it by default
    settings = peer_settings(peer_flags, env)
    if settings.dataset == "fashion-mnist" and not data_dir and not FASHION_MNIST.is_dir() and not args.local:
        say(
            f"fashion-mnist is not on this host ({install_command('dataset-fashion-mnist')}); the peers will "
            "download it into the datasets volume (needs internet)"
        )
    run_dir = abs_path(args.run_dir) if args.run_dir else default_run_dir()
    run_id = settings.run_id if settings.run_id != "default" else ""
    if args.resume:
        resume_dir = abs_path(args.resume)
        if args.run_dir and run_dir != resume_dir:
            raise UpError(f"--resume {args.resume} goes on in its own run dir: leave --run-dir out", 2)
        try:
            checkpoint = read_checkpoint(resume_dir)
        except CheckpointError as err:
            raise UpError(f"--resume: {err}", 2) from None
        if checkpoint is None:
            raise UpError(f"--resume: no checkpoint in {resume_dir} (a run writes one after every finished round)", 2)
        if run_id and run_id != checkpoint.run_id:
            raise UpError(f"--resume: the checkpoint is of run {checkpoint.run_id}, not {run_id}", 2)
        run_dir, run_id = resume_dir, checkpoint.run_id
    return Network(
        project=project,
        run_dir=run_dir,
        total=total,
        first=args.first,
        peers=[peer_id(k) for k in range(args.first, args.first + args.peers)],
        peer_flags=peer_flags,
        env=env,
        join=args.join,
        publish=args.publish,
        data_dirs=data_dirs,
        max_rounds=settings.max_rounds,
        topic_prefix=settings.topic_prefix,
        run_id=run_id,
        resume=bool(args.resume),
        per_process=args.peers_per_process,
    )


def run_settings(net: Network, login: Login | None) -> None:
    """The run's id and whether it resumes, into every peer's environment: given, the joined broker's, or new."""
    if not net.run_id and net.join and login is not None and login.run_id_file.is_file():
        net.run_id = login.run_id_file.read_text().strip()
        if not valid_run_id(net.run_id):
            raise UpError(f"{login.run_id_file}: {net.run_id!r} is not a run id; copy the login folder again", 2)
    net.run_id = net.run_id or new_run_id(time.time())
    net.env["FL_RUN_ID"] = net.run_id
    if net.resume:
        net.env["FL_RESUME"] = "yes"


def check_docker(args) -> None:
    problem = docker_problem(float(os.environ.get("UP_DOCKER_TIMEOUT", "5")))
    if problem:
        raise UpError(f"no Docker engine reachable ({problem})")


def login_for(net: Network, login_dir: str | None) -> Login:
    if net.join:
        if not login_dir:
            raise UpError(
                "--join needs --login DIR: a copy of the broker machine's login folder "
                "(`./up.sh credentials` there prints where it is)",
                2,
            )
        login = Login(abs_path(login_dir))
        login.check(net.peers)
        # The network's own folder gets the files its compose file names (the secret of the federation included).
        own = private_dir(net.state / "login")
        for peer in net.peers:
            shutil.copyfile(login.env_file(peer), own / f"{peer}.env")
            (own / f"{peer}.env").chmod(0o600)
        if login.secret.is_file():
            shutil.copyfile(login.secret, own / login.secret.name)
            (own / login.secret.name).chmod(0o600)
        return Login(own) if (own / login.secret.name).is_file() else make_credentials(own, [])
    return make_credentials(net.state / "login", [peer_id(k) for k in range(1, net.total + 1)], net.topic_prefix)


def cmd_run(args, peer_flags: list[str]) -> int:
    net = network_from_args(args, peer_flags)
    if net.resume:
        say(f"going on with run {net.run_id} from its checkpoint in {net.run_dir}")
    if args.local:
        run_settings(net, None)
        return run_local(net)
    problem = docker_problem(float(os.environ.get("UP_DOCKER_TIMEOUT", "5")))
    if problem:
        if args.docker or args.join:
            raise UpError(f"no Docker engine reachable ({problem})")
        say(f"no Docker engine reachable ({problem}); running the same network as local processes (./up.sh --local)")
        run_settings(net, None)
        return run_local(net)
    ca = abs_path(args.ca_bundle) if args.ca_bundle else None
    if ca and not ca.is_file():
        raise UpError(f"--ca-bundle {args.ca_bundle}: no such file", 2)
    login = login_for(net, args.login)
    run_settings(net, Login(abs_path(args.login)) if args.login else None)
    return run_containers(net, login, args.base, ca)


def cmd_broker(args) -> int:
    """Only the broker, published for peers on other machines, left running (./up.sh down takes it away)."""
    check_docker(args)
    args.project = args.project or DEFAULT_PROJECT
    net = Network(
        project=args.project,
        run_dir=STATE / args.project / "broker-run",
        peers=[],
        total=args.peers,
        publish=args.publish,
        topic_prefix=os.environ.get("FL_TOPIC_PREFIX") or "sd",
    )
    if args.peers < 2:
        raise UpError("--peers: the federation needs at least 2 peers", 2)
    ensure_images(args.base, abs_path(args.ca_bundle) if args.ca_bundle else None)
    login = login_for(net, None)
    write_file(net.compose_file, json.dumps(compose_config(net, login, os.getuid(), os.getgid()), indent=2) + "\n")
    try:
        address = start_broker(net, compose_cmd(net.project, net.compose_file))
    except UpError:
        take_down(net.project, net.compose_file)
        raise
    remember(mode="broker", project=net.project, run_dir=None, pid=None, peers=[])
    run_id = new_run_id(time.time())
    write_file(login.run_id_file, run_id + "\n")
    say(
        f"logins for peer-1..peer-{args.peers} and the id of its run ({run_id}): {login.folder} (copy it to the "
        "peers' machines, privately)"
    )
    say(
        f"join it: ./up.sh --join THIS-HOST:{address.rsplit(':', 1)[-1]} --login LOGIN-DIR --peers N --first K "
        f"--total {args.peers} -- PEER_FLAGS"
    )
    say(f"stop it: ./up.sh down --project {net.project}")
    return 0


def locate(args) -> dict:
    """The network a control command acts on: --project, else --run-dir, else the last one started here."""
    info = last()
    if getattr(args, "project", None) and args.project != info.get("project"):
        info = {"mode": "docker", "project": args.project, "run_dir": None}
    if getattr(args, "run_dir", None):
        run_dir = abs_path(args.run_dir)
        if str(run_dir) != info.get("run_dir"):
            info = {"mode": None, "project": None, "run_dir": str(run_dir)}
    if not info:
        raise UpError("no network to act on: start one with ./up.sh, or name it with --run-dir DIR or --project NAME")
    if info.get("mode") in (None, "docker", "broker") and not info.get("project"):
        # A run dir named on the command line: its containers carry it as a label; else it was a local run.
        found = [] if docker_problem(5) else containers(**{LABEL_RUN_DIR: info["run_dir"]})
        info = {
            **info,
            "mode": "docker" if found else "local",
            "project": found[0]["Config"]["Labels"][LABEL_PROJECT] if found else None,
        }
    if info.get("mode") in ("docker", "broker"):
        check_docker(args)
    return info


def peer_containers(project: str) -> dict[str, dict]:
    """Each peer of the project, and the container it runs in (peers hosted together share one)."""
    return {
        peer: c
        for c in containers(**{LABEL_PROJECT: project})
        if LABEL_PEER in c["Config"]["Labels"]
        for peer in c["Config"]["Labels"][LABEL_PEER].split(",")
    }


def hosted_with(container: dict) -> list[str]:
    """The peers a container runs (one, a host's several, or none: the broker, the live page)."""
    return [peer for peer in container["Config"]["Labels"].get(LABEL_PEER, "").split(",") if peer]


def cmd_status(args) -> int:
    info = locate(args)
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else None
    if info["mode"] == "local":
        if run_dir is None or not run_dir.is_dir():
            raise UpError(f"run dir {run_dir} does not exist")
        print(chaos.format_status(run_dir))
        return 0
    project = info["project"]
    found = containers(**{LABEL_PROJECT: project})
    if not found:
        say(
            f"network {project} is not running: it has no container (the run ended, or was taken down)"
            + (f"; its records: {run_dir}" if run_dir else "")
        )
        return 0
    if run_dir is None:
        labels = [c["Config"]["Labels"].get(LABEL_RUN_DIR) for c in found if LABEL_PEER in c["Config"]["Labels"]]
        run_dir = Path(labels[0]) if labels and labels[0] else None
    peers = peer_containers(project)
    hosts = {c["Id"] for c in found if len(hosted_with(c)) > 1}
    broker = [c for c in found if service_of(c) == "broker"]
    lines = [
        f"network {project}: {len({c['Id'] for c in peers.values()})} peer containers"
        + (f" ({len(peers)} peers)" if hosts else "")
        + (f", records in {run_dir}" if run_dir else "")
    ]
    if broker:
        b = broker[0]
        health = b["State"].get("Health", {}).get("Status", "no healthcheck")
        ports = b["NetworkSettings"].get("Ports", {}).get("1883/tcp") or []
        where = ", ".join(f"{p['HostIp']}:{p['HostPort']}" for p in ports)
        lines.append(f"broker: {state_of(b)}, {health}" + (f", published at {where}" if where else ""))
    statuses = chaos.read_statuses(run_dir) if run_dir else {}
    live = {p: statuses[p] for p, c in peers.items() if state_of(c) == "running" and p in statuses}
    controller = chaos.current_controller({p: s for p, s in live.items() if s.get("role") != "finished"})
    if controller:
        s = live[controller]
        acc = s.get("accuracy")
        lines.append(
            f"controller: {controller} (term {s.get('term')}), round {s.get('round')}, last accuracy "
            + ("n/a" if acc is None else f"{acc:.4f}")
        )
    else:
        lines.append("controller: none among the running peers right now")
    lines.append(f"{'peer':<10} {'container':<12} {'role':<11} {'term':>4} {'round':>5}" + ("  host" if hosts else ""))
    for peer in sorted(peers, key=lambda p: (len(p), p)):
        s = statuses.get(peer, {})
        state = state_of(peers[peer])
        host = f"  {service_of(peers[peer])}" if hosts else ""
        note = "" if state in ("running", "paused") or not s else "  (last reported)"
        lines.append(
            f"{peer:<10} {state:<12} {s.get('role', '-'):<11} {s.get('term', '-'):>4} "
            f"{s.get('round', '-'):>5}{host}{note}"
        )
    print("\n".join(lines))
    return 0


def cmd_kill(args) -> int:
    sig = args.signal.upper().removeprefix("SIG")
    if sig not in SIGNALS:
        raise UpError(f"--signal must be KILL, TERM, STOP or CONT, not {args.signal!r}", 2)
    if len(args.target) == 2 and args.target[0] == "peer":
        target = args.target[1]
    elif len(args.target) == 1 and args.target[0] != "peer":
        target = args.target[0]
    else:
        raise UpError("kill takes one target: controller, random or peer ID", 2)
    info = locate(args)
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else None
    if info["mode"] == "local":
        if run_dir is None or not run_dir.is_dir():
            raise UpError(f"run dir {run_dir} does not exist")
        try:
            peer, pid = chaos.kill(run_dir, target, sig)
        except (chaos.ChaosError, ProcessLookupError, PermissionError) as err:
            raise UpError(f"nothing to act on: {err}") from None
        say(f"sent SIG{sig} to {peer} (pid {pid})")
        return 0
    peers = peer_containers(info["project"])
    if not peers:
        raise UpError(f"nothing to act on: network {info['project']} has no peer container (not running)")
    if run_dir is None:
        run_dir = Path(next(iter(peers.values()))["Config"]["Labels"][LABEL_RUN_DIR])
    states = {p: state_of(c) for p, c in peers.items()}
    able = {"CONT": ("paused",), "STOP": ("running",)}.get(sig, ("running", "paused"))
    candidates = {p for p, s in states.items() if s in able}
    statuses = chaos.read_statuses(run_dir)
    if target == "controller":
        peer = chaos.current_controller(
            {p: statuses[p] for p in candidates if p in statuses and statuses[p].get("role") != "finished"}
        )
        if peer is None:
            raise UpError(
                "nothing to act on: no running peer is controller right now ("
                + ", ".join(f"{p} {s}" for p, s in sorted(states.items()))
                + ")"
            )
    elif target == "random":
        if not candidates:
            raise UpError(f"nothing to act on: no peer is {' or '.join(able)}")
        peer = random.choice(sorted(candidates))
    else:
        peer = target
        if peer not in peers:
            raise UpError(f"no peer {peer!r} in network {info['project']}; its peers: {', '.join(sorted(peers))}")
        if peer not in candidates:
            raise UpError(f"nothing to act on: {peer} is {states[peer]}, and {sig} needs it {' or '.join(able)}")
    cid = peers[peer]["Id"]
    sent = time.time()  # chaos.csv has when the signal went, not when docker came back: failover counts from it
    # STOP/CONT freeze and thaw the whole container (cgroup freezer), as SIGSTOP/SIGCONT would the process.
    if sig == "STOP":
        run(["docker", "pause", cid])
    elif sig == "CONT":
        run(["docker", "unpause", cid])
    else:
        run(["docker", "kill", "-s", f"SIG{sig}", cid])
    chaos.record(run_dir, SIGNALS[sig], peer, sig, at=sent)
    role = statuses.get(peer, {})
    what = f" (controller of term {role.get('term')})" if target == "controller" else ""
    mates = [p for p in hosted_with(peers[peer]) if p != peer]
    also = f", with the peers it hosts beside {peer}: {spans(mates)}" if mates else ""
    say(f"sent SIG{sig} to {peer}{what}: container {peers[peer]['Name'].lstrip('/')}{also}")
    return 0


def cmd_down(args) -> int:
    info = locate(args)
    if info["mode"] == "local":
        pid = info.get("pid")
        if not launcher_alive(pid):
            say("no local network is running")
            return 0
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while launcher_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        say(f"stopped the local network (launcher pid {pid})")
        return 0
    project = info["project"]
    pid = info.get("pid") if info.get("project") == last().get("project") else None
    started = time.monotonic()
    if launcher_alive(pid) and pid != os.getpid():
        # The launcher following the run takes it down itself, keeping the peers' whole logs.
        os.kill(pid, signal.SIGTERM)
        while launcher_alive(pid) and time.monotonic() - started < 20:
            time.sleep(0.2)
    if not containers(**{LABEL_PROJECT: project}) and not launcher_alive(pid):
        took = time.monotonic() - started
        say(f"network {project} is down" + (f" ({took:.1f} s)" if took > 0.5 else ": nothing was running"))
        return 0
    take_down(project, STATE / project / "compose.json")
    say(f"network {project} taken down in {time.monotonic() - started:.1f} s: no container or network left")
    return 0


def cmd_credentials(args) -> int:
    args.project = args.project or DEFAULT_PROJECT
    login = make_credentials(
        STATE / args.project / "login",
        [peer_id(k) for k in range(1, args.peers + 1)],
        os.environ.get("FL_TOPIC_PREFIX") or "sd",
    )
    say(
        f"logins of network {args.project} (peer-1..peer-{args.peers}, health) in {login.folder}: "
        f"<peer>.env holds FL_USERNAME/FL_PASSWORD"
    )
    return 0


def cmd_compose_file(args, peer_flags: list[str]) -> int:
    net = network_from_args(args, peer_flags)
    login = Login(net.state / "login")
    run_settings(net, Login(abs_path(args.login)) if args.login else None)
    print(json.dumps(compose_config(net, login, os.getuid(), os.getgid()), indent=2))
    return 0


def cmd_images(args) -> int:
    check_docker(args)
    ensure_images(args.base, abs_path(args.ca_bundle) if args.ca_bundle else None)
    return 0


# ------------------------------------------------------------------------------------------------ parsing


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UpError(f"{message} (./up.sh --help)", 2)


USAGE = """\
  ./up.sh [--peers N] [--run-dir DIR] [--local | --docker] [-- PEER_FLAGS...]
  ./up.sh status              [--run-dir DIR | --project NAME]
  ./up.sh kill controller     [--signal KILL|TERM|STOP|CONT] [--run-dir DIR | --project NAME]
  ./up.sh kill random | peer ID   [--signal ...]
  ./up.sh down                [--run-dir DIR | --project NAME]
  ./up.sh broker --publish ADDR --peers T   (several hosts: the broker alone; peers join with --join)
  ./up.sh --join HOST:PORT --login DIR --peers N [--first K] [--total T] [-- PEER_FLAGS...]
  ./up.sh images | credentials | compose-file"""

DESCRIPTION = """\
Starts a federated-learning network: one Mosquitto broker and N identical peers (peer-K trains on shard K-1/N)
that elect a controller and run rounds until they finish, then prints where the records are (layout:
docs/RECORDS.md) and how to draw the graphs. With a Docker engine (docker info answers, compose v2) the broker
and the peers run in containers; otherwise, or with --local, as local processes (python -m scripts.localnet).
Control commands act on the last network started here, or on --run-dir / --project."""

EPILOG = """\
Peer settings: every flag after -- goes to every peer (python -m peer --help); FL_* variables are passed too
(e.g. FL_MAX_ROUNDS=3 ./up.sh). FL_MIN_PEERS follows the number of peers unless set.

Environment: PYTHON (interpreter of local peers), UP_PROJECT, UP_BROKER_PUBLISH, UP_BASE, UP_CA_BUNDLE,
UP_BUILD_NETWORK (docker build --network, default host), UP_DOCKER_TIMEOUT (s, default 5), UP_DEBIAN_MIRROR."""


def add_common(p: argparse.ArgumentParser, run_dir: bool = True) -> None:
    p.add_argument(
        "--project",
        default=os.environ.get("UP_PROJECT") or None,
        help="compose project, i.e. which network (default: sdfl to start one, the last one started to act on one)",
    )
    if run_dir:
        p.add_argument("--run-dir", help="the run's records folder")


def add_images(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        choices=("auto", "official", "local"),
        default=os.environ.get("UP_BASE") or "auto",
        help="base images: official (python:3.11-slim, eclipse-mosquitto:2), local (built from Debian "
        "packages with mmdebstrap), auto (official when it can be had; default)",
    )
    p.add_argument(
        "--ca-bundle",
        default=os.environ.get("UP_CA_BUNDLE") or None,
        metavar="FILE",
        help="extra CA certificates (PEM) for image builds behind a TLS-intercepting proxy",
    )


def run_parser(prog: str = "./up.sh") -> argparse.ArgumentParser:
    p = Parser(
        prog=prog,
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peers", type=int, default=5, help="peers started here (default 5)")
    p.add_argument(
        "--peers-per-process",
        type=int,
        default=1,
        metavar="K",
        help="run the peers K to a process or container (python -m peer.host), sharing one "
        "TensorFlow: about 470 MB per process instead of per peer (default 1)",
    )
    add_common(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--local", action="store_true", help="local processes even if Docker is available")
    where.add_argument("--docker", action="store_true", help="containers, or fail (no fallback to local)")
    p.add_argument(
        "--publish",
        default=os.environ.get("UP_BROKER_PUBLISH") or DEFAULT_PUBLISH,
        metavar="ADDR",
        help="where the broker is published on the host (default 127.0.0.1::1883, a free port)",
    )
    p.add_argument(
        "--data-dir",
        metavar="DIR",
        help="a host folder of dataset files, mounted read-only "
        "(Debian's /usr/share/datasets/fashion-mnist is mounted when present)",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="go on with the run whose checkpoint is in RUN_DIR (written "
        "after every finished round): same run id, its model, the round numbering going on",
    )
    p.add_argument("--join", metavar="HOST:PORT", help="no broker here: the peers join this one")
    p.add_argument("--login", metavar="DIR", help="with --join: a copy of the broker machine's login folder")
    p.add_argument("--first", type=int, default=1, metavar="K", help="number of the first peer here (default 1)")
    p.add_argument(
        "--total",
        type=int,
        default=0,
        metavar="T",
        help="peers in the whole federation, on every machine (default: first + peers - 1)",
    )
    add_images(p)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    peer_flags: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, peer_flags = argv[:split], argv[split + 1 :]
    command = argv[0] if argv and not argv[0].startswith("-") else "run"
    rest = argv[1:] if command != "run" else argv
    try:
        if command == "run":
            return cmd_run(run_parser().parse_args(rest), peer_flags)
        if command == "compose-file":
            return cmd_compose_file(run_parser("./up.sh compose-file").parse_args(rest), peer_flags)
        if peer_flags:
            raise UpError(f"{command} takes no peer flags (nothing after --)", 2)
        if command == "status":
            p = Parser(
                prog="./up.sh status", description="controller, term, round and each peer's role and container state"
            )
            add_common(p)
            return cmd_status(p.parse_args(rest))
        if command == "kill":
            p = Parser(
                prog="./up.sh kill",
                description="signal a peer: KILL (default), TERM, STOP (freeze its "
                "container) or CONT (thaw it); every signal is recorded in the run's chaos.csv",
            )
            p.add_argument("target", nargs="+", metavar="controller|random|peer ID")
            p.add_argument("--signal", default="KILL")
            add_common(p)
            return cmd_kill(p.parse_args(rest))
        if command == "down":
            p = Parser(
                prog="./up.sh down",
                description="stop the network: no container, network or anonymous "
                "volume is left (the records and the datasets volume stay)",
            )
            add_common(p)
            return cmd_down(p.parse_args(rest))
        if command == "broker":
            p = Parser(
                prog="./up.sh broker",
                description="several hosts: start the broker alone, published for "
                "peers on other machines (./up.sh --join there), and leave it running",
            )
            add_common(p, run_dir=False)
            p.add_argument("--peers", type=int, default=5, help="peers in the whole federation (logins made)")
            p.add_argument("--publish", default=os.environ.get("UP_BROKER_PUBLISH") or "0.0.0.0:1883:1883")
            add_images(p)
            return cmd_broker(p.parse_args(rest))
        if command == "credentials":
            p = Parser(prog="./up.sh credentials", description="make the network's logins (kept if present)")
            add_common(p, run_dir=False)
            p.add_argument("--peers", type=int, default=5, help="logins peer-1..peer-N (default 5)")
            return cmd_credentials(p.parse_args(rest))
        if command == "images":
            p = Parser(prog="./up.sh images", description="build the peer and broker images")
            add_images(p)
            return cmd_images(p.parse_args(rest))
        raise UpError(f"unknown command {command!r} (./up.sh --help)", 2)
    except UpError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return err.status
    except Interrupted as stop:
        print(f"{PROG}: stopped", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:
        print(f"{PROG}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
