"""The command line of ./up.sh: its parsers and one function per command (run, broker, status, kill, down,
credentials, compose-file, images)."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

from peer.node.signals import exit_status
from peer.wire.ids import launched_peer_id
from scripts.localnet import install_command
from scripts.up import compose, containers, local
from scripts.up.common import PROG, ROOT, UpError, abs_path, say, state_dir, write_file
from scripts.up.images import PEER_IMAGE, ensure_images, image_exists
from scripts.up.logins import CA_FILE, Login, login_for, make_credentials
from scripts.up.network import (
    DEFAULT_PROJECT,
    DEFAULT_PUBLISH,
    FASHION_MNIST,
    Network,
    apply_settings,
    last,
    network_from_args,
    preflight,
    preflight_env,
    run_settings,
)


def cmd_run(args, peer_flags: list[str]) -> int:
    net = network_from_args(args, peer_flags)
    if net.resume:
        say(f"going on with run {net.run_id} from its checkpoint in {net.run_dir}")
    if args.local:
        return local.run_local(net)
    problem = containers.docker_problem(docker_timeout())
    if problem:
        if args.docker or args.join:
            raise UpError(f"no Docker engine reachable ({problem})")
        say(f"no Docker engine reachable ({problem}); running the same network as local processes (./up.sh --local)")
        return local.run_local(net)
    ca = ca_bundle(args)
    containers.check_not_running(net.project)
    python = settings_python()
    if python:  # the flags checked before the images are built: a typo costs no build
        apply_settings(net, preflight(python, net, preflight_env(None)))
    ensure_images(args.base, ca)
    if not python:
        apply_settings(net, containers.preflight_in_image(net))
    if net.dataset == "fashion-mnist" and net.data_dir is None and not FASHION_MNIST.is_dir():
        say(
            f"fashion-mnist is not on this host ({install_command('dataset-fashion-mnist')}); the peers will "
            "download it into the datasets volume (needs internet)"
        )
    if args.join and args.login:  # a broker started with --tls hands its CA certificate out with the logins
        net.tls = (abs_path(args.login) / CA_FILE).is_file()
    login = login_for(net, args.login)
    run_settings(net, Login(abs_path(args.login)).run_id_file if args.login else None)
    return containers.run_containers(net, login)


def settings_python() -> list[str] | None:
    """The command that runs scripts/preflight.py in a Python with the project's packages on this host: $PYTHON,
    the checkout's .venv, or the launcher's own interpreter if it has them; None: only the peer image has them."""
    if os.environ.get("PYTHON"):
        return [os.environ["PYTHON"], "-m", "scripts.preflight"]
    venv = ROOT / ".venv" / "bin" / "python"
    if venv.exists():
        return [str(venv), "-m", "scripts.preflight"]
    if all(importlib.util.find_spec(name) for name in ("numpy", "paho", "tensorflow")):
        return [sys.executable, "-m", "scripts.preflight"]
    return None


def cmd_broker(args) -> int:
    """Only the broker, published for peers on other machines, left running (./up.sh down takes it away)."""
    if args.bridge_to and not (args.tls and args.login):
        raise UpError("--bridge-to crosses machines: it needs --tls and --login (a copy of that machine's logins)", 2)
    if args.login and not args.bridge_to:
        raise UpError("--login goes with --bridge-to: a broker alone makes its own logins", 2)
    containers.check_docker()
    if args.peers < 2:
        raise UpError("--peers: the federation needs at least 2 peers", 2)
    project = args.project or DEFAULT_PROJECT
    publish = args.publish or ("0.0.0.0:8883:8883" if args.tls else "0.0.0.0:1883:1883")
    net = Network(
        project=project,
        run_dir=state_dir() / project / "broker-run",
        peers=[],
        total=args.peers,
        publish=publish,
        topic_prefix=os.environ.get("FL_TOPIC_PREFIX") or "sd",
        tls=args.tls,
        bridge_to=args.bridge_to,
    )
    copied = abs_path(args.login) if args.login else None
    login, address = containers.broker_alone(net, args.base, ca_bundle(args), args.tls_host, copied)
    run_id = login.run_id_file.read_text().strip()
    say(
        f"logins for peer-1..peer-{args.peers} and the id of its run ({run_id}): {login.folder} (copy it to the "
        "peers' machines, privately)"
    )
    if net.bridge_to:
        say(
            f"bridged to {net.bridge_to} over TLS: one federation. The login folder's {CA_FILE} now holds both "
            "brokers' CA certificates: peers on either machine join with a copy of it (--join THIS:PORT,THAT:PORT)"
        )
    elif net.tls:
        say(
            f"TLS only on {address}: its certificate ({net.state / 'tls' / 'broker.pem'}) is signed by the network's "
            f"CA, whose certificate is in the login folder ({CA_FILE}): the joining peers trust it (FL_TLS_CA)"
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
        project = containers.project_of(info["run_dir"])
        info = {**info, "mode": "docker" if project else "local", "project": project}
    if info.get("mode") in ("docker", "broker"):
        containers.check_docker()
    return info


def cmd_status(args) -> int:
    info = locate(args)
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else None
    if info["mode"] == "local":
        print(local.status(run_dir or Path(".")))
        return 0
    shown = containers.status(info["project"], run_dir)
    if shown is None:
        say(
            f"network {info['project']} is not running: it has no container (the run ended, or was taken down)"
            + (f"; its records: {run_dir}" if run_dir else "")
        )
    else:
        print(shown)
    return 0


def cmd_kill(args) -> int:
    sig = args.signal.upper().removeprefix("SIG")
    if sig not in containers.SIGNALS:
        raise UpError(f"--signal must be KILL, TERM, STOP or CONT, not {args.signal!r}", 2)
    broker: str | None = None
    if args.target[0] == "broker" and len(args.target) <= 2:
        broker = args.target[1] if len(args.target) == 2 else ""  # "": the controller's broker
    elif len(args.target) == 2 and args.target[0] == "peer":
        target = args.target[1]
    elif len(args.target) == 1 and args.target[0] != "peer":
        target = args.target[0]
    else:
        raise UpError("kill takes one target: controller, random, peer ID, or broker [N]", 2)
    info = locate(args)
    run_dir = Path(info["run_dir"]) if info.get("run_dir") else None
    if broker is not None and info["mode"] == "local":
        say(local.kill_broker(run_dir or Path("."), broker or None, sig))
    elif broker is not None:
        say(containers.kill_broker(info["project"], run_dir, broker or None, sig))
    elif info["mode"] == "local":
        say(local.kill(run_dir or Path("."), target, sig))
    else:
        say(containers.kill(info["project"], run_dir, target, sig))
    return 0


def cmd_down(args) -> int:
    info = locate(args)
    if info["mode"] == "local":
        say(local.down(info.get("pid")))
    else:
        pid = info.get("pid") if info.get("project") == last().get("project") else None
        say(containers.down(info["project"], pid))
    return 0


def cmd_credentials(args) -> int:
    project = args.project or DEFAULT_PROJECT
    login = make_credentials(
        state_dir() / project / "login",
        [launched_peer_id(k) for k in range(1, args.peers + 1)],
        os.environ.get("FL_TOPIC_PREFIX") or "sd",
    )
    say(
        f"logins of network {project} (peer-1..peer-{args.peers}, health) in {login.folder}: "
        f"<peer>.env holds FL_USERNAME/FL_PASSWORD"
    )
    if project == DEFAULT_PROJECT:  # what the repository's docker-compose.yml needs besides
        values: dict[str, str | None] = {"SDFL_UID": str(os.getuid()), "SDFL_GID": str(os.getgid())}
        # (the file's default is the checkout's own .up/sdfl/login; UP_STATE_DIR puts them elsewhere)
        values["SDFL_LOGIN_DIR"] = None if state_dir() == ROOT / ".up" else str(login.folder)
        values["SDFL_CONTAINER_CPUS"] = compose.container_cpus(args.peers)  # the file runs a container per peer
        set_env_file(ROOT / ".env", values)
        (ROOT / compose.PLAIN_RUN_DIR).mkdir(parents=True, exist_ok=True)
        say(
            f".env: the peers run as uid {values['SDFL_UID']}; records in {compose.PLAIN_RUN_DIR}; "
            "then: docker compose up"
        )
    return 0


def set_env_file(path: Path, values: dict[str, str | None]) -> None:
    """`values` into the dotenv file at `path` (compose's .env), each in place of its line if there is one (None:
    its line goes); the file's other lines are left as they are."""
    lines = (
        path.read_text().splitlines() if path.is_file() else ["# docker-compose.yml's variables (./up.sh credentials)"]
    )
    for name, value in values.items():
        at = next((i for i, old in enumerate(lines) if old.split("=", 1)[0].strip() == name), None)
        if value is None:
            lines = [old for i, old in enumerate(lines) if i != at]  # (at None: nothing to take out)
        elif at is None:
            lines.append(f"{name}={value}")
        else:
            lines[at] = f"{name}={value}"
    write_file(path, "\n".join(lines) + "\n", 0o644)


