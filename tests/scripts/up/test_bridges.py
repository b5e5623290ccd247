"""Brokers in containers bridged into one federation (scripts/up/bridges.py): the compose file of `./up.sh --brokers
B` (broker-1..broker-B, a tree, the peers spread over them, every peer given every broker), each bridge with a
login of its own in every broker's password file and ACL, and the configuration of a broker on another machine
bridged over TLS to the first (`./up.sh broker --tls --bridge-to`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scripts.up import bridges, compose, logins, network
from scripts.up.tls import MOUNT
from tests.scripts.up.helpers import upsh

LOGINS = "${SDFL_LOGIN_DIR:-./.up/t/login}"


def make_network(tmp_path: Path, monkeypatch, **kw) -> network.Network:
    monkeypatch.setenv("UP_STATE_DIR", str(tmp_path / "state"))
    peers = [f"peer-{k}" for k in range(1, 7)]
    defaults = dict(project="t", run_dir=tmp_path / "run", peers=peers, total=6, brokers=3)
    return network.Network(**{**defaults, **kw})


def conf_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def bridge_of(text: str) -> dict[str, str]:
    """The options of the configuration's bridge (from its `connection` line on), by name."""
    lines = conf_lines(text)
    start = next(i for i, line in enumerate(lines) if line.startswith("connection "))
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in lines[start:]}


def test_three_brokers_are_a_tree_and_every_peer_has_them_all_its_own_first(tmp_path, monkeypatch):
    net = make_network(tmp_path, monkeypatch)
    config = compose.compose_config(net)
    services = config["services"]
    assert sorted(s for s in services if s.startswith("broker")) == ["broker-1", "broker-2", "broker-3"]
    for name in ("broker-1", "broker-2", "broker-3"):
        broker = services[name]
        assert broker["command"] == ["mosquitto", "-c", bridges.CONF_MOUNT]
        assert {"source": f"{LOGINS}/../brokers/{name}.conf", "target": bridges.CONF_MOUNT} == {
            k: v for k, v in broker["volumes"][-1].items() if k in ("source", "target")
        }
        assert broker["volumes"][-1]["read_only"] is True
    assert services["broker-1"]["ports"] == [net.publish]
    assert services["broker-2"]["ports"] == services["broker-3"]["ports"] == ["127.0.0.1::1883"]
    homes = {peer: services[peer]["environment"]["FL_BROKER"] for peer in net.peers}
    assert homes["peer-1"] == homes["peer-4"] == "broker-1:1883,broker-2:1883,broker-3:1883"
    assert homes["peer-2"] == homes["peer-5"] == "broker-2:1883,broker-3:1883,broker-1:1883"
    assert homes["peer-3"] == homes["peer-6"] == "broker-3:1883,broker-1:1883,broker-2:1883"
    healthy = {name: {"condition": "service_healthy"} for name in ("broker-1", "broker-2", "broker-3")}
    assert all(services[peer]["depends_on"] == healthy for peer in net.peers)
    page = services["dashboard"]["command"]
    assert page[page.index("--broker") + 1] == "broker-1:1883,broker-2:1883,broker-3:1883"
    assert "broker-1..broker-3" in compose.compose_text(net)


def test_each_bridge_logs_in_as_itself_and_the_acl_lets_it_carry_the_federation_only(tmp_path, monkeypatch):
    net = make_network(tmp_path, monkeypatch, topic_prefix="lab")
    login = logins.login_for(net, None)
    bridges.write_confs(net, login)
    root = bridges.conf_file(net, "broker-1").read_text()
    assert not any(line.startswith("connection ") for line in conf_lines(root))
    assert conf_lines(root)[0] == "listener 1883"
    expected = {"broker-2": "broker-1:1883", "broker-3": "broker-1:1883 broker-2:1883"}
    for name, address in expected.items():
        conf = bridges.conf_file(net, name)
        assert oct(conf.stat().st_mode & 0o777) == "0o644" and oct(conf.parent.stat().st_mode & 0o777) == "0o700"
        bridge = bridge_of(conf.read_text())
        user = logins.bridge_user(name)
        assert bridge["connection"] == f"bridge-{name}" and bridge["address"] == address
        assert bridge["remote_username"] == bridge["local_username"] == user
        assert bridge["remote_password"] == login.bridge_password(user)
        assert bridge["topic"] == "lab/# both 1" and bridge["bridge_protocol_version"] == "mqttv50"
        assert bridge["try_private"] == "true", "no message goes back over the bridge it came by"
    users = [line.split(":", 1)[0] for line in login.passwd.read_text().splitlines()]
    assert {logins.BRIDGE, "bridge-broker-2", "bridge-broker-3"} <= set(users)
    assert len(set(users)) == len(users)
    acl = login.acl.read_text()
    for user in ("bridge-broker-2", "bridge-broker-3"):
        assert f"user {user}\ntopic readwrite lab/#\n" in acl
    # Made again (a second run of the network): the bridges keep their passwords.
    again = logins.login_for(net, None)
    assert again.bridge_password("bridge-broker-3") == login.bridge_password("bridge-broker-3")


def test_a_broker_bridged_to_another_machine_takes_tls_only_and_checks_the_other_s_certificate(tmp_path, monkeypatch):
    net = make_network(tmp_path, monkeypatch, brokers=1, peers=[], tls=True, bridge_to="10.0.0.7:8883")
    login = logins.make_credentials(tmp_path / "copied", ["peer-1", "peer-2"])
    bridges.write_confs(net, login)
    text = bridges.conf_file(net, "broker").read_text()
    lines = conf_lines(text)
    assert "listener 1883 127.0.0.1" in lines and "listener 8883" in lines and "listener 1883" not in lines
    bridge = bridge_of(text)
    assert bridge["address"] == "10.0.0.7:8883" and bridge["remote_username"] == logins.BRIDGE
    assert bridge["bridge_cafile"] == f"{MOUNT}/{bridges.UPSTREAM_CA}" and bridge["bridge_insecure"] == "false"
    assert "bridge_certfile" not in bridge
    broker = compose.compose_config(net)["services"]["broker"]
    targets = {m["target"] for m in broker["volumes"]}
    assert {bridges.CONF_MOUNT, f"{MOUNT}/{bridges.UPSTREAM_CA}", f"{MOUNT}/ca.pem"} <= targets
    assert broker["command"] == ["mosquitto", "-c", bridges.CONF_MOUNT]


@pytest.mark.parametrize(
    "args, says",
    [
        (["--bridge-to", "a:8883"], "--bridge-to crosses machines: it needs --tls and --login"),
        (["--tls", "--login", "x"], "--login goes with --bridge-to"),
    ],
)
def test_bridge_to_without_what_it_needs_is_refused_in_one_line_before_any_engine(tmp_path, no_docker, args, says):
    result = upsh(tmp_path, "broker", "--peers", "3", *args, PATH=no_docker)
    assert result.returncode == 2 and says in result.stderr and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["--local", "--mutual-tls"],
        ["--mutual-tls", "--brokers", "2"],
        ["--local", "--mutual-tls", "--brokers", "2", "--peers-per-process", "2"],
    ],
)
def test_mutual_tls_is_for_a_local_network_s_bridged_brokers_one_peer_to_a_process(tmp_path, no_docker, args):
    result = upsh(tmp_path, "--peers", "4", *args, PATH=no_docker)
    assert (
        result.returncode == 2 and "--mutual-tls is for the TLS of a local network's bridged brokers" in result.stderr
    )
