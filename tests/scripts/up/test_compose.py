"""The compose file the launcher generates, as data: a container per peer or per K peers, logins, mounts, the
live page, peers joining a broker elsewhere; each network a run of its own."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from scripts.up import common, compose, images, logins, network
from tests.scripts.up.helpers import upsh


def make_network(tmp_path: Path, **kw) -> network.Network:
    defaults = dict(
        project="t",
        run_dir=tmp_path / "run $HOME",
        peers=["peer-1", "peer-2", "peer-3"],
        total=3,
        peer_flags=["--max-rounds", "2", "--dataset", "fashion-mnist", "--seed", "$7"],
        env={"FL_EPOCHS": "2"},
    )
    return network.Network(**{**defaults, **kw})


def test_compose_file_is_data_for_n_peers(tmp_path):
    net = make_network(tmp_path)
    login = logins.make_credentials(tmp_path / "login", net.peers)
    config = compose.compose_config(net, login, 1234, 5678)
    text = json.dumps(config)
    assert yaml.safe_load(text) == config, "JSON is valid YAML: compose reads it as is"
    assert config["name"] == "t"
    assert sorted(config["services"]) == ["broker", "dashboard", "peer-1", "peer-2", "peer-3"]
    for k in range(1, 4):
        peer = config["services"][f"peer-{k}"]
        env = peer["environment"]
        assert env["FL_PEER_ID"] == f"peer-{k}" and env["FL_SHARD"] == f"{k - 1}/3" and env["FL_MIN_PEERS"] == "3"
        assert env["FL_BROKER"] == "broker:1883" and env["FL_RUN_DIR"] == "/run-dir" and env["FL_EPOCHS"] == "2"
        assert peer["env_file"] == [str(login.env_file(f"peer-{k}"))]
        assert peer["user"] == "1234:5678" and peer["init"] is True and peer["image"] == images.PEER_IMAGE
        assert peer["depends_on"] == {"broker": {"condition": "service_healthy"}}
        # Compose interpolates $: the literal dollars of a flag and of a path survive doubled.
        assert peer["command"] == ["--max-rounds", "2", "--dataset", "fashion-mnist", "--seed", "$$7"]
        mounts = {m["target"]: m for m in peer["volumes"]}
        assert mounts["/run-dir"]["source"] == str(net.run_dir).replace("$", "$$")
        assert not mounts["/run-dir"].get("read_only")
        assert mounts["/run/secrets/federation"]["read_only"] and mounts["/data/keras"]["type"] == "volume"
        assert peer["labels"][compose.LABEL_PEER] == f"peer-{k}"
    broker = config["services"]["broker"]
    # The login is mounted read-only, away from /mosquitto (whose entrypoint re-owns what it finds there).
    assert {(m["target"], m["read_only"]) for m in broker["volumes"]} == {
        ("/etc/sdfl/login/passwd", True),
        ("/etc/sdfl/login/acl", True),
    }
    assert set(images.MOSQUITTO_VOLUMES) <= set(broker["tmpfs"]), "a base image VOLUME without a mount leaks"
    assert broker["ports"] == [network.DEFAULT_PUBLISH]
    assert "$$MQTT_HEALTH_PASSWORD" in broker["healthcheck"]["test"][1]
    assert config["volumes"] == {"datasets": {}}
    # The live page: an observer with the read-only login, the secret to check messages, its port on loopback only.
    page = config["services"]["dashboard"]
    assert page["entrypoint"] == ["python", "-m", "graphs.live"] and page["env_file"] == [str(login.observer_env)]
    assert (
        "--secret-file" in page["command"] and page["command"][page["command"].index("--broker") + 1] == "broker:1883"
    )
    assert page["ports"] == [f"127.0.0.1::{compose.DASHBOARD_PORT}"] and "environment" not in page
    assert common.read_env_file(login.observer_env)["FL_USERNAME"] == logins.OBSERVER


def test_compose_file_hosts_k_peers_per_container_each_with_its_own_login(tmp_path):
    net = make_network(tmp_path, peers=[f"peer-{k}" for k in range(1, 8)], total=7, per_process=3)
    login = logins.make_credentials(tmp_path / "login", net.peers)
    config = compose.compose_config(net, login, 1234, 5678)
    assert yaml.safe_load(json.dumps(config)) == config
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
            "source": str(login.env_file(f"peer-{k}")),
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
    config = compose.compose_config(net, logins.make_credentials(tmp_path / "login2", net.peers), 1, 1)
    assert sorted(config["services"]) == ["host-peer-4", "host-peer-6"]
    host = config["services"]["host-peer-4"]
    assert host["command"][:2] == ["--hosted", "peer-4=3/6,peer-5=4/6"] and "depends_on" not in host
    assert host["environment"]["FL_BROKER"] == "10.1.2.3:1883"


def test_compose_file_of_peers_that_join_a_broker_elsewhere(tmp_path):
    net = make_network(tmp_path, peers=["peer-4", "peer-5"], first=4, total=6, join="10.1.2.3:1883")
    config = compose.compose_config(net, logins.make_credentials(tmp_path / "login", net.peers), 1, 1)
    assert sorted(config["services"]) == ["peer-4", "peer-5"]
    peer = config["services"]["peer-5"]
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
    config = json.loads(result.stdout)
    env = config["services"]["peer-2"]["environment"]
    assert env["FL_EPOCHS"] == "2" and env["FL_BROKER"] == "broker:1883" and env["FL_PEER_ID"] == "peer-2"
    assert env["FL_DATA_DIR"] == "/data/input" and env["FL_MIN_PEERS"] == "2"
    mounts = {m["target"]: m for m in config["services"]["peer-2"]["volumes"]}
    assert mounts["/data/input"] == {"type": "bind", "source": str(data), "target": "/data/input", "read_only": True}
    assert str(network.FASHION_MNIST) not in mounts  # the peers read the folder they are given
    # Without one, fashion-mnist peers get Debian's copy of the host where they look for it; mnist peers nothing.
    fashion = json.loads(upsh(tmp_path, "compose-file", "--peers", "2", "--", "--dataset", "fashion-mnist").stdout)
    mounts = {m["target"]: m for m in fashion["services"]["peer-1"]["volumes"]}
    if network.FASHION_MNIST.is_dir():
        assert mounts[str(network.FASHION_MNIST)]["read_only"]
        assert mounts[str(network.FASHION_MNIST)]["source"] == str(network.FASHION_MNIST)
    mnist = json.loads(upsh(tmp_path, "compose-file", "--peers", "2").stdout)
    assert {m["target"] for m in mnist["services"]["peer-1"]["volumes"]} == {
        "/run-dir",
        "/run/secrets/federation",
        "/data/keras",
    }
    # --data-dir after -- is taken out of the peer flags and mounted the same way.
    moved = json.loads(upsh(tmp_path, "compose-file", "--peers", "2", "--", "--data-dir", str(data)).stdout)
    assert "command" not in moved["services"]["peer-1"]
    assert moved["services"]["peer-1"]["environment"]["FL_DATA_DIR"] == "/data/input"


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
    copy = logins.make_credentials(tmp_path / "copy", ["peer-1", "peer-2"])
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
