"""The launcher (`./up.sh`, `python -m scripts.up`) without a Docker engine: usage and errors, the choice between
containers and local processes, the compose file it generates, the logins, the images' files, and the local path
end to end with a real broker and real peers. The container path on a real engine is tests/test_containers.py.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from scripts import chaos, up
from tests.netutil import ROOT, SMALL, assert_rounds_complete, elections, rounds, statuses, wait_until

UP = str(ROOT / "up.sh")


def clean_env(tmp_path: Path, **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_", "UP_"))}
    return {**env, "UP_STATE_DIR": str(tmp_path / "state"), **extra}


def upsh(tmp_path: Path, *args: str, timeout: float = 60, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [UP, *args], cwd=ROOT, env=clean_env(tmp_path, **env), capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture
def no_docker(tmp_path):
    """A PATH whose `docker` answers like a machine without an engine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "docker"
    fake.write_text("#!/bin/sh\necho 'Cannot connect to the Docker daemon' >&2\nexit 1\n")
    fake.chmod(0o755)
    return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


# ------------------------------------------------------------------------------------------------ usage


def test_up_sh_is_a_short_shim():
    text = Path(UP).read_text()
    assert os.access(UP, os.X_OK) and text.startswith("#!/bin/sh\n")
    assert len(text.splitlines()) < 15 and "scripts.up" in text


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="needs shellcheck (apt-get install shellcheck)")
def test_shellcheck_passes_on_the_shell_scripts():
    scripts = [UP, str(ROOT / ".ci" / "run"), str(ROOT / ".ci" / "with-docker")]
    result = subprocess.run(["shellcheck", *scripts], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_help_explains_itself(tmp_path):
    result = upsh(tmp_path, "--help")
    assert result.returncode == 0
    for words in (
        "--peers",
        "--run-dir",
        "--local",
        "status",
        "kill controller",
        "kill random | peer ID",
        "down",
        "broker --publish",
        "--join HOST:PORT",
        "--base",
        "--ca-bundle",
        "--data-dir",
        "Docker",
        "local processes",
        "FL_",
        "docs/RECORDS.md",
    ):
        assert words in result.stdout, words


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["--peers", "x"], "argument --peers: invalid int value: 'x'"),
        (["--peers", "1"], "--peers needs at least 2 peers in the federation, not 1"),
        (["--first", "0"], "--first counts from 1, not 0"),
        (["--peers-per-process", "0"], "--peers-per-process must be at least 1, not 0"),
        (["--peers", "4", "--peers-per-process", "2", "--resume", "x"], "--resume needs one peer per process"),
        (["--peers", "3", "--first", "3", "--total", "4"], "peers 3..5 do not fit in --total 4"),
        (["--project", "Bad Name"], "--project 'Bad Name': use lowercase letters"),
        (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder: no such folder"),
        (["--", "--bogus"], "peer flags: unrecognized arguments: --bogus"),
        (["--", "--max-rounds", "0"], "peer flags: --max-rounds: must be at least 1, got 0"),
        (["--", "--peer-id", "x"], "--peer-id is set by up.sh for each peer"),
        (
            ["--", "--run-dir", "x"],
            "--run-dir is set by up.sh for each peer: leave it out of the peer flags (--run-dir goes",
        ),
        (["kill"], "the following arguments are required"),
        (["kill", "a", "b"], "kill takes one target: controller, random or peer ID"),
        (["kill", "controller", "--signal", "HUP"], "--signal must be KILL, TERM, STOP or CONT, not 'HUP'"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
        (["status", "--", "x"], "status takes no peer flags"),
        (["frobnicate"], "unknown command 'frobnicate'"),
    ],
)
def test_wrong_arguments_fail_clearly(tmp_path, args, message):
    result = upsh(tmp_path, *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"up.sh: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "state").exists(), "nothing may be written on a usage error"


def test_control_commands_without_a_network_say_what_to_do(tmp_path):
    for args in (["status"], ["kill", "controller"], ["down"]):
        result = upsh(tmp_path, *args)
        assert result.returncode == 1 and "no network to act on" in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------------ choosing the path


def test_without_docker_engine_says_so_once_and_runs_local(tmp_path, no_docker):
    # The local path stops at its first check here: an interpreter without the project's packages.
    result = upsh(tmp_path, "--peers", "3", "--run-dir", str(tmp_path / "out"), PATH=no_docker, PYTHON="/bin/false")
    lines = result.stdout.splitlines()
    assert (
        lines.count(
            "up.sh: no Docker engine reachable (docker info failed: Cannot connect to the Docker "
            "daemon); running the same network as local processes (./up.sh --local)"
        )
        == 1
    ), result.stdout
    assert result.returncode == 1
    assert "/bin/false cannot import the project's packages" in result.stderr
    assert "pip install -r requirements.txt" in result.stderr


def test_docker_flag_refuses_to_fall_back(tmp_path, no_docker):
    result = upsh(tmp_path, "--docker", PATH=no_docker)
    assert result.returncode == 1
    assert "up.sh: error: no Docker engine reachable" in result.stderr and "local" not in result.stdout


def test_local_without_mosquitto_prints_the_install_command(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(up, "find_mosquitto", lambda: None)
    monkeypatch.setattr(up, "STATE", tmp_path / "state")
    assert up.main(["--local", "--peers", "2", "--run-dir", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    assert "the local network needs the mosquitto broker: " in err
    assert re.search(
        r": (sudo )?(apt-get install -y|dnf install -y|brew install|pacman -S|apk add|zypper install) "
        r"mosquitto$",
        err.strip(),
    ), err
    assert not (tmp_path / "r").exists()


def test_install_command_follows_the_distribution(monkeypatch):
    assert up.install_command("mosquitto").endswith(" mosquitto")
    monkeypatch.setattr(up.platform, "system", lambda: "Darwin")
    assert up.install_command("mosquitto") == "brew install mosquitto"


def test_local_without_venv_creates_it(tmp_path):
    """In a copy of the checkout without .venv (and a requirements.txt with nothing to install, to stay quick):
    `./up.sh --local` says it creates .venv, creates it, and then says what is still missing."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("up.sh", "scripts", "peer"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, copy / name)
    (copy / "requirements.txt").write_text("# nothing: the test only needs the venv made\n")
    env = clean_env(tmp_path)
    env.pop("PYTHON", None)
    result = subprocess.run(
        [str(copy / "up.sh"), "--local", "--peers", "2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert f"up.sh: no .venv in {copy}: creating it and installing requirements.txt" in result.stdout
    assert (copy / ".venv" / "bin" / "python").exists()
    assert result.returncode == 1 and "cannot import the project's packages" in result.stderr, result.stderr


FAILING_BUILD = r"""#!/bin/sh
# Stand-in for an engine where the official images are present and the peer image's build fails behind a proxy.
case "$1" in
info) echo 20.10 ;;
compose) exit 0 ;;
image) [ "$3" = python:3.11-slim ] || [ "$3" = eclipse-mosquitto:2 ] || exit 1 ;;
ps) ;;
build) printf 'Step 5/12 : RUN pip install\n...\nERROR: Could not fetch: [SSL: CERTIFICATE_VERIFY_FAILED]\n'; exit 1 ;;
*) exit 1 ;;
esac
"""


def test_a_failed_build_says_what_failed_and_how_to_fix_it(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker").write_text(FAILING_BUILD)
    (bin_dir / "docker").chmod(0o755)
    result = upsh(
        tmp_path, "--peers", "2", "--run-dir", str(tmp_path / "run"), PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}"
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "up.sh: images: building sd-fl-peer:latest on python:3.11-slim" in result.stdout
    err = result.stderr
    assert "up.sh: error: building sd-fl-peer:latest (peer/Dockerfile) failed (status 1); its last lines:" in err
    assert "  | ERROR: Could not fetch: [SSL: CERTIFICATE_VERIFY_FAILED]" in err
    assert "--ca-bundle FILE (or UP_CA_BUNDLE=FILE)" in err and "full log: " in err
    assert "records:" not in result.stdout and "Traceback" not in err


# ------------------------------------------------------------------------------------------------ compose file


def network(tmp_path: Path, **kw) -> up.Network:
    defaults = dict(
        project="t",
        run_dir=tmp_path / "run $HOME",
        peers=["peer-1", "peer-2", "peer-3"],
        total=3,
        peer_flags=["--max-rounds", "2", "--dataset", "fashion-mnist", "--seed", "$7"],
        env={"FL_EPOCHS": "2"},
    )
    return up.Network(**{**defaults, **kw})


def test_compose_file_is_data_for_n_peers(tmp_path):
    net = network(tmp_path)
    login = up.make_credentials(tmp_path / "login", net.peers)
    compose = up.compose_config(net, login, 1234, 5678)
    text = json.dumps(compose)
    assert yaml.safe_load(text) == compose, "JSON is valid YAML: compose reads it as is"
    assert compose["name"] == "t"
    assert sorted(compose["services"]) == ["broker", "dashboard", "peer-1", "peer-2", "peer-3"]
    for k in range(1, 4):
        peer = compose["services"][f"peer-{k}"]
        env = peer["environment"]
        assert env["FL_PEER_ID"] == f"peer-{k}" and env["FL_SHARD"] == f"{k - 1}/3" and env["FL_MIN_PEERS"] == "3"
        assert env["FL_BROKER"] == "broker:1883" and env["FL_RUN_DIR"] == "/run-dir" and env["FL_EPOCHS"] == "2"
        assert peer["env_file"] == [str(login.env_file(f"peer-{k}"))]
        assert peer["user"] == "1234:5678" and peer["init"] is True and peer["image"] == up.PEER_IMAGE
        assert peer["depends_on"] == {"broker": {"condition": "service_healthy"}}
        # Compose interpolates $: the literal dollars of a flag and of a path survive doubled.
        assert peer["command"] == ["--max-rounds", "2", "--dataset", "fashion-mnist", "--seed", "$$7"]
        mounts = {m["target"]: m for m in peer["volumes"]}
        assert mounts["/run-dir"]["source"] == str(net.run_dir).replace("$", "$$")
        assert not mounts["/run-dir"].get("read_only")
        assert mounts["/run/secrets/federation"]["read_only"] and mounts["/data/keras"]["type"] == "volume"
        assert peer["labels"][up.LABEL_PEER] == f"peer-{k}"
    broker = compose["services"]["broker"]
    # The login is mounted read-only, away from /mosquitto (whose entrypoint re-owns what it finds there).
    assert {(m["target"], m["read_only"]) for m in broker["volumes"]} == {
        ("/etc/sdfl/login/passwd", True),
        ("/etc/sdfl/login/acl", True),
    }
    assert set(up.MOSQUITTO_VOLUMES) <= set(broker["tmpfs"]), "a base image VOLUME without a mount leaks"
    assert broker["ports"] == [up.DEFAULT_PUBLISH]
    assert "$$MQTT_HEALTH_PASSWORD" in broker["healthcheck"]["test"][1]
    assert compose["volumes"] == {"datasets": {}}
    # The live page: an observer with the read-only login, the secret to check messages, its port on loopback only.
    page = compose["services"]["dashboard"]
    assert page["entrypoint"] == ["python", "-m", "graphs.live"] and page["env_file"] == [str(login.observer_env)]
    assert (
        "--secret-file" in page["command"] and page["command"][page["command"].index("--broker") + 1] == "broker:1883"
    )
    assert page["ports"] == [f"127.0.0.1::{up.DASHBOARD_PORT}"] and "environment" not in page
    assert up.read_env_file(login.observer_env)["FL_USERNAME"] == up.OBSERVER


def test_compose_file_hosts_k_peers_per_container_each_with_its_own_login(tmp_path):
    net = network(tmp_path, peers=[f"peer-{k}" for k in range(1, 8)], total=7, per_process=3)
    login = up.make_credentials(tmp_path / "login", net.peers)
    compose = up.compose_config(net, login, 1234, 5678)
    assert yaml.safe_load(json.dumps(compose)) == compose
    assert net.containers() == {
        "host-peer-1": ["peer-1", "peer-2", "peer-3"],
        "host-peer-4": ["peer-4", "peer-5", "peer-6"],
        "host-peer-7": ["peer-7"],
    }
    assert sorted(compose["services"]) == ["broker", "dashboard", "host-peer-1", "host-peer-4", "host-peer-7"]
    host = compose["services"]["host-peer-4"]
    assert host["entrypoint"] == ["python", "-m", "peer.host"]
    assert host["command"] == [
        "--hosted",
        "peer-4=3/7,peer-5=4/7,peer-6=5/7",
        "--login-dir",
        up.HOSTED_LOGINS,
        "--max-rounds",
        "2",
        "--dataset",
        "fashion-mnist",
        "--seed",
        "$$7",
    ]
    assert host["labels"][up.LABEL_PEER] == "peer-4,peer-5,peer-6"
    env = host["environment"]
    assert "FL_PEER_ID" not in env and "FL_SHARD" not in env and "env_file" not in host
    assert env["FL_MIN_PEERS"] == "7" and env["FL_EPOCHS"] == "2"
    # Its peers' logins, read-only, and no one else's: a host cannot publish as a peer it does not run.
    logins = {m["target"]: m for m in host["volumes"] if m["target"].startswith(up.HOSTED_LOGINS)}
    assert logins == {
        f"{up.HOSTED_LOGINS}/peer-{k}.env": {
            "type": "bind",
            "source": str(login.env_file(f"peer-{k}")),
            "target": f"{up.HOSTED_LOGINS}/peer-{k}.env",
            "read_only": True,
        }
        for k in (4, 5, 6)
    }
    assert compose["services"]["host-peer-7"]["command"][:2] == ["--hosted", "peer-7=6/7"]
    # Peers joining a broker elsewhere (--join, --first 4 of 6) are hosted the same way, named after their first.
    net = network(tmp_path, peers=["peer-4", "peer-5", "peer-6"], first=4, total=6, join="10.1.2.3:1883", per_process=2)
    compose = up.compose_config(net, up.make_credentials(tmp_path / "login2", net.peers), 1, 1)
    assert sorted(compose["services"]) == ["host-peer-4", "host-peer-6"]
    host = compose["services"]["host-peer-4"]
    assert host["command"][:2] == ["--hosted", "peer-4=3/6,peer-5=4/6"] and "depends_on" not in host
    assert host["environment"]["FL_BROKER"] == "10.1.2.3:1883"


def test_a_kill_counts_for_every_peer_of_the_killed_container(tmp_path, capsys):
    net = network(tmp_path, peers=[f"peer-{k}" for k in range(1, 7)], total=6, per_process=3)
    net.run_dir.mkdir()
    chaos.record(net.run_dir, "kill", "peer-2", "KILL")
    assert net.killed_on_purpose() == {"peer-1", "peer-2", "peer-3"}
    codes = {"peer-1": 137, "peer-2": 137, "peer-3": 137, "peer-4": 0, "peer-5": 1, "peer-6": None}
    assert up.verdict(codes, net.killed_on_purpose()) == {"peer-5": 1, "peer-6": None}
    assert network(tmp_path, peers=["peer-1", "peer-2", "peer-3"]).killed_on_purpose() == {"peer-2"}
    # The launcher's progress says it once for the three, and apart for a peer that exited otherwise.
    progress = up.Progress(net, 0)
    progress.update(
        {
            "peer-1": "exited 137",
            "peer-2": "exited 137",
            "peer-3": "exited 137",
            "peer-4": "running",
            "peer-5": "exited 1",
        }
    )
    progress.update({"peer-1": "exited 137", "peer-4": "exited 0"})
    said = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if " exited " in line]
    assert said == ["peer-1..peer-3 exited 137 (killed on purpose)", "peer-5 exited 1", "peer-4 exited 0"]
    assert (
        up.spans(["peer-10", "peer-2", "peer-1", "peer-3", "peer-4", "peer-7", "peer-8"])
        == "peer-1..peer-4, peer-7, peer-8, peer-10"
    )
    assert up.spans(["peer-1", "x"]) == "peer-1, x"


def test_a_hosts_log_is_split_into_its_peers_logs(tmp_path):
    combined = tmp_path / "hosts" / "host-peer-1.log"
    combined.parent.mkdir()
    combined.write_bytes(
        b"t INFO peer=host-peer-1 role=host | loading\n"
        b"t INFO peer=peer-1 role=waiting | one\n"
        b"t INFO peer=peer-2 role=controller | two\n"
        b"  summary table row\n"
        b"t INFO peer=peer-1 role=trainer | three\n"
    )
    up.split_host_log(combined, ["peer-1", "peer-2"], tmp_path)
    assert (tmp_path / "peers" / "peer-1" / "peer.log").read_text().splitlines() == [
        "t INFO peer=peer-1 role=waiting | one",
        "t INFO peer=peer-1 role=trainer | three",
    ]
    assert (tmp_path / "peers" / "peer-2" / "peer.log").read_text().splitlines() == [
        "t INFO peer=peer-2 role=controller | two",
        "  summary table row",
    ]


def test_the_observer_login_only_reads(tmp_path):
    login = up.make_credentials(tmp_path / "login", ["peer-1"])
    acl = login.acl.read_text()
    block = acl[acl.index(f"user {up.OBSERVER}") :].split("\n\n")[0].splitlines()
    assert block == [f"user {up.OBSERVER}", "topic read sd/#"]
    assert up.OBSERVER in login.passwd.read_text() and login.peers() == ["peer-1"]  # no peer's login


def test_compose_file_of_peers_that_join_a_broker_elsewhere(tmp_path):
    net = network(tmp_path, peers=["peer-4", "peer-5"], first=4, total=6, join="10.1.2.3:1883")
    compose = up.compose_config(net, up.make_credentials(tmp_path / "login", net.peers), 1, 1)
    assert sorted(compose["services"]) == ["peer-4", "peer-5"]
    peer = compose["services"]["peer-5"]
    assert peer["environment"]["FL_BROKER"] == "10.1.2.3:1883" and peer["environment"]["FL_SHARD"] == "4/6"
    assert peer["environment"]["FL_MIN_PEERS"] == "6" and "depends_on" not in peer


def test_compose_file_command_passes_settings_and_mounts_datasets(tmp_path):
    data = tmp_path / "mnist"
    data.mkdir()
    result = upsh(
        tmp_path,
        "compose-file",
        "--peers",
        "2",
        "--data-dir",
        str(data),
        "--",
        "--max-rounds",
        "3",
        FL_EPOCHS="2",
        FL_BROKER="elsewhere:1",
        FL_PEER_ID="nope",
    )
    assert result.returncode == 0, result.stderr
    compose = json.loads(result.stdout)
    env = compose["services"]["peer-2"]["environment"]
    assert env["FL_EPOCHS"] == "2" and env["FL_BROKER"] == "broker:1883" and env["FL_PEER_ID"] == "peer-2"
    assert env["FL_DATA_DIR"] == "/data/input" and env["FL_MIN_PEERS"] == "2"
    mounts = {m["target"]: m for m in compose["services"]["peer-2"]["volumes"]}
    assert mounts["/data/input"] == {"type": "bind", "source": str(data), "target": "/data/input", "read_only": True}
    if up.FASHION_MNIST.is_dir():
        assert mounts[str(up.FASHION_MNIST)]["read_only"]
    # --data-dir after -- is taken out of the peer flags and mounted the same way.
    moved = json.loads(upsh(tmp_path, "compose-file", "--peers", "2", "--", "--data-dir", str(data)).stdout)
    assert "command" not in moved["services"]["peer-1"]
    assert moved["services"]["peer-1"]["environment"]["FL_DATA_DIR"] == "/data/input"


# ------------------------------------------------------------------------------------------------ logins


def verify(password: str, hashed: str) -> bool:
    _, seven, iterations, salt, digest = hashed.split("$")
    assert seven == "7"
    again = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt), int(iterations), 64)
    return base64.b64encode(again).decode() == digest


def test_credentials_one_login_per_peer_kept_between_runs(tmp_path):
    folder = tmp_path / "login"
    login = up.make_credentials(folder, ["peer-1", "peer-2"])
    assert folder.stat().st_mode & 0o777 == 0o700
    first = {p: up.read_env_file(login.env_file(p)) for p in ("peer-1", "peer-2")}
    assert first["peer-1"]["FL_USERNAME"] == "peer-1" and re.fullmatch(r"[0-9a-f]{48}", first["peer-1"]["FL_PASSWORD"])
    assert first["peer-1"]["FL_PASSWORD"] != first["peer-2"]["FL_PASSWORD"]
    for name in ("peer-1.env", "peer-2.env", "health.env", "federation.secret"):
        assert (folder / name).stat().st_mode & 0o077 == 0, f"{name} readable by others"
    # A second network start keeps the logins (peers elsewhere may hold copies) and adds the missing ones.
    login = up.make_credentials(folder, ["peer-1", "peer-2", "peer-3"])
    assert up.read_env_file(login.env_file("peer-1")) == first["peer-1"]
    assert login.peers() == ["peer-1", "peer-2", "peer-3"]
    users = dict(line.split(":", 1) for line in login.passwd.read_text().splitlines())
    assert list(users) == ["health", up.OBSERVER, "peer-1", "peer-2", "peer-3"]
    assert verify(first["peer-2"]["FL_PASSWORD"], users["peer-2"])
    assert not verify(first["peer-1"]["FL_PASSWORD"], users["peer-2"])
    acl = login.acl.read_text()
    for peer in ("peer-1", "peer-2", "peer-3"):
        # each peer reads the federation and publishes only as itself (the last topic level is the sender)
        assert f"user {peer}\ntopic read sd/#\ntopic write sd/+/+/{peer}\n" in acl
    assert "user health\ntopic read $SYS/broker/uptime\n" in acl


def test_acl_follows_the_topic_prefix(tmp_path):
    login = up.make_credentials(tmp_path / "login", ["peer-1"], topic_prefix="lab/fl")
    acl = login.acl.read_text()
    assert "topic read lab/fl/#" in acl and "topic write lab/fl/+/+/peer-1" in acl and "sd/#" not in acl


def test_joining_peers_need_their_logins(tmp_path):
    copy = up.make_credentials(tmp_path / "copy", ["peer-1", "peer-2"])
    result = upsh(tmp_path, "compose-file", "--join", "h:1883", "--login", str(copy.folder), "--peers", "2")
    assert result.returncode == 0, result.stderr
    with pytest.raises(up.UpError, match="no login for peer-3"):
        copy.check(["peer-2", "peer-3"])


def test_generated_state_is_git_ignored():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    paths = [".up/sdfl/login/peer-1.env", ".up/last.json", ".up/sdfl/compose.json"]
    result = subprocess.run(["git", "check-ignore", *paths], cwd=ROOT, capture_output=True, text=True)
    assert result.stdout.split() == paths


# ------------------------------------------------------------------------------------------------ images


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    out = []
    for line in re.sub(r"\\\n", " ", dockerfile.read_text()).splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize(
    "dockerfile, arg, default",
    [
        ("peer/Dockerfile", "PYTHON_BASE", "python:3.11-slim"),
        ("broker/Dockerfile", "MOSQUITTO_BASE", "eclipse-mosquitto:2"),
    ],
)
def test_dockerfiles_take_their_base_as_a_build_argument(dockerfile, arg, default):
    steps = instructions(ROOT / dockerfile)
    assert steps[0] == ("ARG", f"{arg}={default}")
    assert steps[1] == ("FROM", f"${{{arg}}}")
    kind = "python" if arg == "PYTHON_BASE" else "mosquitto"
    assert up.BASES[kind][0] == default and up.BUILD_ARG[kind] == arg
    assert up.IMAGES[up.PEER_IMAGE if kind == "python" else up.BROKER_IMAGE] == (dockerfile, kind)


def test_peer_image_takes_an_extra_ca_bundle_and_drops_root():
    steps = instructions(ROOT / "peer" / "Dockerfile")
    assert ("ARG", 'EXTRA_CA_CERTS=""') in steps
    text = (ROOT / "peer" / "Dockerfile").read_text()
    assert "update-ca-certificates" in text and "PIP_CERT=/etc/ssl/certs/ca-certificates.crt" in text
    words = [w for w, _ in steps]
    users = [rest for w, rest in steps if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN"), "every RUN as root, then drop"
    assert ("ENTRYPOINT", '["python", "-m", "peer"]') in steps
    env = dict(pair.split("=", 1) for w, rest in steps if w == "ENV" for pair in rest.split())
    assert env["KERAS_HOME"] == "/data/keras" and env["FL_RUN_DIR"] == "/run-dir"


def test_build_context_holds_what_the_images_copy_and_nothing_else():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    rules = [line for line in ignore if line and not line.startswith("#")]
    assert rules[0] == "*", ".dockerignore starts from nothing and adds back"
    included = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    copied = set()
    for dockerfile in ("peer/Dockerfile", "broker/Dockerfile"):
        for word, rest in instructions(ROOT / dockerfile):
            if word == "COPY":
                *sources, _ = rest.split()
                for source in sources:
                    assert (ROOT / source).exists() and source.rstrip("/") in included, source
                    copied.add(source.rstrip("/"))
    assert included == copied == {"requirements.txt", "peer", "graphs", "broker/mosquitto.conf"}


def test_requirements_are_pinned():
    reqs = [
        line.strip()
        for line in (ROOT / "requirements.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for line in reqs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*==[0-9][A-Za-z0-9.+!-]*", line), line
    # The Dockerfile swaps tensorflow-cpu for tensorflow on arm64 by this exact spelling.
    assert any(line.startswith("tensorflow-cpu==") for line in reqs)
    assert "s/^tensorflow-cpu==/tensorflow==/" in (ROOT / "peer" / "Dockerfile").read_text()


# ------------------------------------------------------------------------------------------------ local, for real


def leftovers(run_dir) -> list[str]:
    """Processes of this run still alive: peers (their command line names the run dir) or its broker."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(run_dir) in cmdline:
            found.append(f"{pid}: {cmdline}")
    return found


