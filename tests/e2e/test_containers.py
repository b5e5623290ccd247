"""The whole `./up.sh` story on a real Docker engine: images, broker (login, ACL, healthcheck), peer containers that
elect, train and finish; status and kill during the run; records owned by the user; Ctrl-C and `down` leaving
nothing behind; two compose projects as two hosts.

Needs a Docker engine with compose v2 (DOCKER_HOST): CI runs these under `.ci/with-docker`, which installs and
starts one. Without an engine they are skipped, which CI counts as a failure. The images are built once per session
(`./up.sh images`: local Debian base images where the official ones cannot be pulled; UP_CA_BUNDLE for a
TLS-intercepting proxy). Every test uses its own compose project and a private state folder (UP_STATE_DIR), so the
checkout is never touched.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from peer.records.events import read_events
from peer.records.run_dir import read_evaluations, read_rounds
from scripts.localnet import free_port
from scripts.up import compose as compose_labels
from scripts.up import containers, images
from scripts.up.common import read_env_file
from scripts.up.tls import outbound_address
from tests.netutil import FASHION, ROOT, assert_rounds_complete, elections, read_csv, rounds, statuses, wait_until

UP = str(ROOT / "up.sh")
# Rounds of a run that a test disturbs after its first: enough that the disturbance comes before the finish on a busy
# machine (a round of six peers on 300 samples each takes 0.7 s, and a docker command under load several seconds).
MANY_ROUNDS = 24
FAST = [
    "--dataset",
    "fashion-mnist",
    "--heartbeat",
    "0.5",
    "--election-window",
    "0.5",
    "--keepalive",
    "2",
    "--round-deadline",
    "30",
    "--target-accuracy",
    "1.0",
]

pytestmark = pytest.mark.skipif(
    containers.docker_problem(10) is not None,
    reason=f"needs a Docker engine with compose v2 ({containers.docker_problem(10)}); CI runs these under .ci/with-docker",
)


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True, timeout=60).stdout


def page_shows(address: str) -> dict:
    """What the live page at `address` shows now ({} while it is not up yet)."""
    try:
        return json.loads(urllib.request.urlopen(f"http://{address}/state", timeout=5).read())
    except OSError:
        return {}


def leftovers(project: str) -> dict[str, list[str]]:
    """What a project may leave on the engine: containers, networks, anonymous volumes (a named dataset cache may
    stay)."""
    label = f"label=com.docker.compose.project={project}"
    return {
        "containers": docker("ps", "-aq", "--filter", label).split(),
        "networks": docker("network", "ls", "-q", "--filter", label).split(),
        "volumes": [v for v in anonymous_volumes() if v not in BEFORE],
    }


def anonymous_volumes() -> list[str]:
    return [v for v in docker("volume", "ls", "-q").split() if ANONYMOUS.fullmatch(v)]


ANONYMOUS = re.compile(r"[0-9a-f]{64}")  # a volume without a name: what a base image's VOLUME leaves
NOTHING = {"containers": [], "networks": [], "volumes": []}
BEFORE: set[str] = set()  # the anonymous volumes of the engine before these tests (DOCKER_DATA_ROOT kept): not theirs


@pytest.fixture(scope="session")
def engine(tmp_path_factory):
    """The images, built once for every test here; and the volumes that existed before (another test's cache)."""
    BEFORE.update(anonymous_volumes())
    state = tmp_path_factory.mktemp("up-state")
    env = {**os.environ, "UP_STATE_DIR": str(state)}
    started = time.monotonic()
    built = subprocess.run([UP, "images"], env=env, capture_output=True, text=True, timeout=1500)
    assert built.returncode == 0, built.stdout + built.stderr
    print(f"\nimages ready in {time.monotonic() - started:.0f} s:\n{built.stdout}", file=sys.stderr)
    return state


@pytest.fixture
def env(engine, tmp_path):
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "UP_"))}
    return {
        **environ,
        "UP_STATE_DIR": str(tmp_path / "state"),
        "UP_DOCKER_TIMEOUT": "10",
        **({"UP_CA_BUNDLE": os.environ["UP_CA_BUNDLE"]} if os.environ.get("UP_CA_BUNDLE") else {}),
        **({"UP_BASE": os.environ["UP_BASE"]} if os.environ.get("UP_BASE") else {}),
    }