def cmd_compose_file(args, peer_flags: list[str]) -> int:
    net = network_from_args(args, peer_flags)
    python = settings_python()
    if python:
        apply_settings(net, preflight(python, net, preflight_env(None)))
    elif not containers.docker_problem(docker_timeout()) and image_exists(PEER_IMAGE):
        apply_settings(net, containers.preflight_in_image(net))
    else:
        raise UpError(
            "compose-file reads the peer flags with the project's Python: make the checkout's .venv "
            "(python3 -m venv .venv && .venv/bin/pip install -r requirements.txt), set PYTHON, or build the "
            "images (./up.sh images)"
        )
    if args.login:  # --join: the run is the joined broker's
        run_settings(net, Login(abs_path(args.login)).run_id_file)
    print(compose.compose_text(net), end="")
    return 0


def cmd_images(args) -> int:
    containers.check_docker()
    ensure_images(args.base, ca_bundle(args))
    return 0


def docker_timeout() -> float:
    return float(os.environ.get("UP_DOCKER_TIMEOUT", "5"))


def ca_bundle(args) -> Path | None:
    ca = abs_path(args.ca_bundle) if args.ca_bundle else None
    if ca and not ca.is_file():
        raise UpError(f"--ca-bundle {args.ca_bundle}: no such file", 2)
    return ca


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UpError(f"{message} (./up.sh --help)", 2)


