"""./up.sh broker --tls: the network's CA and the broker's certificate (kept in .up/<project>/tls, never in the login
folder, which gets only the CA certificate), a broker configuration whose only listener beyond the container's
loopback is TLS, and the compose files of the broker and of the peers that join it. The configuration is run on a
real mosquitto (its paths and ports moved to this machine's)."""

from __future__ import annotations

import re
import shutil
import socket
import ssl

import pytest

from scripts.localnet import Broker, find_mosquitto, free_port, wait_for_port
from scripts.up import compose, network, tls
from scripts.up.logins import CA_FILE, make_credentials
from tests.scripts.up.test_compose import make_network

needs_tools = pytest.mark.skipif(
    find_mosquitto() is None or shutil.which("openssl") is None, reason="needs mosquitto and openssl"
)
LOGINS = "${SDFL_LOGIN_DIR:-./.up/t/login}"


def test_the_tls_configuration_keeps_plain_mqtt_on_the_container_s_loopback():
    conf = tls.tls_conf((compose.ROOT / "broker" / "mosquitto.conf").read_text())
    listeners = re.findall(r"^listener .*$", conf, re.M)
    assert listeners == ["listener 1883 127.0.0.1", "listener 8883"]
    after = conf.split("listener 8883\n", 1)[1].splitlines()[:4]
    assert after == [f"cafile {tls.MOUNT}/ca.pem", f"certfile {tls.MOUNT}/broker.pem", f"keyfile {tls.MOUNT}/broker.key",
                     "tls_version tlsv1.2"]  # fmt: skip
    assert "allow_anonymous false" in conf and "acl_file /etc/sdfl/login/acl" in conf


def test_the_broker_s_compose_mounts_its_certificates_and_the_joining_peers_trust_the_ca(tmp_path):
    broker = compose.compose_config(make_network(tmp_path, peers=[], tls=True, publish="0.0.0.0:8883:8883"))
    service = broker["services"]["broker"]
    assert service["command"] == ["mosquitto", "-c", f"{tls.MOUNT}/{tls.CONF_FILE}"]
    mounts = {(v["source"], v["target"]) for v in service["volumes"]}
    assert {(f"{LOGINS}/../tls/{name}", f"{tls.MOUNT}/{name}") for name in tls.FILES} <= mounts
    assert service["ports"] == ["0.0.0.0:8883:8883"]
    joining = compose.compose_config(
        make_network(tmp_path, peers=["peer-4"], first=4, total=6, join="10.1.2.3:8883", tls=True)
    )
    peer = joining["services"]["peer-4"]
    assert peer["environment"]["FL_TLS_CA"] == tls.CA_MOUNT and peer["environment"]["FL_BROKER"] == "10.1.2.3:8883"
    assert (f"{LOGINS}/{CA_FILE}", tls.CA_MOUNT) in {(v["source"], v["target"]) for v in peer["volumes"]}
    plain = compose.compose_config(make_network(tmp_path))  # without --tls nothing changes
    assert (
        "command" not in plain["services"]["broker"] and "FL_TLS_CA" not in plain["services"]["peer-1"]["environment"]
    )


def test_broker_hosts_name_this_machine_and_the_published_address_but_no_wildcard():
    hosts = tls.broker_hosts("10.0.0.7:8883:8883", ["lab.example"])
    assert {"broker", "localhost", "127.0.0.1", socket.gethostname(), "10.0.0.7", "lab.example"} <= set(hosts)
    assert "0.0.0.0" not in tls.broker_hosts("0.0.0.0:8883:8883") and len(hosts) == len(set(hosts))


@needs_tools
def test_the_tls_broker_takes_peers_that_trust_its_ca_and_no_plaintext(tmp_path, monkeypatch):
    monkeypatch.setattr(network, "state_dir", lambda: tmp_path / ".up")
    net = make_network(tmp_path, peers=[], tls=True)
    login = make_credentials(net.state / "login", ["peer-1"])
    ca, own = tls.make_broker_tls(net, login.folder, ["127.0.0.1", "localhost"])
    assert (login.folder / CA_FILE).read_bytes() == ca.ca.read_bytes()
    assert not list(login.folder.glob("*.key")), "no key in the folder that is copied to other machines"
    assert (tls.folder(net).stat().st_mode & 0o777) == 0o700
    # The configuration as the container has it, its paths and ports moved to this machine.
    plain_port, tls_port = free_port(), free_port()
    conf = (tls.folder(net) / tls.CONF_FILE).read_text()
    conf = conf.replace(tls.MOUNT, str(tls.folder(net))).replace("/etc/sdfl/login", str(login.folder))
    conf = conf.replace("listener 1883 127.0.0.1", f"listener {plain_port} 127.0.0.1")
    conf = conf.replace(f"listener {tls.TLS_PORT}", f"listener {tls_port} 127.0.0.1")
    broker = Broker(name="broker", log_path=tmp_path / "broker.log")
    broker._write_conf = lambda: broker.conf.write_text(conf + "user root\n")  # type: ignore[method-assign]
    broker.port = tls_port
    with broker:
        assert wait_for_port(plain_port, 10)
        connect = bytes([0x10, 16]) + b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x04test"
        context = ssl.create_default_context(cafile=str(login.folder / CA_FILE))
        with socket.create_connection(("127.0.0.1", tls_port), timeout=30) as raw:
            with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                sock.sendall(connect)
                assert sock.recv(4)[:1] == b"\x20"  # a CONNACK (refusing the anonymous login: the broker answered)
        with socket.create_connection(("127.0.0.1", tls_port), timeout=30) as sock:
            sock.sendall(connect)
            try:
                answer = sock.recv(4)
            except ConnectionResetError:
                answer = b""
            assert not answer.startswith(b"\x20")  # plaintext on the TLS listener: no answer