def upsh(env: dict, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([UP, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def start(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen([UP, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        output, _ = proc.communicate(timeout=timeout)
        return output
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=30)


def container_state(project: str, peer: str) -> str:
    found = containers.containers(**{compose_labels.LABEL_PROJECT: project, compose_labels.LABEL_PEER: peer})
    return containers.state_of(found[0]) if found else "gone"


def checkout_state() -> tuple[str, dict[str, tuple[int, int, int]]]:
    """git's view of the checkout, and the owner and mode of every file in it (runs/ and .up/ aside)."""
    status = subprocess.run(
        ["git", "status", "--porcelain", "--ignored"], cwd=ROOT, capture_output=True, text=True
    ).stdout
    owners = {}
    for path in ROOT.rglob("*"):
        rel = path.relative_to(ROOT).parts
        if rel[0] in (".git", ".venv", "runs", ".up", ".pytest_cache", ".hypothesis") or "__pycache__" in rel:
            continue
        st = path.lstat()
        owners[str(path)] = (st.st_uid, st.st_gid, st.st_mode)
    return status, owners


def test_five_peers_elect_train_survive_kills_and_finish(env, tmp_path):
    project, run_dir = "sdfl-test-main", tmp_path / "run"
    before = checkout_state()
    proc = start(
        env,
        "--peers",
        "5",
        "--run-dir",
        str(run_dir),
        "--project",
        project,
        "--",
        *FAST,
        "--train-samples",
        "1500",
        "--test-samples",
        "200",
        "--epochs",
        "2",
        "--max-rounds",
        "8",  # rounds enough that the kill, the new term, the stop and the thaw come before the finish, under load
    )
    try:
        wait_until(lambda: rounds(run_dir), 300, "round 1 to finish")
        shown = upsh(env, "status", "--project", project)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        controller = statuses(run_dir)
        first = next(p for p, s in controller.items() if s["role"] == "controller")
        assert f"controller: {first} (term 1)" in shown.stdout, shown.stdout
        for k in range(1, 6):
            assert f"peer-{k} " in shown.stdout
        assert "running" in shown.stdout and "broker: running, healthy" in shown.stdout
        # The live page's container (read-only login) sees the same controller, on a loopback port.
        [page] = containers.containers(
            **{compose_labels.LABEL_PROJECT: project, "com.docker.compose.service": compose_labels.DASHBOARD}
        )
        address = docker("port", page["Id"], str(compose_labels.DASHBOARD_PORT)).split()[0]
        assert address.startswith("127.0.0.1:"), address
        wait_until(lambda: page_shows(address).get("controller") == first, 90, "the live page to show the controller")

        killed = upsh(env, "kill", "controller", "--run-dir", str(run_dir))
        assert killed.returncode == 0, killed.stdout + killed.stderr
        assert f"sent SIGKILL to {first}" in killed.stdout
        wait_until(
            lambda: container_state(project, first).startswith("exited"), 60, "the controller's container to die"
        )
        # Its status.json still says controller: status and kill look at the containers.
        again = upsh(env, "kill", "peer", first, "--project", project)
        assert again.returncode == 1 and "nothing to act on" in again.stderr, again.stderr
        terms = wait_until(lambda: [t for t in elections(run_dir) if t["term"] != "1"], 90, "a new term")
        assert terms[0]["reason"] == "controller-lost" and terms[0]["controller"] != first
        second = terms[0]["controller"]
        shown = upsh(env, "status", "--project", project)
        assert f"controller: {second}" in shown.stdout and f"{first:<10} exited 137" in shown.stdout, shown.stdout

        trainer = next(f"peer-{k}" for k in range(1, 6) if f"peer-{k}" not in (first, second))
        stopped = upsh(env, "kill", "peer", trainer, "--signal", "STOP", "--project", project)
        assert stopped.returncode == 0, stopped.stderr
        assert container_state(project, trainer) == "paused"
        assert "paused" in upsh(env, "status", "--project", project).stdout
        thawed = upsh(env, "kill", "peer", trainer, "--signal", "cont", "--project", project)
        assert thawed.returncode == 0, thawed.stderr
        assert container_state(project, trainer) == "running"
        output = finish(proc, 400)
    finally:
        if proc.poll() is None:
            proc.kill()
        upsh(env, "down", "--project", project)
    assert proc.returncode == 0, output[-4000:]  # the peer killed on purpose is no failure of the run
    for line in (
        "broker healthy",
        "peers joined 5/5",
        "term 1: ",
        "round 1/8: accuracy",
        "finished (max-rounds)",
        f"records: {run_dir}",
        f"-m graphs {run_dir}",
        "no container or network left",
    ):
        assert line in output, (line, output)
    assert_rounds_complete(run_dir, 8)
    chaos_rows = [(r["action"], r["peer"], r["signal"]) for r in read_csv(run_dir / "chaos.csv")]
    assert chaos_rows == [("kill", first, "KILL"), ("stop", trainer, "STOP"), ("cont", trainer, "CONT")]
    assert all("." in r["time"] for r in read_csv(run_dir / "chaos.csv")), "chaos times are not whole seconds"

    # Every record is the invoking user's, and every peer's log is whole (the last line of the survivors included).
    for path in [run_dir, *run_dir.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid()), path
    for k in range(1, 6):
        log = (run_dir / "peers" / f"peer-{k}" / "peer.log").read_text()
        assert "starting: broker broker:1883" in log
        if f"peer-{k}" != first:
            # (the controller's last lines are its run summary table: 12 lines on stdout after the finish)
            assert "finish" in "".join(log.splitlines()[-15:]), log[-1500:]
    assert "New client connected" in (run_dir / "broker.log").read_text()

    drawn = subprocess.run(
        [sys.executable, "-m", "graphs", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert drawn.returncode == 0, drawn.stderr
    assert (run_dir / "graphs" / "election_timeline.png").exists()

    assert leftovers(project) == NOTHING
    assert checkout_state() == before, "a container or the launcher changed the checkout"
    # Nothing to act on once it is over, and it says so.
    late = upsh(env, "kill", "controller", "--project", project)
    assert late.returncode == 1 and "nothing to act on" in late.stderr
    assert "is not running" in upsh(env, "status", "--project", project).stdout


def test_containers_hosting_three_peers_each_lose_one_with_the_controller_and_finish(env, tmp_path):
    """`--peers-per-process 3`: six peers in two containers (python -m peer.host), each peer with its own broker login.
    Killing the controller's container kills its three peers at once; the other three elect and finish."""
    project, run_dir = "sdfl-test-hosts", tmp_path / "run"
    proc = start(
        env,
        "--peers",
        "6",
        "--peers-per-process",
        "3",
        "--run-dir",
        str(run_dir),
        "--project",
        project,
        "--",
        *FAST,
        "--train-samples",
        "300",
        "--test-samples",
        "100",
        "--max-rounds",
        str(MANY_ROUNDS),
    )
    try:
        wait_until(lambda: rounds(run_dir), 300, "round 1 to finish")
        shown = upsh(env, "status", "--project", project)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        assert f"network {project}: 2 peer containers (6 peers)" in shown.stdout, shown.stdout
        first = next(p for p, s in statuses(run_dir).items() if s["role"] == "controller")
        mates = (
            ["peer-1", "peer-2", "peer-3"]
            if first in ("peer-1", "peer-2", "peer-3")
            else ["peer-4", "peer-5", "peer-6"]
        )
        assert re.search(rf"{first} +running +controller +1 +\d+  host-{mates[0]}", shown.stdout), shown.stdout

        killed = upsh(env, "kill", "controller", "--project", project)
        assert killed.returncode == 0, killed.stdout + killed.stderr
        assert f"sent SIGKILL to {first}" in killed.stdout and "with the peers it hosts beside" in killed.stdout
        terms = wait_until(lambda: [t for t in elections(run_dir) if t["term"] != "1"], 90, "a new term")
        assert terms[0]["reason"] == "controller-lost" and terms[0]["controller"] not in mates
        shown = upsh(env, "status", "--project", project).stdout
        for peer in mates:
            assert re.search(rf"{peer} +exited 137", shown), shown
        output = finish(proc, 400)
    finally:
        if proc.poll() is None:
            proc.kill()
        upsh(env, "down", "--project", project)
    # The three peers that died with the controller were killed on purpose: no failure of the run.
    assert proc.returncode == 0, output[-4000:]
    assert (
        "6 peers started in 2 containers, up to 3 to a container (host-peer-1: peer-1..peer-3, "
        "host-peer-4: peer-4..peer-6)" in output
    ), output
    assert "finished (max-rounds)" in output and "no container or network left" in output
    assert_rounds_complete(run_dir, MANY_ROUNDS)
    # Each peer connected with its own login (the broker's client id is the login), and its log holds its own lines.
    broker_log = (run_dir / "broker.log").read_text()
    for k in range(1, 7):
        assert re.search(rf"New client connected from \S+ as peer-{k} \(.*u'peer-{k}'\)", broker_log), k
        lines = (run_dir / "peers" / f"peer-{k}" / "peer.log").read_text().splitlines()
        named = [line for line in lines if " peer=" in line]
        assert named and all(f" peer=peer-{k} " in line for line in named), lines[:5]
        assert any("starting: broker broker:1883" in line for line in named)
    assert "hosting 3 peers: peer-1,peer-2,peer-3" in (run_dir / "hosts" / "peer-1.log").read_text()
    assert leftovers(project) == NOTHING


def test_three_bridged_brokers_in_containers_lose_the_controller_s_and_the_run_finishes(env, tmp_path):
    """`--brokers 3`: broker-1..broker-3 bridged into a tree on the project's network, each bridge with its own
    login, six peers two to a container spread over them, every peer given every broker. `kill broker` takes the
    controller's: its peers move to another broker and the run finishes, every round once."""
    project, run_dir = "sdfl-test-brokers", tmp_path / "run"
    flags = [*FAST, "--train-samples", "300", "--test-samples", "100", "--max-rounds", str(MANY_ROUNDS)]
    proc = start(env, "--peers", "6", "--peers-per-process", "2", "--brokers", "3", "--run-dir", str(run_dir),
                 "--project", project, "--", *flags)  # fmt: skip
    try:
        wait_until(lambda: rounds(run_dir), 300, "round 1 to finish")
        shown = upsh(env, "status", "--project", project)
        assert shown.returncode == 0, shown.stdout + shown.stderr
        for name in ("broker-1", "broker-2", "broker-3"):
            assert re.search(rf"^{name}: running, healthy", shown.stdout, re.M), shown.stdout

        def kill_the_controller_s_broker():
            # a busy machine may not have the controller's broker in the statuses yet: the launcher says so, try again
            killed = upsh(env, "kill", "broker", "--project", project)
            return None if "no controller is connected" in killed.stderr else killed

        killed = wait_until(kill_the_controller_s_broker, 120, "the controller connected to a broker")
        killed_at = time.time()
        assert killed.returncode == 0, killed.stdout + killed.stderr
        victim = re.search(r"sent SIGKILL to (broker-\d)", killed.stdout).group(1)
        output = finish(proc, 400)
    finally:
        if proc.poll() is None:
            proc.kill()
        upsh(env, "down", "--project", project)
    assert proc.returncode == 0, output[-4000:]
    assert_rounds_complete(run_dir, MANY_ROUNDS)
    assert float(rounds(run_dir)[-1]["finished_at"]) > killed_at, "the broker was killed after the run, not in it"
    chaos = read_csv(run_dir / "chaos.csv")
    assert [(c["action"], c["peer"], c["signal"]) for c in chaos] == [("kill", victim, "KILL")]
    moved = []
    for k in range(1, 7):
        links = read_events(run_dir, f"peer-{k}", {"connected", "disconnected"})
        lost = [i for i, e in enumerate(links) if e["event"] == "disconnected" and e["broker"] == f"{victim}:1883"]
        if lost:
            moved.append(k)
            assert any(e["event"] == "connected" and e["broker"] != f"{victim}:1883" for e in links[lost[0] :])
    assert moved, "the controller's broker had the controller on it, at least"
    # The bridges logged in as themselves, each with its own login. (Only the brokers that were not killed tell:
    # mosquitto's log to a pipe is buffered, and a SIGKILL loses what was not written yet.)
    survivors = "".join(
        (run_dir / "brokers" / f"{name}.log").read_text()
        for name in ("broker-1", "broker-2", "broker-3")
        if name != victim
    )
    bridged = set(re.findall(r"New client connected from \S+ as (bridge-broker-\d) ", survivors))
    assert bridged and bridged <= {"bridge-broker-2", "bridge-broker-3"}, survivors[-3000:]
    assert leftovers(project) == NOTHING


SLOW = [*FAST, "--train-samples", "300", "--test-samples", "100", "--max-rounds", "1000"]


@pytest.mark.parametrize("how", ["ctrl-c", "down"])
def test_ctrl_c_and_down_leave_nothing_behind(env, tmp_path, how):
    project, run_dir = f"sdfl-test-{how}", tmp_path / "run"
    proc = start(env, "--peers", "3", "--run-dir", str(run_dir), "--project", project, "--", *SLOW)
    try:
        wait_until(lambda: rounds(run_dir), 240, "round 1 to finish")
        stopped_at = time.monotonic()
        if how == "ctrl-c":
            proc.send_signal(signal.SIGINT)
        else:
            down = upsh(env, "down", "--project", project, timeout=120)
            assert down.returncode == 0, down.stdout + down.stderr
        output = finish(proc, 120)
        took = time.monotonic() - stopped_at
    finally:
        if proc.poll() is None:
            proc.kill()
        subprocess.run([UP, "down", "--project", project], env=env, capture_output=True, timeout=60)
    assert proc.returncode == (130 if how == "ctrl-c" else 143), output[-3000:]
    # Each peer leaves on SIGTERM (its goodbye below), and gets DOWN_GRACE_S before a SIGKILL: a bound against a
    # hang (docker's own 10 s a container, one after another, say), wide enough for a loaded machine.
    assert took < 60, f"{how} took {took:.1f} s"
    assert leftovers(project) == NOTHING
    assert "no container or network left" in output
    # The peers' logs end with their own goodbye: they were saved after the peers stopped.
    for k in range(1, 4):
        assert "stopped by signal" in (run_dir / "peers" / f"peer-{k}" / "peer.log").read_text()


def test_two_hosts_one_publishes_the_broker_the_other_joins_by_address(env, tmp_path):
    """Host A runs the broker alone, published on the machine's addresses; host B runs peers only and joins it by
    one of them, with a copy of A's logins."""
    port = free_port()
    host_a = {**env, "UP_STATE_DIR": str(tmp_path / "host-a")}
    host_b = {**env, "UP_STATE_DIR": str(tmp_path / "host-b")}
    run_dir = tmp_path / "run-b"
    try:
        # Host A publishes its broker as a user would (every address of the machine); host B joins by one of
        # them that containers of another project reach here: the gateway of A's project network.
        broker = upsh(
            host_a,
            "broker",
            "--project",
            "sdfl-test-host-a",
            "--peers",
            "3",
            "--publish",
            f"0.0.0.0:{port}:1883",
            timeout=300,
        )
        assert broker.returncode == 0, broker.stdout + broker.stderr
        assert f"published at 0.0.0.0:{port}" in broker.stdout
        ipam = json.loads(docker("network", "inspect", "sdfl-test-host-a_default"))[0]["IPAM"]["Config"][0]
        gateway = ipam.get("Gateway") or str(next(ipaddress.ip_network(ipam["Subnet"]).hosts()))
        login = tmp_path / "copied-login"
        subprocess.run(["cp", "-r", str(tmp_path / "host-a" / "sdfl-test-host-a" / "login"), str(login)], check=True)
        peers = upsh(
            host_b,
            "--join",
            f"{gateway}:{port}",
            "--login",
            str(login),
            "--project",
            "sdfl-test-host-b",
            "--peers",
            "3",
            "--run-dir",
            str(run_dir),
            "--",
            *FAST,
            "--train-samples",
            "300",
            "--test-samples",
            "100",
            "--max-rounds",
            "2",
            timeout=400,
        )
        assert peers.returncode == 0, peers.stdout[-3000:] + peers.stderr
        assert_rounds_complete(run_dir, 2)
        assert f"starting: broker {gateway}:{port}" in (run_dir / "peers" / "peer-1" / "peer.log").read_text()
        assert leftovers("sdfl-test-host-b") == NOTHING
        # The broker outlives the peers' project until its own host takes it down.
        assert leftovers("sdfl-test-host-a")["containers"]
    finally:
        down = upsh(host_a, "down", "--project", "sdfl-test-host-a")
        upsh(host_b, "down", "--project", "sdfl-test-host-b")
    assert down.returncode == 0, down.stderr
    assert leftovers("sdfl-test-host-a") == NOTHING


def test_two_hosts_each_with_its_broker_bridged_over_tls_lose_one_and_the_recorder_has_the_run(env, tmp_path):
    """Two hosts, each with its own broker and peers (four compose projects, two a host, as a user runs them): host
    A's broker (TLS only), host B's bridged to it over TLS with a copy of A's logins. Every peer has both brokers,
    its own host's first. Mid-run host A's broker is killed: A's peers move to B's and the run finishes, every round
    once; a recorder on the wire (python -m graphs.record, B's broker first) has the whole run and it draws."""
    address = outbound_address()
    assert address, "no route out of this machine: the hosts could not reach each other"
    port_a, port_b = free_port(), free_port()
    broker_a, broker_b = f"{address}:{port_a}", f"{address}:{port_b}"
    host_a = {**env, "UP_STATE_DIR": str(tmp_path / "host-a")}
    host_b = {**env, "UP_STATE_DIR": str(tmp_path / "host-b")}
    projects = {"a": "sdfl-test-tls-a", "b": "sdfl-test-tls-b", "a-peers": "sdfl-test-tls-a-peers"}
    projects["b-peers"] = "sdfl-test-tls-b-peers"
    rounds_ = 3
    launchers: list[subprocess.Popen] = []
    recorder = None
    try:
        made = upsh(host_a, "broker", "--project", projects["a"], "--peers", "6", "--tls",
                    "--publish", f"0.0.0.0:{port_a}:8883", timeout=300)  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        copy_a = tmp_path / "login-from-a"
        shutil.copytree(tmp_path / "host-a" / projects["a"] / "login", copy_a)
        made = upsh(host_b, "broker", "--project", projects["b"], "--peers", "6", "--tls", "--publish",
                    f"0.0.0.0:{port_b}:8883", "--bridge-to", broker_a, "--login", str(copy_a), timeout=300)  # fmt: skip
        assert made.returncode == 0, made.stdout + made.stderr
        assert f"bridged to {broker_a} over TLS" in made.stdout
        # B's login folder (A's logins, A's run, both CAs): what the peers of both hosts get a copy of.
        login = tmp_path / "login"
        shutil.copytree(tmp_path / "host-b" / projects["b"] / "login", login)
        assert (login / "ca.pem").read_text().count("BEGIN CERTIFICATE") == 2
        run_id = (login / "run-id").read_text().strip()
        assert run_id == (copy_a / "run-id").read_text().strip(), "B's broker takes part in A's run"

        recorded = tmp_path / "recorded"
        observer = read_env_file(login / "observer.login")
        recorder = subprocess.Popen(
            [sys.executable, "-m", "graphs.record", "--broker", f"{broker_b},{broker_a}", "--every-broker",
             "--run-id", run_id, "--run-dir", str(recorded), "--secret-file", str(login / "federation.secret"),
             "--tls-ca", str(login / "ca.pem"), "--timeout", "600"],
            cwd=ROOT, env={**env, "FL_USERNAME": observer["FL_USERNAME"], "FL_PASSWORD": observer["FL_PASSWORD"]},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        run_dirs = {"a": tmp_path / "run-a", "b": tmp_path / "run-b"}
        flags = ["--", *FAST, "--train-samples", "300", "--test-samples", "100", "--max-rounds", str(rounds_)]
        for host, environ, first, brokers in (("a", host_a, "1", f"{broker_a},{broker_b}"),
                                              ("b", host_b, "4", f"{broker_b},{broker_a}")):  # fmt: skip
            launchers.append(
                start(environ, "--join", brokers, "--login", str(login), "--project", projects[f"{host}-peers"],
                      "--peers", "3", "--first", first, "--total", "6", "--run-dir", str(run_dirs[host]), *flags)
            )  # fmt: skip
        wait_until(lambda: (recorded / "rounds.csv").is_file(), 400, "round 1 on the recorder's wire")
        killed = upsh(host_a, "kill", "broker", "--project", projects["a"])
        assert killed.returncode == 0 and "sent SIGKILL to broker" in killed.stdout, killed.stdout + killed.stderr
        outputs = [finish(launcher, 500) for launcher in launchers]
        assert [launcher.returncode for launcher in launchers] == [0, 0], outputs
        said, _ = recorder.communicate(timeout=120)  # it stops at the run's finish
        assert recorder.returncode == 0, said
    finally:
        for launcher in launchers:
            if launcher.poll() is None:
                launcher.send_signal(signal.SIGINT)
                launcher.communicate(timeout=60)
        if recorder is not None and recorder.poll() is None:
            recorder.kill()
            recorder.communicate()
        downs = [upsh(host, "down", "--project", projects[name], timeout=120)
                 for name, host in (("a-peers", host_a), ("b-peers", host_b), ("a", host_a), ("b", host_b))]  # fmt: skip
    assert all(down.returncode == 0 for down in downs), [d.stderr for d in downs]
    assert all(leftovers(project) == NOTHING for project in projects.values())
    # Host A's peers lost their broker and went on through B's.
    for k in (1, 2, 3):
        links = read_events(run_dirs["a"], f"peer-{k}", {"connected", "disconnected"})
        lost = next(i for i, e in enumerate(links) if e["event"] == "disconnected" and e["broker"] == broker_a)
        assert any(e["event"] == "connected" and e["broker"] == broker_b for e in links[lost:]), links
    # One run, one set of records: the recorder's has every round once, and every peer's evaluations as it wrote them.
    assert [r.round for r in read_rounds(recorded)] == list(range(1, rounds_ + 1))
    for host, ks in (("a", (1, 2, 3)), ("b", (4, 5, 6))):
        for k in ks:
            own = [(e.round, e.term, e.accuracy) for e in read_evaluations(run_dirs[host], f"peer-{k}")]
            assert [(e.round, e.term, e.accuracy) for e in read_evaluations(recorded, f"peer-{k}")] == own
    drawn = subprocess.run([sys.executable, "-m", "graphs", str(recorded)], cwd=ROOT, capture_output=True, text=True)
    assert drawn.returncode == 0 and list((recorded / "graphs").glob("*.png")), drawn.stdout + drawn.stderr


def test_a_failed_build_leaves_nothing_behind(engine, tmp_path):
    """The classic builder keeps the container of the step that failed, stopped, unless told otherwise: a user
    whose build failed behind a proxy found one after every try."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {images.BROKER_IMAGE}\nRUN echo a step that fails && false\n")
    before = docker("ps", "-aq", "--no-trunc").split()
    log = tmp_path / "build.log"
    code = images.build_image("sdfl-test/failing:latest", context / "Dockerfile", {}, context, log)
    assert code != 0 and "a step that fails" in log.read_text(), log.read_text()
    assert docker("ps", "-aq", "--no-trunc").split() == before, "the failed step's container is still there"


def test_the_repository_s_docker_compose_yml_runs_with_plain_compose(engine, tmp_path):
    """A user who knows compose, in (a copy of) the checkout: the one-liner the file names, then `docker compose up`,
    `logs` and `down`, with a docker-compose.override.yml of their own (compose reads it beside the file) for a
    short run on the machine's Fashion-MNIST (no internet for mnist here)."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("docker-compose.yml", "up.sh", "scripts", "peer", "broker", "graphs", "requirements.txt"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, copy / name)
    settings = {
        "FL_DATASET": "fashion-mnist",
        "FL_TRAIN_SAMPLES": "300",
        "FL_TEST_SAMPLES": "100",
        "FL_MAX_ROUNDS": "2",
        "FL_HEARTBEAT": "0.5",
        "FL_ELECTION_WINDOW": "0.5",
        "FL_TARGET_ACCURACY": "1.0",
    }
    fashion = {"type": "bind", "source": str(FASHION), "target": str(FASHION), "read_only": True}
    override = {f"peer-{k}": {"environment": settings, "volumes": [fashion]} for k in range(1, 6)}
    (copy / "docker-compose.override.yml").write_text(json.dumps({"services": override}))
    user = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "UP_", "SDFL_", "COMPOSE_"))}
    plain = {**user, "COMPOSE_PROJECT_NAME": "sdfl-test-plain"}

    def compose(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["docker", "compose", *args], cwd=copy, env=plain, capture_output=True, text=True, timeout=timeout
        )

    forgot = compose("config")
    assert forgot.returncode != 0 and "run ./up.sh credentials first" in forgot.stderr, forgot.stderr
    made = subprocess.run([str(copy / "up.sh"), "credentials"], cwd=copy, env=user, capture_output=True, text=True)
    assert made.returncode == 0, made.stderr
    run_dir = copy / "runs" / "compose"
    try:
        up = compose("up", "-d", timeout=300)
        assert up.returncode == 0, up.stdout + up.stderr
        peers = [f"peer-{k}" for k in range(1, 6)]

        def states() -> dict[str, str]:
            found = containers.containers(**{compose_labels.LABEL_PROJECT: "sdfl-test-plain"})
            return {containers.service_of(c): containers.state_of(c) for c in found}

        wait_until(lambda: all(states().get(p, "").startswith("exited") for p in peers), 400, "the peers to finish")
        assert {states()[p] for p in peers} == {"exited 0"}, states()
        assert states()["broker"] == "running" and states()[compose_labels.DASHBOARD] == "running"
        logs = compose("logs", "peer-3")
        assert logs.returncode == 0 and "starting: broker broker:1883" in logs.stdout, logs.stdout[-2000:]
    finally:
        down = compose("down", timeout=120)
    assert down.returncode == 0, down.stderr
    assert_rounds_complete(run_dir, 2)
    for path in [run_dir, *run_dir.rglob("*")]:
        assert (path.stat().st_uid, path.stat().st_gid) == (os.getuid(), os.getgid()), path
    assert leftovers("sdfl-test-plain") == NOTHING