USAGE = """\
  ./up.sh [--peers N] [--run-dir DIR] [--local | --docker] [-- PEER_FLAGS...]
  ./up.sh status              [--run-dir DIR | --project NAME]
  ./up.sh kill controller     [--signal KILL|TERM|STOP|CONT] [--run-dir DIR | --project NAME]
  ./up.sh kill random | peer ID   [--signal ...]
  ./up.sh kill broker [N]     [--signal ...]   (the controller's broker, or broker-N)
  ./up.sh down                [--run-dir DIR | --project NAME]
  ./up.sh [--brokers B] [--local [--mutual-tls]] ...   (B brokers bridged into one federation)
  ./up.sh broker --publish ADDR --peers T [--tls]   (several hosts: the broker alone; peers join with --join)
  ./up.sh broker --tls --bridge-to HOST:PORT --login DIR   (another host's broker, bridged to that one over TLS)
  ./up.sh --join HOST:PORT[,HOST:PORT...] --login DIR --peers N [--first K] [--total T] [-- PEER_FLAGS...]
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
        "--brokers",
        type=int,
        default=int(os.environ.get("UP_BROKERS") or 1),
        metavar="B",
        help="B Mosquitto brokers bridged into one federation (MQTT v5 bridges, a tree: docs/PROTOCOL.md), the "
        "peers spread over them, each given every broker, its own first, to fail over to (default 1)",
    )
    p.add_argument(
        "--mutual-tls",
        action="store_true",
        help="with --local --brokers B: every client presents a certificate of the network's CA naming its login "
        "(require_certificate, use_identity_as_username), each peer its own",
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
                description="signal a peer, or a broker (broker: the controller's; broker N: broker-N): KILL (default), TERM, STOP (freeze its container or process) or CONT (thaw it); every "
                "signal is recorded in the run's chaos.csv",
            )
            p.add_argument("target", nargs="+", metavar="controller|random|peer ID|broker [N]")
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
            p.add_argument(
                "--publish",
                default=os.environ.get("UP_BROKER_PUBLISH") or None,
                help="where the broker is published (default 0.0.0.0:1883:1883; with --tls 0.0.0.0:8883:8883)",
            )
            p.add_argument(
                "--tls",
                action="store_true",
                help="the broker's listener for other machines is TLS only (8883), with a certificate of the "
                "network's own CA (.up/<project>/tls); the CA certificate goes in the login folder for the peers",
            )
            p.add_argument(
                "--tls-host",
                action="append",
                default=[],
                metavar="NAME",
                help="a host name or address peers reach the broker by, for its certificate (this machine's are in)",
            )
            p.add_argument(
                "--bridge-to",
                metavar="HOST:PORT",
                help="with --tls and --login: bridge this broker to another machine's (started there with ./up.sh "
                "broker --tls), one federation over both; its peers fail over to this one",
            )
            p.add_argument("--login", metavar="DIR", help="with --bridge-to: a copy of that machine's login folder")
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
    except KeyboardInterrupt as stop:
        print(f"{PROG}: stopped", file=sys.stderr)
        return exit_status(stop)


if __name__ == "__main__":
    sys.exit(main())
