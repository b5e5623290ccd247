"""TLS between peers and brokers and between bridged brokers, on real mosquittos with certificates of the network's
own CA (scripts.certs, the openssl command): a peer that trusts the CA connects; one given another CA refuses the
broker in one line (at start, before anything else, and in the transport); a plaintext client gets nothing from a
TLS-only listener; under mutual TLS a client without a certificate is turned away; bridges carry messages over TLS."""

from __future__ import annotations

import queue
import shutil
import socket
import ssl
import subprocess
import sys
import time

import pytest

from peer.config import load_settings
from peer.node.transport import BrokerRefused, Connected, Inbound, MqttTransport, untrusted_broker
from scripts.certs import authority, certificate
from scripts.localnet import Broker, bridged_brokers, broker_tls, find_mosquitto, free_port
from tests.netutil import ROOT

pytestmark = pytest.mark.skipif(
    find_mosquitto() is None or shutil.which("openssl") is None, reason="needs mosquitto and openssl"
)

WAIT_S = 30


def next_event(events: queue.Queue, kind: type):
    while True:
        try:
            event = events.get(timeout=WAIT_S)
        except queue.Empty:
            raise AssertionError(f"no {kind.__name__} within {WAIT_S} s") from None
        if isinstance(event, kind):
            return event


def transport(broker: Broker, ca, name: str = "a", cert=None, key=None) -> tuple[MqttTransport, queue.Queue]:
    events: queue.Queue = queue.Queue()
    settings = load_settings(
        ["--tls-ca", str(ca)] + (["--tls-cert", str(cert), "--tls-key", str(key)] if cert else []), {}
    )
    t = MqttTransport([("127.0.0.1", broker.port)], name, [("sd/t/#", True)], events, tls=settings.tls_context())
    t.start(f"sd/t/presence/{name}", b"offline")
    return t, events


@pytest.fixture
def tls_broker(tmp_path):
    certs = tmp_path / "certs"
    with Broker(name="broker-1", tls=broker_tls(certs, "broker-1"), log_path=tmp_path / "broker.log") as broker:
        yield broker, authority(certs)


def test_a_peer_that_trusts_the_network_s_ca_connects_over_tls(tls_broker):
    broker, ca = tls_broker
    a, events = transport(broker, ca.ca)
    try:
        assert next_event(events, Connected).broker == broker.address
    finally:
        a.close()
    assert (
        untrusted_broker([("127.0.0.1", broker.port)], load_settings(["--tls-ca", str(ca.ca)], {}).tls_context())
        is None
    )


def test_a_broker_signed_by_another_ca_is_refused_in_one_line(tls_broker, tmp_path):
    broker, _ = tls_broker
    other = authority(tmp_path / "other")
    a, events = transport(broker, other.ca)
    try:
        refused = next_event(events, BrokerRefused)
    finally:
        a.close()
    assert refused.fatal and refused.tls and "\n" not in refused.reason
    assert refused.reason.startswith(f"{broker.address} presents a TLS certificate this peer does not trust (")
    # A peer says so at start, in one line, and exits like any settings error (before its dataset or learning).
    done = subprocess.run(
        [sys.executable, "-m", "peer", "--broker", broker.address, "--tls-ca", str(other.ca), "--run-dir",
         str(tmp_path / "run"), "--peer-id", "peer-1"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    [line] = done.stderr.strip().splitlines()
    assert line.startswith(
        f"python -m peer: error: --tls-ca {other.ca}: broker {broker.address} presents a TLS certificate this peer "
        "does not trust ("
    ) and line.endswith(")"), line


def test_a_peer_told_to_use_tls_refuses_a_plain_broker_in_one_line(tls_broker):
    _, ca = tls_broker
    with Broker() as plain:
        tls = load_settings(["--tls-ca", str(ca.ca)], {}).tls_context()
        refused = untrusted_broker([("127.0.0.1", plain.port)], tls)
    assert refused is not None and refused.startswith(f"broker {plain.address} does not speak TLS there (")


def test_a_plaintext_client_gets_nothing_from_a_tls_only_listener(tls_broker):
    broker, _ = tls_broker
    connect = bytes([0x10, 16]) + b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x04test"  # MQTT 3.1.1 CONNECT, id "test"
    with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT_S) as sock:
        sock.sendall(connect)
        try:
            answer = sock.recv(64)
        except ConnectionResetError:
            answer = b""
    assert not answer.startswith(b"\x20")  # no CONNACK: the listener speaks TLS only and drops the connection


def test_under_mutual_tls_a_client_needs_a_certificate_of_the_ca(tmp_path):
    certs = tmp_path / "certs"
    tls = broker_tls(certs, "broker-1", clients_certified=True)
    ca = authority(certs)
    peer = certificate(ca, "peer-1")
    with Broker(name="broker-1", tls=tls) as broker:
        a, events = transport(broker, ca.ca, "peer-1", peer.cert, peer.key)
        try:
            assert next_event(events, Connected).broker == broker.address
        finally:
            a.close()
        context = ssl.create_default_context(cafile=str(ca.ca))  # no certificate of its own
        with pytest.raises((ssl.SSLError, ConnectionError)):
            with socket.create_connection(("127.0.0.1", broker.port), timeout=WAIT_S) as raw:
                with context.wrap_socket(raw, server_hostname="127.0.0.1") as sock:
                    sock.sendall(bytes([0x10, 16]) + b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x04test")
                    if not sock.recv(64):  # TLS 1.3: the refusal comes after the handshake, as a closed connection
                        raise ConnectionError("closed")


def test_bridges_carry_messages_over_tls(tmp_path):
    certs = tmp_path / "certs"
    brokers = bridged_brokers(2, tmp_path / "run", "sd", certs=certs)
    for broker in brokers:
        broker.start()
    ca = authority(certs).ca
    one, one_events = transport(brokers[0], ca, "one")
    two, two_events = transport(brokers[1], ca, "two")
    try:
        next_event(one_events, Connected)
        next_event(two_events, Connected)
        for n in range(WAIT_S * 5):  # until the bridge is up (it connects on its own schedule)
            two.publish("sd/t/init/two", b"over tls")
            try:
                inbound = one_events.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(inbound, Inbound):
                break
        assert isinstance(inbound, Inbound) and inbound.payload == b"over tls"
    finally:
        one.close()
        two.close()
        for broker in brokers:
            broker.close()


def test_the_live_page_s_observer_moves_on_to_the_next_broker_and_speaks_tls(tls_broker):
    from graphs.live import Board, Observer

    broker, ca = tls_broker
    tls = load_settings(["--tls-ca", str(ca.ca)], {}).tls_context()
    nobody = ("127.0.0.1", free_port())  # nothing listens there: the observer goes on to the TLS broker
    observer = Observer(Board(), *nobody, run_id="run-1", tls=tls, more_brokers=[("127.0.0.1", broker.port)])
    observer.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not observer.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert observer.client.is_connected()
        assert observer.brokers[observer.current] == ("127.0.0.1", broker.port)
    finally:
        observer.stop()
