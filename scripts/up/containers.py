"""The network in containers: the docker engine's state of a project's containers, starting the broker and the peers
(docker compose), following them to the finish, `status` and `kill` on them, and taking everything down (peers
first, their whole logs kept in the run dir)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

from peer.node.signals import StopSignals, exit_status
from peer.records.run_dir import BROKER_LOG_FILE, broker_log, host_log, peer_log, write_brokers
from peer.wire.ids import new_run_id
from scripts import chaos
from scripts.certs import CertError
from scripts.localnet import split_host_log
from scripts.up import bridges
from scripts.up.common import ROOT, UpError, private_dir, run, say, state_dir, write_file
from scripts.up.compose import (
    DASHBOARD,
    DASHBOARD_PORT,
    DOWN_GRACE_S,
    LABEL_PEER,
    LABEL_PROJECT,
    LABEL_RUN_DIR,
    Compose,
    container_cpus,
)
from scripts.up.images import PEER_IMAGE, ensure_images
from scripts.up.logins import CA_FILE, Login, login_for, make_credentials
from scripts.up.network import Network, launcher_alive, preflight, remember
from scripts.up.progress import Progress, report_end, spans, verdict
from scripts.up.tls import TLS_PORT, broker_hosts, make_broker_tls
from scripts.up.tls import folder as tls_folder

SIGNALS = {"KILL": "kill", "TERM": "kill", "STOP": "stop", "CONT": "cont"}  # signal -> chaos.csv action


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


def check_docker() -> None:
    problem = docker_problem(float(os.environ.get("UP_DOCKER_TIMEOUT", "5")))
    if problem:
        raise UpError(f"no Docker engine reachable ({problem})")


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


def peer_containers(project: str) -> dict[str, dict]:
    """Each peer of the project, and the container it runs in (peers hosted together share one)."""
    return {
        peer: c
        for c in containers(**{LABEL_PROJECT: project})
        if LABEL_PEER in c["Config"]["Labels"]
        for peer in c["Config"]["Labels"][LABEL_PEER].split(",")
    }


def is_broker(container: dict) -> bool:
    """A broker of the network: `broker`, or broker-K of several."""
    service = service_of(container)
    return service == "broker" or (service.startswith("broker-") and service[7:].isdigit())


def hosted_with(container: dict) -> list[str]:
    """The peers a container runs (one, a host's several, or none: the broker, the live page)."""
    return [peer for peer in container["Config"]["Labels"].get(LABEL_PEER, "").split(",") if peer]


def save_logs(net: Network, found: list[dict]) -> None:
    """Each container's whole log, where a local run keeps it (peers/<id>/peer.log, broker.log; a host's in
    hosts/<first peer>.log and split by peer into theirs), after what an earlier run in the same run dir left (a
    --resume): written by the launcher, so they belong to the same user as every other record."""
    for container in found:
        service = service_of(container)
        hosted = hosted_with(container)
        if len(hosted) > 1:
            path = host_log(net.run_dir, hosted[0])
        elif hosted:
            path = peer_log(net.run_dir, hosted[0])
        elif service == "broker":
            path = net.run_dir / BROKER_LOG_FILE
        elif is_broker(container):
            path = broker_log(net.run_dir, service)
        else:
            continue  # the live page: it only watches, as a local one (whose output is not kept either)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as out:
            subprocess.run(
                ["docker", "logs", container["Id"]], stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        if len(hosted) > 1:
            split_host_log(path, hosted, net.run_dir)


def take_down(project: str, compose: Compose | None, net: Network | None = None) -> float:
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
    if compose and compose.file.exists():
        run(compose.command("down", "--remove-orphans", "-t", "1"), check=False, env=compose.env())
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


def start_broker(net: Network, compose: Compose) -> str:
    """Start the network's brokers (one, or B bridged into a tree) and wait until each one's healthcheck logs in;
    returns where the first is published on the host. brokers.json in the run dir names them (status, kill)."""
    started = time.monotonic()
    names = bridges.services(net)
    if bridges.bridged(net):
        bridges.write_confs(net, Login(net.state / "login"))
    run(
        compose.command("up", "-d", "--no-build", "--force-recreate", "--remove-orphans", *names),
        timeout=120,
        env=compose.env(),
    )
    deadline = started + 90
    waiting = list(names)
    while waiting:
        found = containers(**{LABEL_PROJECT: net.project, "com.docker.compose.service": waiting[0]})
        state = found[0]["State"] if found else {}
        health = state.get("Health", {}).get("Status")
        if health == "healthy":
            waiting.pop(0)
            continue
        if not state.get("Running") or health == "unhealthy" or time.monotonic() > deadline:
            logs = run(["docker", "logs", "--tail", "15", found[0]["Id"]], check=False) if found else None
            tail = "".join(f"\n  | {line}" for line in ((logs.stdout + logs.stderr) if logs else "").splitlines())
            raise UpError(
                f"the broker {waiting[0]} did not become healthy (state {state.get('Status')}, health {health});"
                f" its last words:{tail}"
            )
        time.sleep(0.3)
    inside = str(TLS_PORT) if net.tls else "1883"
    port = run(compose.command("port", names[0], inside), check=False, env=compose.env()).stdout.strip()
    port = port or net.publish
    if net.brokers > 1:
        write_brokers(
            net.run_dir,
            [
                {"name": name, "address": f"{name}:{bridges.PORT}", "pid": None, "uplink": parents}
                for name, parents in zip(names, bridges.uplinks(net), strict=True)
            ],
        )
    brokers = f"{len(names)} brokers" if len(names) > 1 else "broker"
    say(
        f"{brokers} healthy in {time.monotonic() - started:.1f} s (published at {port}; "
        f"{len(Login(net.state / 'login').peers())} peer logins)"
    )
    return port


def check_not_running(project: str) -> None:
    busy = [c for c in containers(**{LABEL_PROJECT: project}) if c["State"].get("Running")]
    if busy:
        raise UpError(
            f"network {project} is already running ({len(busy)} containers): `./up.sh status`, "
            f"`./up.sh down`, or start another with --project NAME"
        )


def preflight_in_image(net: Network) -> dict:
    """`network.preflight` in the peer image, for a host without the project's Python packages (the launcher runs
    on a bare python3): scripts/preflight.py mounted, the shell's FL_* variables passed, no network."""
    script = ROOT / "scripts" / "preflight.py"
    env = [f"--env={k}" for k in os.environ if k.startswith("FL_") and k != "FL_DATA_DIR"]
    python = [
        "docker", "run", "--rm", "--network", "none", "--entrypoint", "python",
        "--volume", f"{script}:/app/preflight.py:ro", *env, PEER_IMAGE, "/app/preflight.py",
    ]  # fmt: skip
    return preflight(python, net, dict(os.environ))


def compose_for(net: Network, login: Login) -> Compose:
    """The network's compose file (the one `./up.sh compose-file` prints) and this launcher's values for it."""
    compose = Compose(net.project, net.state)
    compose.write(
        net,
        {
            "SDFL_UID": str(os.getuid()),
            "SDFL_GID": str(os.getgid()),
            "SDFL_LOGIN_DIR": str(login.folder),
            "SDFL_RUN_DIR": str(net.run_dir),
            "SDFL_RUN_ID": net.run_id,
            "SDFL_CONTAINER_CPUS": container_cpus(len(net.containers())),
        },
    )
    return compose


def run_containers(net: Network, login: Login) -> int:
    """Start the network (its images built and its settings checked), follow it to the finish, take it down."""
    net.run_dir.mkdir(parents=True, exist_ok=True)
    compose = compose_for(net, login)
    remember(mode="docker", project=net.project, run_dir=str(net.run_dir), pid=os.getpid(), peers=net.peers)
    progress = Progress(net, time.time())
    interrupted: KeyboardInterrupt | None = None
    # Ctrl-C, SIGTERM (./up.sh down) and SIGHUP stop the network (Ctrl-C even if the launcher was started with it
    # ignored, as a background job is); during the clean-up they are ignored: a second Ctrl-C cannot leave
    # anything behind.
    with StopSignals(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        try:
            take_down(net.project, compose)  # an earlier run's exited containers, if any
            if not net.join:
                start_broker(net, compose)
            groups = net.containers()
            services = [*groups, *([] if net.join else [DASHBOARD])]
            run(
                compose.command("up", "-d", "--no-build", "--force-recreate", "--no-deps", *services),
                timeout=120,
                env=compose.env(),
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
                page = run(compose.command("port", DASHBOARD, str(DASHBOARD_PORT)), check=False, env=compose.env())
                page = page.stdout.strip()
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
        except KeyboardInterrupt as stop:
            interrupted = stop
            signals.shield()
            say("stopping the network (Ctrl-C again is ignored until it is down)")
            codes = {}
        except UpError:
            signals.shield()
            took = take_down(net.project, compose, net)
            say(f"network {net.project} taken down in {took:.1f} s")
            raise
        signals.shield()
        took = take_down(net.project, compose, net)
        progress.update()
        say(f"network {net.project} taken down in {took:.1f} s: no container or network left")
    failed = verdict(codes, net.killed_on_purpose()) if not interrupted else {}
    report_end(net.run_dir, failed, interrupted is not None)
    if interrupted:
        return exit_status(interrupted)
    return 1 if failed else 0


def broker_alone(
    net: Network,
    base: str,
    ca_bundle: Path | None,
    tls_hosts: list[str] | None = None,
    copied_login: Path | None = None,
) -> tuple[Login, str]:
    """Only the broker of `net`, started and left running for peers on other machines (`./up.sh down` takes it
    away); its login folder (with the id of its run, and with `net.tls` the CA certificate) and where it is
    published. With `net.bridge_to`, the broker bridges to another machine's, whose login folder `copied_login`
    is: the same logins and run, and a CA file that trusts both brokers."""
    ensure_images(base, ca_bundle)
    login = bridged_login(net, copied_login) if copied_login else login_for(net, None)
    if net.tls:
        upstream = (login.folder / CA_FILE).read_bytes() if net.bridge_to else b""
        try:
            make_broker_tls(net, login.folder, broker_hosts(net.publish, tls_hosts or []))
        except CertError as err:
            raise UpError(str(err)) from None
        if upstream:  # the bridge checks the other broker against its CA; the peers trust both
            write_file(tls_folder(net) / bridges.UPSTREAM_CA, upstream.decode(), 0o644)
            write_file(login.folder / CA_FILE, (login.folder / CA_FILE).read_text() + upstream.decode(), 0o644)
    compose = compose_for(net, login)
    try:
        address = start_broker(net, compose)
    except UpError:
        take_down(net.project, compose)
        raise
    remember(mode="broker", project=net.project, run_dir=None, pid=None, peers=[])
    if not net.bridge_to:  # a bridged broker's run is the one it bridges to
        write_file(login.run_id_file, new_run_id(time.time()) + "\n")
    return login, address


def bridged_login(net: Network, copied: Path) -> Login:
    """The network's login folder made from a copy of another machine's: every file of it (the same logins, ACL,
    secret and run), checked to be one."""
    source = Login(copied)
    if not (source.passwd.is_file() and source.secret.is_file() and (copied / CA_FILE).is_file()):
        raise UpError(
            f"--login {copied}: not a copy of a TLS broker's login folder (passwd, {source.secret.name} and "
            f"{CA_FILE} expected: ./up.sh broker --tls makes them)",
            2,
        )
    own = private_dir(net.state / "login")
    for path in copied.iterdir():
        if path.is_file():
            shutil.copyfile(path, own / path.name)
            (own / path.name).chmod(path.stat().st_mode & 0o644)
    return make_credentials(own, [], net.topic_prefix)


def project_of(run_dir: str) -> str | None:
    """The compose project whose containers write to `run_dir` (they carry it as a label), if any is here."""
    found = [] if docker_problem(5) else containers(**{LABEL_RUN_DIR: run_dir})
    return found[0]["Config"]["Labels"][LABEL_PROJECT] if found else None


def status(project: str, run_dir: Path | None) -> str | None:
    """The network as its containers and its peers' status files show it: broker, controller, each peer's role
    (None: the project has no container)."""
    found = containers(**{LABEL_PROJECT: project})
    if not found:
        return None
    if run_dir is None:
        labels = [c["Config"]["Labels"].get(LABEL_RUN_DIR) for c in found if LABEL_PEER in c["Config"]["Labels"]]
        run_dir = Path(labels[0]) if labels and labels[0] else None
    peers = peer_containers(project)
    hosts = {c["Id"] for c in found if len(hosted_with(c)) > 1}
    brokers = sorted((c for c in found if is_broker(c)), key=lambda c: (len(service_of(c)), service_of(c)))
    lines = [
        f"network {project}: {len({c['Id'] for c in peers.values()})} peer containers"
        + (f" ({len(peers)} peers)" if hosts else "")
        + (f", records in {run_dir}" if run_dir else "")
    ]
    on: dict[str, list[str]] = {}  # broker service -> the running peers connected to it
    for peer, c in peers.items():
        address = chaos.connected_to(run_dir, peer) if run_dir and state_of(c) == "running" else None
        if address:
            on.setdefault(address.rsplit(":", 1)[0], []).append(peer)
    for b in brokers:
        health = b["State"].get("Health", {}).get("Status", "no healthcheck")
        ports = [
            p for port in ("1883/tcp", f"{TLS_PORT}/tcp") for p in b["NetworkSettings"].get("Ports", {}).get(port) or []
        ]
        where = ", ".join(f"{p['HostIp']}:{p['HostPort']}" for p in ports)
        connected = sorted(on.get(service_of(b), []), key=lambda p: (len(p), p))
        lines.append(
            f"{service_of(b)}: {state_of(b)}, {health}"
            + (f", published at {where}" if where else "")
            + (f", peers: {', '.join(connected)}" if len(brokers) > 1 else "")
        )
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
    return "\n".join(lines)


def signal_container(cid: str, sig: str) -> float:
    """docker kill the container, or pause/unpause it for STOP/CONT (the cgroup freezer, as SIGSTOP/SIGCONT would
    its process); returns when the signal went (chaos.csv has that, not when docker came back: failover counts
    from it)."""
    sent = time.time()
    if sig == "STOP":
        run(["docker", "pause", cid])
    elif sig == "CONT":
        run(["docker", "unpause", cid])
    else:
        run(["docker", "kill", "-s", f"SIG{sig}", cid])
    return sent


def kill_broker(project: str, run_dir: Path | None, target: str | None, sig: str) -> str:
    """Signal a broker of the project (None: its only one, or of several the one the controller is connected to;
    else broker-N, N, or `broker`) as `kill` does a peer; recorded in chaos.csv (by the broker's name), if the run dir is known."""
    found = {service_of(c): c for c in containers(**{LABEL_PROJECT: project}) if is_broker(c)}
    if not found:
        raise UpError(f"nothing to act on: network {project} has no broker container")
    peers = peer_containers(project)
    if run_dir is None and peers:
        run_dir = Path(next(iter(peers.values()))["Config"]["Labels"][LABEL_RUN_DIR])
    if target is None and len(found) == 1:  # the network's one broker: the controller's, whoever it is
        name = next(iter(found))
    elif target is None:
        statuses = chaos.read_statuses(run_dir) if run_dir else {}
        live = {p: s for p, s in statuses.items() if p in peers and s.get("role") != "finished"}
        controller = chaos.current_controller(live)
        address = chaos.connected_to(run_dir, controller) if run_dir and controller else None
        if address is None:
            raise UpError("nothing to act on: no controller is connected to a broker of this network right now")
        name = address.rsplit(":", 1)[0]
        if name not in found:
            raise UpError(f"nothing to act on: the controller {controller} is connected to {address}, not here")
    else:
        name = chaos.broker_name(target)
        if name not in found and list(found) == ["broker"] and name in ("broker-1", "1"):
            name = "broker"
        if name not in found:
            raise UpError(f"no broker {target!r} in network {project}; its brokers: {', '.join(sorted(found))}")
    sent = signal_container(found[name]["Id"], sig)
    if run_dir is not None:
        chaos.record(run_dir, SIGNALS[sig], name, sig, at=sent)
    return f"sent SIG{sig} to {name} of network {project}" + ("" if run_dir else " (no run dir here: not recorded)")


def kill(project: str, run_dir: Path | None, target: str, sig: str) -> str:
    """Signal the peer `target` (controller, random or an id) of the project: docker kill, or pause/unpause for
    STOP/CONT (the cgroup freezer, as SIGSTOP/SIGCONT would the process); recorded in chaos.csv. What was done."""
    peers = peer_containers(project)
    if not peers:
        raise UpError(f"nothing to act on: network {project} has no peer container (not running)")
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
            raise UpError(f"no peer {peer!r} in network {project}; its peers: {', '.join(sorted(peers))}")
        if peer not in candidates:
            raise UpError(f"nothing to act on: {peer} is {states[peer]}, and {sig} needs it {' or '.join(able)}")
    sent = signal_container(peers[peer]["Id"], sig)
    chaos.record(run_dir, SIGNALS[sig], peer, sig, at=sent)
    role = statuses.get(peer, {})
    what = f" (controller of term {role.get('term')})" if target == "controller" else ""
    mates = [p for p in hosted_with(peers[peer]) if p != peer]
    also = f", with the peers it hosts beside {peer}: {spans(mates)}" if mates else ""
    return f"sent SIG{sig} to {peer}{what}: container {peers[peer]['Name'].lstrip('/')}{also}"


def down(project: str, launcher_pid: int | None) -> str:
    """Take the project down: through the launcher following it if it still runs (it keeps the peers' whole logs),
    else here. What was done."""
    started = time.monotonic()
    if launcher_alive(launcher_pid) and launcher_pid != os.getpid():
        assert launcher_pid is not None
        os.kill(launcher_pid, signal.SIGTERM)
        while launcher_alive(launcher_pid) and time.monotonic() - started < 20:
            time.sleep(0.2)
    if not containers(**{LABEL_PROJECT: project}) and not launcher_alive(launcher_pid):
        took = time.monotonic() - started
        return f"network {project} is down" + (f" ({took:.1f} s)" if took > 0.5 else ": nothing was running")
    take_down(project, Compose(project, state_dir() / project))
    return f"network {project} taken down in {time.monotonic() - started:.1f} s: no container or network left"
