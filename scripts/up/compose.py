"""The compose file of a network, as data, and as the YAML a person reads (`./up.sh compose-file`; the repository's
docker-compose.yml is the one of 5 peers, and a test keeps it so).

What differs from one machine or run to the next is a variable, with a default for a plain `docker compose up` in
the checkout (VARIABLES): whose uid the peers run as (the records and the secret are that user's), where the logins
and the records are, the run's id. The launcher runs the very file it prints, giving the variables its own values
(`Compose`). Only what the command line asks for is written in: the peers, their flags and FL_* settings, a dataset
folder, where the broker is published.

Services: the broker (its logins and ACL mounted read-only, a healthcheck that logs in), one container per peer (or
per K peers: python -m peer.host, each peer with its own login), and the live page (a read-only observer).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from scripts.up import bridges
from scripts.up.common import ROOT, write_file
from scripts.up.images import BROKER_IMAGE, IMAGES, MOSQUITTO_VOLUMES, PEER_IMAGE
from scripts.up.logins import ACL, CA_FILE, HEALTH_ENV, OBSERVER_LOGIN, PASSWD, SECRET, peer_env
from scripts.up.network import DEFAULT_PROJECT, FASHION_MNIST, Network
from scripts.up.tls import CA_MOUNT, CONF_FILE, FILES, MOUNT

LABEL_RUN_DIR = "org.sdfl.run-dir"
LABEL_PEER = "org.sdfl.peer"  # on a peer container: the peers it runs (its id, or ids joined by commas on a host)
LABEL_PROJECT = "com.docker.compose.project"
DASHBOARD = "dashboard"  # its compose service; the page listens on DASHBOARD_PORT inside
DASHBOARD_PORT = 8765
HOSTED_LOGINS = "/run/secrets/logins"  # where a host container finds its peers' logins (peer.host --login-dir)
DOWN_GRACE_S = 5  # a peer gets this long to leave after SIGTERM (it takes well under a second)
DATA_MOUNT = "/data/input"  # where a container finds the host's --data-dir
PLAIN_RUN_DIR = "./runs/compose"  # the records of a plain `docker compose up`
SETUP = "./up.sh credentials"  # the one-liner a plain `docker compose up` needs first


# name -> what it is, and its default in the file (None: required, the file says how to set it)
VARIABLES = {
    "SDFL_UID": ("the uid the peers run as: the records and the secret they read are that user's", None),
    "SDFL_GID": ("their gid", None),
    "SDFL_LOGIN_DIR": (
        "the logins, the ACL and the federation secret (made by ./up.sh credentials)",
        "./.up/{project}/login",
    ),
    "SDFL_RUN_DIR": ("the run's records (docs/RECORDS.md)", PLAIN_RUN_DIR),
    "SDFL_RUN_ID": ("the run's id (FL_RUN_ID): ./up.sh makes a new one for every network", "default"),
    "SDFL_CONTAINER_CPUS": (
        "a peer container's cores: the machine's, shared among its containers (set by ./up.sh)",
        "1",
    ),
}


def container_cpus(containers: int) -> str:
    """Each of `containers` peer containers' share of this machine's cores (at least a tenth of one)."""
    return f"{max(0.1, (os.cpu_count() or 1) / max(1, containers)):.2f}"


def default(name: str, project: str = DEFAULT_PROJECT) -> str | None:
    value = VARIABLES[name][1]
    return None if value is None else value.format(project=project)


def var(name: str, project: str = DEFAULT_PROJECT) -> str:
    """`${NAME:-default}`, or `${NAME:?...}` for a variable without a default: compose says what to run first."""
    value = default(name, project)
    if value is None:
        return f"${{{name}:?run {SETUP} first}}"
    return f"${{{name}:-{value}}}"


def dollar(text: str) -> str:
    """Compose interpolates $ in every value: a literal $ (in a peer flag, a path) is $$."""
    return text.replace("$", "$$")


def data_mounts(net: Network) -> tuple[list[tuple[Path, str]], dict[str, str]]:
    """The dataset folders a peer container gets (host folder, container path; read-only) and the settings that
    point the peer at them: --data-dir at DATA_MOUNT; else, for fashion-mnist, Debian's copy of the host at the same
    path, where the peers look for it by default."""
    if net.data_dir is not None:
        return [(net.data_dir, DATA_MOUNT)], {"FL_DATA_DIR": DATA_MOUNT}
    if net.dataset == "fashion-mnist" and FASHION_MNIST.is_dir():
        return [(FASHION_MNIST, str(FASHION_MNIST))], {}
    return [], {}


def bind(source: str, target: str, read_only: bool = True) -> dict:
    return {"type": "bind", "source": source, "target": target, **({"read_only": True} if read_only else {})}


def build(kind: str) -> dict:
    """How compose builds an image the first time (./up.sh builds them itself, on other bases if need be). Every
    service of an image says so alike, with `pull_policy: never`: compose then builds it once and pulls nothing (a
    service without it would try the registry, and fail loudly, for an image only this repository makes). Host
    networking, as ./up.sh builds (UP_BUILD_NETWORK): some machines resolve no name on the default bridge."""
    dockerfile = next(path for path, image_kind in IMAGES.values() if image_kind == kind)
    return {"context": ".", "dockerfile": dockerfile, "network": "host"}


def compose_config(net: Network) -> dict:
    """The compose file for this network, as data (paths relative to the checkout, machine facts as VARIABLES)."""
    logins = var("SDFL_LOGIN_DIR", net.project)
    secret = bind(f"{logins}/{SECRET}", "/run/secrets/federation")
    labels = {LABEL_RUN_DIR: var("SDFL_RUN_DIR")}
    user = f"{var('SDFL_UID')}:{var('SDFL_GID')}"
    services: dict[str, dict] = {}
    brokers = [] if net.join else bridges.services(net)
    for index, name in enumerate(brokers):
        health = (
            'mosquitto_sub -h 127.0.0.1 -p 1883 -u health -P "$MQTT_HEALTH_PASSWORD" '
            "-t '$SYS/broker/uptime' -C 1 -W 5 > /dev/null"
        )
        service = {
            "image": BROKER_IMAGE,
            "build": build("mosquitto"),
            "pull_policy": "never",
            "hostname": name,
            "labels": labels,
            "env_file": [f"{logins}/{HEALTH_ENV}"],
            # Read-only, and outside /mosquitto: no container ever writes to (or re-owns) a file of the host.
            "volumes": [bind(f"{logins}/{file}", f"/etc/sdfl/login/{file}") for file in (PASSWD, ACL)],
            # The base image's VOLUMEs would each leave an anonymous volume behind: tmpfs instead.
            "tmpfs": MOSQUITTO_VOLUMES,
            # The first broker where --publish says; the others on this machine's loopback, a free port each.
            "ports": [net.publish if index == 0 else "127.0.0.1::1883"],
            "healthcheck": {"test": ["CMD-SHELL", dollar(health)], "interval": "2s", "timeout": "6s", "retries": 30},
            "restart": "no",
        }
        if net.tls:  # the certificates beside the login folder (.up/<project>/tls: never copied to peers)
            service["volumes"] += [bind(f"{logins}/../tls/{file}", f"{MOUNT}/{file}") for file in FILES]
            service["command"] = ["mosquitto", "-c", f"{MOUNT}/{CONF_FILE}"]
        if bridges.bridged(net):  # its own configuration, the bridge up the tree in it (.up/<project>/brokers)
            if net.bridge_to:
                service["volumes"].append(
                    bind(f"{logins}/../tls/{bridges.UPSTREAM_CA}", f"{MOUNT}/{bridges.UPSTREAM_CA}")
                )
            service["volumes"].append(bind(f"{logins}/../brokers/{name}.conf", bridges.CONF_MOUNT))
            service["command"] = ["mosquitto", "-c", bridges.CONF_MOUNT]
        services[name] = service
    healthy = {name: {"condition": "service_healthy"} for name in brokers}
    data_dirs, data_env = data_mounts(net)
    settings = {k: v for k, v in net.env.items() if k != "FL_RUN_ID"}  # the run's id is a variable
    for name, peers in net.containers().items():
        env = {
            "FL_BROKER": net.join or bridges.addresses(net, peers[0]),
            "FL_RUN_DIR": "/run-dir",
            "FL_RUN_ID": var("SDFL_RUN_ID"),
            "FL_MIN_PEERS": str(net.total),
            "FL_SECRET_FILE": "/run/secrets/federation",
            **{k: dollar(v) for k, v in {**settings, **data_env}.items()},
        }
        if net.tls:  # joining a TLS broker: trust the CA certificate that came with the login folder
            env["FL_TLS_CA"] = CA_MOUNT
        volumes = [
            bind(var("SDFL_RUN_DIR"), "/run-dir", read_only=False),
            *([bind(f"{logins}/{CA_FILE}", CA_MOUNT)] if net.tls else []),
            secret,
            {"type": "volume", "source": "datasets", "target": "/data/keras"},
            *(bind(dollar(str(host)), target) for host, target in data_dirs),
        ]
        command = [dollar(word) for word in net.peer_flags]
        if name in peers:  # one peer: `python -m peer`, its login in its environment
            env.update(FL_PEER_ID=name, FL_SHARD=net.shard(name))
            env_file = [f"{logins}/{peer_env(name)}"]
        else:  # a host: its peers' logins mounted, and only theirs (the ACL binds a login to a peer)
            env_file = []
            volumes += [bind(f"{logins}/{peer_env(peer)}", f"{HOSTED_LOGINS}/{peer_env(peer)}") for peer in peers]
            hosted = ",".join(f"{peer}={net.shard(peer)}" for peer in peers)
            command = ["--hosted", hosted, "--login-dir", HOSTED_LOGINS, *command]
        service = {
            "image": PEER_IMAGE,
            "build": build("python"),
            "pull_policy": "never",
            "hostname": name,
            "labels": {**labels, LABEL_PEER: ",".join(peers)},
            "user": user,
            # An init as PID 1 forwards SIGTERM to the peer (Python as PID 1 would ignore it until its handler
            # is installed, after TensorFlow loads).
            "init": True,
            "environment": env,
            **({"env_file": env_file} if env_file else {}),
            "volumes": volumes,
            # Together the machine's cores: a peer's learning sizes TensorFlow's threads to its container's share.
            "cpus": var("SDFL_CONTAINER_CPUS"),
            # A lookup of a name that is gone (the broker's container stopped) answers in 1 s, not 10.
            "dns_opt": ["timeout:1", "attempts:1"],
            "stop_grace_period": f"{DOWN_GRACE_S}s",
            "restart": "no",
        }
        if name not in peers:
            service["entrypoint"] = ["python", "-m", "peer.host"]
        if command:
            service["command"] = command
        if healthy:
            service["depends_on"] = healthy
        services[name] = service
    if not net.join:
        # The live page: an observer in the peer image, logged in read-only; the federation does not depend on it.
        services[DASHBOARD] = {
            "image": PEER_IMAGE,
            "build": build("python"),
            "pull_policy": "never",
            "hostname": DASHBOARD,
            "labels": labels,
            "user": user,
            "init": True,
            "entrypoint": ["python", "-m", "graphs.live"],
            "command": [
                "--broker",
                ",".join(f"{broker}:{bridges.PORT}" for broker in brokers),
                "--run-id",
                var("SDFL_RUN_ID"),
                "--bind",
                "0.0.0.0",
                "--port",
                str(DASHBOARD_PORT),
                "--secret-file",
                "/run/secrets/federation",
                # The kills chaos.csv records (./up.sh kill): the wire does not carry them.
                "--signals-from",
                "/run-dir",
            ],
            "env_file": [f"{logins}/{OBSERVER_LOGIN}"],
            "volumes": [secret, bind(var("SDFL_RUN_DIR"), "/run-dir")],
            "ports": [f"127.0.0.1::{DASHBOARD_PORT}"],
            "depends_on": healthy,
            "stop_grace_period": "1s",
            "restart": "no",
        }
    return {
        "name": net.project,
        "services": services,
        # The Keras download cache (mnist, cifar10 when the host has no copy), kept between runs.
        "volumes": {"datasets": {}},
    }


def header(net: Network) -> list[str]:
    """The comment at the top of the file: what it is, how to run it, the topology, the variables."""
    n = len(net.peers)
    lines = [
        f"A federated-learning network: {'a Mosquitto broker and ' if not net.join else ''}{n} peers, in containers.",
        "Generated by ./up.sh compose-file (scripts/up/compose.py). The repository's docker-compose.yml is what",
        "`./up.sh compose-file --peers 5` prints, and a test keeps it so: change the generator, then regenerate it.",
        "",
        f"  {SETUP}       # once: the logins, the ACL, the broker's passwd, the federation secret, .env",
        "  docker compose up         # (the first time, it builds the images: a few minutes, TensorFlow)",
        "  docker compose logs -f peer-3",
        "  docker compose down",
        "./up.sh runs this same file with its own values of the variables, and follows the run (README: Running it).",
        "",
    ]
    if not net.join and net.brokers == 1:
        lines.append("broker     Mosquitto; published on 127.0.0.1, a free port (docker compose port broker 1883)")
    elif not net.join:
        lines += [
            f"broker-1..broker-{net.brokers}  Mosquitto, bridged into a tree: broker-1 the root, broker-2 bridged to it,",
            "           every other to broker-1 with broker-2 as its stand-in (docs/PROTOCOL.md); each peer tries",
            "           its own broker first, then the others",
        ]
    for name, peers in net.containers().items():
        shards = ", ".join(f"{peer} on shard {net.shard(peer)}" for peer in peers)
        lines.append(f"{name:<10} {shards}" if name not in peers else f"{name:<10} shard {net.shard(name)}")
    if not net.join:
        lines.append(f"dashboard  the live page, a read-only observer (docker compose port dashboard {DASHBOARD_PORT})")
    lines += [
        "Each peer logs in to the broker as itself and may publish only as itself (the ACL); every message is signed",
        "with the federation secret. Peer flags and FL_* settings given to ./up.sh are written in; the peers' dataset",
        "is theirs by default (mnist: downloaded once into the `datasets` volume).",
        "",
        "Variables (./up.sh gives its own; a plain `docker compose up` takes .env's, then these defaults):",
    ]
    for name, (what, _) in VARIABLES.items():
        lines.append(f"  {name:<15} {what} ({default(name, net.project) or 'required'})")
    return lines


def compose_text(net: Network) -> str:
    """The compose file of `net` as YAML, with its header."""
    return "".join(f"# {line}".rstrip() + "\n" for line in header(net)) + "\n" + to_yaml(compose_config(net))


# --- YAML, written by hand: the launcher uses the standard library only --------------------------------------------

_PLAIN = re.compile(r"[A-Za-z_/][A-Za-z0-9_./-]*")
_RESERVED = {"y", "n", "yes", "no", "on", "off", "true", "false", "null"}


def scalar(value) -> str:
    """A YAML scalar: true/false, a number, a plain word, else a JSON string (valid YAML, escapes included)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    text = str(value)
    if _PLAIN.fullmatch(text) and text.lower() not in _RESERVED:
        return text
    return json.dumps(text)


def to_yaml(data, indent: int = 0) -> str:
    """Block-style YAML of dicts, lists and scalars: one key or item a line, as a person writes a compose file."""
    pad = " " * indent
    out = []
    if isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, (dict, list)) and value:
                out.append(f"{pad}{scalar(key)}:\n{to_yaml(value, indent + 2)}")
            else:
                out.append(f"{pad}{scalar(key)}: {'{}' if value == {} else '[]' if value == [] else scalar(value)}\n")
            if indent == 0 or (indent == 2 and isinstance(value, dict)):  # a blank line after each part and service
                out.append("\n")
        if out and out[-1] == "\n":
            out.pop()
    else:
        for item in data:
            if isinstance(item, dict) and item:
                first, *rest = to_yaml(item, indent + 2).splitlines(keepends=True)
                out.append(f"{pad}- {first.lstrip()}" + "".join(rest))
            else:
                out.append(f"{pad}- {scalar(item)}\n")
    return "".join(out)


# --- running it -------------------------------------------------------------------------------------------------------


@dataclass
class Compose:
    """A project's compose file as the launcher runs it: `docker compose` in the checkout (the file's paths are
    relative to it), with the launcher's values of the file's variables (kept beside the file, so that `./up.sh
    down` from another shell runs it alike)."""

    project: str
    folder: Path  # .up/<project>

    @property
    def file(self) -> Path:
        return self.folder / "compose.yml"

    @property
    def variables_file(self) -> Path:
        return self.folder / "variables.json"

    def write(self, net: Network, variables: dict[str, str]) -> None:
        write_file(self.file, compose_text(net))
        write_file(self.variables_file, json.dumps(variables, indent=2) + "\n")

    def variables(self) -> dict[str, str]:
        """The values written with the file (the uid and gid of this user if there are none: the file loads)."""
        try:
            given = json.loads(self.variables_file.read_text())
        except (OSError, ValueError):
            given = {}
        own = {"SDFL_UID": str(os.getuid()), "SDFL_GID": str(os.getgid())}
        return {**own, **{k: str(v) for k, v in given.items() if k in VARIABLES}} if isinstance(given, dict) else own

    def command(self, *args: str) -> list[str]:
        return ["docker", "compose", "--project-directory", str(ROOT), "-p", self.project, "-f", str(self.file), *args]

    def env(self) -> dict[str, str]:
        """The environment `command` runs in: the variables are taken as they are (a .env file would interpolate)."""
        return {**os.environ, **self.variables()}