def test_local_runs_to_the_finish_through_a_controller_kill_and_leaves_nothing_behind(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env(tmp_path, PYTHON=sys.executable)
    proc = subprocess.Popen(
        [UP, "--local", "--peers", "5", "--run-dir", str(run_dir), "--", *SMALL, "--max-rounds", "4", "--epochs", "3"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: rounds(run_dir), 150, "round 1 to finish")
        status = subprocess.run([UP, "status"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
        assert status.returncode == 0 and "controller: peer-" in status.stdout, status.stdout + status.stderr
        killed = subprocess.run(
            [UP, "kill", "controller", "--run-dir", str(run_dir)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert killed.returncode == 0 and "sent SIGKILL to peer-" in killed.stdout, killed.stdout + killed.stderr
        output, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    assert proc.returncode == 0, output[-3000:]  # the peer killed on purpose is no failure of the run
    for line in (
        "starting the broker and 5 peers as local processes",
        "peers joined 5/5",
        "round 1/4: accuracy",
        "finished (max-rounds)",
        f"records: {run_dir}",
        f"-m graphs {run_dir}",
    ):
        assert line in output, (line, output)
    terms = elections(run_dir)
    assert len(terms) >= 2 and terms[1]["reason"] == "controller-lost"
    assert_rounds_complete(run_dir, 4)
    assert sum(s["role"] == "finished" for s in statuses(run_dir).values()) == 4  # every survivor got the finish
    assert leftovers(run_dir) == []


def test_local_down_stops_the_network(tmp_path):
    run_dir = tmp_path / "run"
    env = clean_env(tmp_path, PYTHON=sys.executable)
    proc = subprocess.Popen(
        [UP, "--local", "--peers", "2", "--run-dir", str(run_dir), "--", *SMALL, "--max-rounds", "1000"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_until(lambda: rounds(run_dir), 150, "round 1 to finish")
        down = subprocess.run([UP, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and "stopped the local network" in down.stdout, down.stdout + down.stderr
        output, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            proc.wait(30)
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    assert "stopping the broker and every peer" in output
    deadline = time.monotonic() + 10
    while leftovers(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert leftovers(run_dir) == []
    again = subprocess.run([UP, "down"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=30)
    assert again.returncode == 0 and "no local network is running" in again.stdout


# ------------------------------------------------------------------------------------------------ runs


def compose_env(tmp_path, *args, **env) -> dict:
    result = upsh(tmp_path, "compose-file", "--peers", "2", *args, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]["peer-1"]["environment"]


def test_every_network_is_a_run_of_its_own_unless_told_which(tmp_path):
    first, second = compose_env(tmp_path)["FL_RUN_ID"], compose_env(tmp_path)["FL_RUN_ID"]
    assert first != second and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first)
    assert compose_env(tmp_path, "--", "--run-id", "exp-7")["FL_RUN_ID"] == "exp-7"
    assert compose_env(tmp_path, FL_RUN_ID="exp-8")["FL_RUN_ID"] == "exp-8"


def test_peers_joining_from_another_machine_take_the_brokers_run(tmp_path):
    copy = up.make_credentials(tmp_path / "copy", ["peer-1", "peer-2"])
    copy.run_id_file.write_text("20261124-120000-abcdef\n")
    env = compose_env(tmp_path, "--join", "h:1883", "--login", str(copy.folder))
    assert env["FL_RUN_ID"] == "20261124-120000-abcdef"


def test_resume_goes_on_with_the_checkpointed_run_in_its_run_dir(tmp_path):
    from peer.records.run_dir import RunRecorder

    run_dir = tmp_path / "killed"
    RunRecorder(run_dir, "peer-1").checkpoint({"run_id": "r-42", "round": 3, "term": 2}, b"weights")
    env = compose_env(tmp_path, "--resume", str(run_dir))
    assert env["FL_RUN_ID"] == "r-42" and env["FL_RESUME"] == "yes"
    for args, words in (
        (["--resume", str(tmp_path / "nothing")], "no checkpoint in"),
        (["--resume", str(run_dir), "--", "--run-id", "other"], "is of run r-42, not other"),
        (["--resume", str(run_dir), "--run-dir", str(tmp_path / "x")], "leave --run-dir out"),
    ):
        result = upsh(tmp_path, "compose-file", "--peers", "2", *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr
