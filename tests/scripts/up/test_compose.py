"""The compose file the launcher generates and runs: data a person can read as YAML, the same on every machine (what
differs is a variable), a container per peer or per K peers, logins, mounts, the live page, peers joining a broker
elsewhere; the repository's docker-compose.yml is the one of 5 peers; each network a run of its own."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from scripts.up import cli, compose, containers, images, logins, network
from tests.netutil import ROOT
from tests.scripts.up.helpers import clean_env, upsh

LOGINS = "${SDFL_LOGIN_DIR:-./.up/t/login}"
RUN_DIR = "${SDFL_RUN_DIR:-./runs/compose}"


def make_network(tmp_path: Path, **kw) -> network.Network:
    defaults = dict(
        project="t",
        run_dir=tmp_path / "run $HOME",
        peers=["peer-1", "peer-2", "peer-3"],
        total=3,
        peer_flags=["--max-rounds", "2", "--dataset", "fashion-mnist", "--seed", "$7"],
        env={"FL_EPOCHS": "2", "FL_RUN_ID": "r-1"},
    )
    return network.Network(**{**defaults, **kw})


def test_compose_file_is_data_for_n_peers(tmp_path):
    net = make_network(tmp_path)
    config = compose.compose_config(net)
    assert yaml.safe_load(compose.compose_text(net)) == config, "the YAML written is the data"
    assert config["name"] == "t"
    assert sorted(config["services"]) == ["broker", "dashboard", "peer-1", "peer-2", "peer-3"]
    user = "${SDFL_UID:?run ./up.sh credentials first}:${SDFL_GID:?run ./up.sh credentials first}"
    for k in range(1, 4):
        peer = config["services"][f"peer-{k}"]
        env = peer["environment"]
        assert env["FL_PEER_ID"] == f"peer-{k}" and env["FL_SHARD"] == f"{k - 1}/3" and env["FL_MIN_PEERS"] == "3"
        assert env["FL_BROKER"] == "broker:1883" and env["FL_RUN_DIR"] == "/run-dir" and env["FL_EPOCHS"] == "2"
        assert env["FL_RUN_ID"] == "${SDFL_RUN_ID:-default}", "the run's id is the launcher's to give"
        assert peer["env_file"] == [f"{LOGINS}/peer-{k}.env"]
        assert peer["user"] == user and peer["init"] is True and peer["image"] == images.PEER_IMAGE
        assert peer["build"] == {"context": ".", "dockerfile": "peer/Dockerfile", "network": "host"}
        assert peer["pull_policy"] == "never", "built here, never pulled"
        assert peer["depends_on"] == {"broker": {"condition": "service_healthy"}}
        # Compose interpolates $: the literal dollars of a flag survive doubled.
        assert peer["command"] == ["--max-rounds", "2", "--dataset", "fashion-mnist", "--seed", "$$7"]
        mounts = {m["target"]: m for m in peer["volumes"]}
        assert mounts["/run-dir"]["source"] == RUN_DIR and not mounts["/run-dir"].get("read_only")
        assert mounts["/run/secrets/federation"] == {
            "type": "bind",
            "source": f"{LOGINS}/federation.secret",
            "target": "/run/secrets/federation",
            "read_only": True,
        }
        assert mounts["/data/keras"]["type"] == "volume"
        assert peer["labels"] == {compose.LABEL_PEER: f"peer-{k}", compose.LABEL_RUN_DIR: RUN_DIR}
    broker = config["services"]["broker"]
    # The login is mounted read-only, away from /mosquitto (whose entrypoint re-owns what it finds there).
    assert {(m["source"], m["target"], m["read_only"]) for m in broker["volumes"]} == {
        (f"{LOGINS}/passwd", "/etc/sdfl/login/passwd", True),
        (f"{LOGINS}/acl", "/etc/sdfl/login/acl", True),
    }
    assert broker["env_file"] == [f"{LOGINS}/health.env"] and broker["build"]["dockerfile"] == "broker/Dockerfile"
    assert set(images.MOSQUITTO_VOLUMES) <= set(broker["tmpfs"]), "a base image VOLUME without a mount leaks"
    assert broker["ports"] == [network.DEFAULT_PUBLISH]
    assert "$$MQTT_HEALTH_PASSWORD" in broker["healthcheck"]["test"][1]
    assert config["volumes"] == {"datasets": {}}
    # The live page: an observer with the read-only login, the secret to check messages, its port on loopback only.
    page = config["services"]["dashboard"]
    assert page["entrypoint"] == ["python", "-m", "graphs.live"] and page["env_file"] == [f"{LOGINS}/observer.login"]
    command = page["command"]
    assert command[command.index("--broker") + 1] == "broker:1883" and "--secret-file" in command
    assert command[command.index("--run-id") + 1] == "${SDFL_RUN_ID:-default}"
    assert page["ports"] == [f"127.0.0.1::{compose.DASHBOARD_PORT}"] and "environment" not in page


def test_the_yaml_is_block_style_with_quotes_only_where_needed():
    assert compose.to_yaml({"a": {"b": [1, "x y", {"c": True, "d": []}]}, "e": {}}) == (
        'a:\n  b:\n    - 1\n    - "x y"\n    - c: true\n      d: []\n\ne: {}\n'
    )
    for text in ("no", "on", "1.5", "2s", "-m", "a: b", "0/3", "#x", "", "${X:-y}", 'say "hi"\n'):
        assert yaml.safe_load(f"k: {compose.scalar(text)}") == {"k": text}, text
    assert compose.scalar("peer.host") == "peer.host" and compose.scalar("/run-dir") == "/run-dir"


def test_compose_file_hosts_k_peers_per_container_each_with_its_own_login(tmp_path):
    net = make_network(tmp_path, peers=[f"peer-{k}" for k in range(1, 8)], total=7, per_process=3)
    config = compose.compose_config(net)
    assert yaml.safe_load(compose.compose_text(net)) == config
    assert net.containers() == {
        "host-peer-1": ["peer-1", "peer-2", "peer-3"],
        "host-peer-4": ["peer-4", "peer-5", "peer-6"],
        "host-peer-7": ["peer-7"],
    }
    assert sorted(config["services"]) == ["broker", "dashboard", "host-peer-1", "host-peer-4", "host-peer-7"]
    host = config["services"]["host-peer-4"]
    assert host["entrypoint"] == ["python", "-m", "peer.host"]
    assert host["command"] == [
        "--hosted",
        "peer-4=3/7,peer-5=4/7,peer-6=5/7",
        "--login-dir",
        compose.HOSTED_LOGINS,
        "--max-rounds",
        "2",
        "--dataset",
        "fashion-mnist",
        "--seed",
        "$$7",
    ]
    assert host["labels"][compose.LABEL_PEER] == "peer-4,peer-5,peer-6"
    env = host["environment"]
    assert "FL_PEER_ID" not in env and "FL_SHARD" not in env and "env_file" not in host
    assert env["FL_MIN_PEERS"] == "7" and env["FL_EPOCHS"] == "2"
    # Its peers' logins, read-only, and no one else's: a host cannot publish as a peer it does not run.
    mounted = {m["target"]: m for m in host["volumes"] if m["target"].startswith(compose.HOSTED_LOGINS)}
    assert mounted == {
        f"{compose.HOSTED_LOGINS}/peer-{k}.env": {
            "type": "bind",
            "source": f"{LOGINS}/peer-{k}.env",
            "target": f"{compose.HOSTED_LOGINS}/peer-{k}.env",
            "read_only": True,
        }
        for k in (4, 5, 6)
    }
    assert config["services"]["host-peer-7"]["command"][:2] == ["--hosted", "peer-7=6/7"]
    # Peers joining a broker elsewhere (--join, --first 4 of 6) are hosted the same way, named after their first.
    net = make_network(
        tmp_path, peers=["peer-4", "peer-5", "peer-6"], first=4, total=6, join="10.1.2.3:1883", per_process=2
    )
    config = compose.compose_config(net)
    assert sorted(config["services"]) == ["host-peer-4", "host-peer-6"]
    host = config["services"]["host-peer-4"]
    assert host["command"][:2] == ["--hosted", "peer-4=3/6,peer-5=4/6"] and "depends_on" not in host
    assert host["environment"]["FL_BROKER"] == "10.1.2.3:1883"


def test_compose_file_of_peers_that_join_a_broker_elsewhere(tmp_path):
    net = make_network(tmp_path, peers=["peer-4", "peer-5"], first=4, total=6, join="10.1.2.3:1883")
    config = compose.compose_config(net)
    assert sorted(config["services"]) == ["peer-4", "peer-5"]
    peer = config["services"]["peer-5"]
    assert peer["environment"]["FL_BROKER"] == "10.1.2.3:1883" and peer["environment"]["FL_SHARD"] == "4/6"
    assert peer["environment"]["FL_MIN_PEERS"] == "6" and "depends_on" not in peer


def test_the_repository_s_docker_compose_yml_is_the_generated_one_of_five_peers(tmp_path):
    """A user who knows compose reads the topology and runs `docker compose up` from the repository's file; the
    launcher runs the file it generates. They are one: `./up.sh compose-file --peers 5 > docker-compose.yml`."""
    result = upsh(tmp_path, "compose-file", "--peers", "5")
    assert result.returncode == 0, result.stderr
    ours = (ROOT / "docker-compose.yml").read_text()
    assert result.stdout == ours, "regenerate it: ./up.sh compose-file --peers 5 > docker-compose.yml"
    config = yaml.safe_load(ours)
    assert sorted(config["services"]) == ["broker", "dashboard", *(f"peer-{k}" for k in range(1, 6))]
    assert "./up.sh credentials" in ours.split("\nname:")[0], "the file says what to run first"


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
    config = yaml.safe_load(result.stdout)
    env = config["services"]["peer-2"]["environment"]
    assert env["FL_EPOCHS"] == "2" and env["FL_BROKER"] == "broker:1883" and env["FL_PEER_ID"] == "peer-2"
    assert env["FL_DATA_DIR"] == "/data/input" and env["FL_MIN_PEERS"] == "2"
    mounts = {m["target"]: m for m in config["services"]["peer-2"]["volumes"]}
    assert mounts["/data/input"] == {"type": "bind", "source": str(data), "target": "/data/input", "read_only": True}
    assert str(network.FASHION_MNIST) not in mounts  # the peers read the folder they are given
    # Without one, fashion-mnist peers get Debian's copy of the host where they look for it; mnist peers nothing.
    fashion = yaml.safe_load(upsh(tmp_path, "compose-file", "--peers", "2", "--", "--dataset", "fashion-mnist").stdout)
    mounts = {m["target"]: m for m in fashion["services"]["peer-1"]["volumes"]}
    if network.FASHION_MNIST.is_dir():
        assert mounts[str(network.FASHION_MNIST)]["read_only"]
        assert mounts[str(network.FASHION_MNIST)]["source"] == str(network.FASHION_MNIST)
    mnist = yaml.safe_load(upsh(tmp_path, "compose-file", "--peers", "2").stdout)
    assert {m["target"] for m in mnist["services"]["peer-1"]["volumes"]} == {
        "/run-dir",
        "/run/secrets/federation",
        "/data/keras",
    }
    # --data-dir after -- is taken out of the peer flags and mounted the same way.
    moved = yaml.safe_load(upsh(tmp_path, "compose-file", "--peers", "2", "--", "--data-dir", str(data)).stdout)
    assert "command" not in moved["services"]["peer-1"]
    assert moved["services"]["peer-1"]["environment"]["FL_DATA_DIR"] == "/data/input"


@pytest.fixture
def launch(tmp_path, monkeypatch):
    """The network `./up.sh ARGS -- FLAGS` would start in containers, and the values it would give its compose
    file's variables (no engine needed: the file is written, not run)."""
    monkeypatch.setenv("UP_STATE_DIR", str(tmp_path / "state"))
    for name in [k for k in os.environ if k.startswith("FL_")]:
        monkeypatch.delenv(name)

    def launch(*argv: str, login: Path | None = None) -> tuple[network.Network, dict]:
        args, flags = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, ())
        net = network.network_from_args(cli.run_parser().parse_args(["--peers", "2", *args]), list(flags))
        python = cli.settings_python()
        network.apply_settings(net, network.preflight(python, net, network.preflight_env(None)))
        network.run_settings(net, logins.Login(login).run_id_file if login else None)
        made = containers.compose_for(net, logins.login_for(net, str(login) if login else None))
        return net, made.variables()

    return launch


def test_the_launcher_runs_the_file_it_prints_with_its_own_values(launch, tmp_path):
    net, variables = launch("--run-dir", str(tmp_path / "run $HOME"), "--", "--max-rounds", "3")
    compose_file = net.state / "compose.yml"
    assert compose_file.read_text() == compose.compose_text(net)
    assert compose_file.stat().st_mode & 0o077 == 0, "the launcher's state is private"
    assert variables == {
        "SDFL_UID": str(os.getuid()),
        "SDFL_GID": str(os.getgid()),
        "SDFL_LOGIN_DIR": str(net.state / "login"),
        "SDFL_RUN_DIR": str(tmp_path / "run $HOME"),  # taken as it is: the environment is not interpolated
        "SDFL_RUN_ID": net.run_id,
    }
    command = compose.Compose("t", net.state).command("up")
    assert command[:4] == ["docker", "compose", "--project-directory", str(ROOT)]


def test_every_network_is_a_run_of_its_own_unless_told_which(launch, monkeypatch):
    first, second = launch()[1]["SDFL_RUN_ID"], launch()[1]["SDFL_RUN_ID"]
    assert first != second and re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first)
    assert launch("--", "--run-id", "exp-7")[1]["SDFL_RUN_ID"] == "exp-7"
    monkeypatch.setenv("FL_RUN_ID", "exp-8")
    net, variables = launch()
    assert variables["SDFL_RUN_ID"] == "exp-8"
    assert compose.compose_config(net)["services"]["peer-1"]["environment"]["FL_RUN_ID"] == "${SDFL_RUN_ID:-default}"


def test_peers_joining_from_another_machine_take_the_brokers_run(launch, tmp_path):
    copy = logins.make_credentials(tmp_path / "copy", ["peer-1", "peer-2"])
    copy.run_id_file.write_text("20261124-120000-abcdef\n")
    net, variables = launch("--join", "h:1883", login=copy.folder)
    assert variables["SDFL_RUN_ID"] == "20261124-120000-abcdef"


def test_resume_goes_on_with_the_checkpointed_run_in_its_run_dir(launch, tmp_path):
    from peer.records.run_dir import RunRecorder

    run_dir = tmp_path / "killed"
    RunRecorder(run_dir, "peer-1").checkpoint({"run_id": "r-42", "round": 3, "term": 2}, b"weights")
    net, variables = launch("--resume", str(run_dir))
    assert variables["SDFL_RUN_ID"] == "r-42" and variables["SDFL_RUN_DIR"] == str(run_dir)
    assert compose.compose_config(net)["services"]["peer-1"]["environment"]["FL_RESUME"] == "yes"
    for args, words in (
        (["--resume", str(tmp_path / "nothing")], "no checkpoint in"),
        (["--resume", str(run_dir), "--", "--run-id", "other"], "is of run r-42, not other"),
        (["--resume", str(run_dir), "--run-dir", str(tmp_path / "x")], "leave --run-dir out"),
    ):
        result = upsh(tmp_path, "compose-file", "--peers", "2", *args)
        assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr, result.stderr


def test_a_plain_docker_compose_up_gets_what_it_needs_from_one_command(tmp_path):
    """`./up.sh credentials`, the one-liner the file names, in a copy of the checkout: the logins where the file looks
    for them, the records' folder, and .env with this user's uid and gid (a .env of the user's own is kept)."""
    copy = tmp_path / "checkout"
    copy.mkdir()
    for name in ("up.sh", "scripts", "peer"):
        (shutil.copytree if (ROOT / name).is_dir() else shutil.copy2)(ROOT / name, copy / name)
    (copy / ".env").write_text("# mine\nCOMPOSE_PROFILES=x\nSDFL_UID=1\n")
    env = {k: v for k, v in clean_env(tmp_path).items() if k != "UP_STATE_DIR"}
    result = subprocess.run([str(copy / "up.sh"), "credentials"], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert (copy / ".env").read_text().splitlines() == [
        "# mine",
        "COMPOSE_PROFILES=x",
        f"SDFL_UID={os.getuid()}",
        f"SDFL_GID={os.getgid()}",
    ]
    login = copy / ".up" / "sdfl" / "login"
    assert {p.name for p in login.iterdir()} >= {"peer-1.env", "peer-5.env", "passwd", "acl", "federation.secret"}
    assert (copy / "runs" / "compose").is_dir()
    assert "then: docker compose up" in result.stdout
