"""Several bridged brokers, as the local network runs them (scripts.localnet.bridged_brokers: a tree, MQTT v5
bridges), checked on real mosquittos with the network's own logins and ACL: every client of every broker gets each
message, retained message and Last Will exactly once, never its own back; the per-peer ACL holds on every broker; and
when the root broker is killed the others join up under its stand-in."""

from __future__ import annotations

import itertools
import threading
import time

import pytest

from scripts.localnet import Broker, bridged_brokers, find_mosquitto
from scripts.up.common import read_env_file
from scripts.up.logins import make_credentials

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto broker")

WAIT_S = 30.0  # generous: what must arrive arrives in milliseconds on an idle machine
PEERS = ["peer-1", "peer-2", "peer-3"]
_serial = itertools.count()


def wait_until(predicate, what: str, timeout: float = WAIT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class Client:
    """A paho MQTT v5 client logged in as `user` on `broker`, subscribed (no-local, as peers are) to `sd/#`; it keeps
    every message it gets, in order, as (topic, payload, retained)."""

    def __init__(self, broker: Broker, user: str, password: str, will: tuple[str, bytes] | None = None):
        self.user, self.broker = user, broker
        self.got: list[tuple[str, bytes, bool]] = []
        self.lock = threading.Lock()
        self.subscribed = threading.Event()
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"{user}-{next(_serial)}",
            protocol=paho.MQTTv5,
        )
        self.client.username_pw_set(user, password)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe([("sd/#", SubscribeOptions(qos=1, noLocal=True))])
        self.client.on_subscribe = lambda *a: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=60)
        self.client.loop_start()
        assert self.subscribed.wait(WAIT_S), f"{user} could not subscribe on {broker.name}"

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.got.append((message.topic, bytes(message.payload), bool(message.retain)))

    def count(self, topic: str, payload: bytes) -> int:
        with self.lock:
            return sum(1 for t, p, _ in self.got if (t, p) == (topic, payload))

    def received(self, topic: str) -> list[tuple[bytes, bool]]:
        with self.lock:
            return [(p, r) for t, p, r in self.got if t == topic]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def die(self) -> None:
        """Drop the connection without a DISCONNECT, as a killed process does: the broker sends the Last Will."""
        self.client.loop_stop()
        sock = self.client.socket()
        if sock is not None:
            sock.close()


class Federation:
    def __init__(self, tmp_path, count: int = 3):
        self.login = make_credentials(tmp_path / "login", PEERS)
        self.passwords = {p: read_env_file(self.login.env_file(p))["FL_PASSWORD"] for p in PEERS}
        self.brokers = bridged_brokers(count, tmp_path / "run", "sd", self.login.broker_login())
        for broker in self.brokers:
            broker.start()
        self.clients: list[Client] = []

    def client(self, peer: str, broker: int, will: tuple[str, bytes] | None = None) -> Client:
        client = Client(self.brokers[broker], peer, self.passwords[peer], will)
        self.clients.append(client)
        return client

    def wait_bridged(self, listeners: list[Client]) -> None:
        """Until a message from each listener's broker reaches every listener (the bridges are up)."""
        for n, sender in enumerate(listeners):
            topic = f"sd/probe/init/{sender.user}"

            def everyone_heard(n=n, sender=sender, topic=topic) -> bool:
                payload = f"probe {n}".encode()
                if any(c.count(topic, payload) == 0 for c in listeners if c is not sender):
                    sender.publish(topic, payload)
                    time.sleep(0.2)
                    return False
                return True

            wait_until(everyone_heard, f"the bridges to carry {sender.user}'s probe")

    def close(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except Exception:  # noqa: BLE001 (a dead client's close may fail; the brokers must still go)
                pass
        for broker in self.brokers:
            broker.close()


@pytest.fixture
def federation(tmp_path):
    net = Federation(tmp_path)
    yield net
    net.close()


def test_the_brokers_form_a_tree_with_the_root_s_stand_in_as_second_parent(tmp_path):
    brokers = bridged_brokers(4, tmp_path)
    assert [b.name for b in brokers] == ["broker-1", "broker-2", "broker-3", "broker-4"]
    assert brokers[0].uplink is None
    assert brokers[1].uplink is not None and brokers[1].uplink.addresses == (brokers[0].address,)
    for spoke in brokers[2:]:
        assert spoke.uplink is not None and spoke.uplink.addresses == (brokers[0].address, brokers[1].address)
    assert all(b.log_path == tmp_path / "brokers" / f"{b.name}.log" for b in brokers)


def test_every_client_of_every_broker_gets_each_message_once_and_never_its_own(federation):
    clients = [federation.client(peer, k) for k, peer in enumerate(PEERS)]
    federation.wait_bridged(clients)
    for sender in clients:
        sender.publish(f"sd/r/init/{sender.user}", b"hello")
        sender.publish(f"sd/r/init/{sender.user}", b"end")
    for client in clients:
        others = [c for c in clients if c is not client]
        wait_until(lambda: all(client.count(f"sd/r/init/{o.user}", b"end") for o in others), f"{client.user}'s ends")
    for client in clients:
        for other in clients:
            expected = 0 if other is client else 1
            assert client.count(f"sd/r/init/{other.user}", b"hello") == expected, (client.user, other.user)
            assert client.count(f"sd/r/init/{other.user}", b"end") == expected


def test_retained_messages_and_last_wills_reach_every_broker_once(federation):
    listeners = [federation.client("peer-1", 0), federation.client("peer-2", 1)]
    presence = "sd/r/presence/peer-3"
    dying = federation.client("peer-3", 2, will=(presence, b"offline"))
    federation.wait_bridged([*listeners, dying])
    dying.publish(presence, b"online", retain=True)
    for listener in listeners:
        wait_until(lambda: listener.count(presence, b"online"), f"{listener.user} to hear peer-3 online")
    dying.die()
    for listener in listeners:
        wait_until(lambda: listener.count(presence, b"offline"), f"{listener.user} to get peer-3's Last Will")
    # A marker after the Will, on the same paths: once it is in, any copy of the Will would be too.
    witness = federation.client("peer-3", 2)
    witness.publish("sd/r/init/peer-3", b"after the will")
    for listener in listeners:
        wait_until(lambda: listener.count("sd/r/init/peer-3", b"after the will"), f"{listener.user}'s marker")
        assert listener.count(presence, b"online") == 1 and listener.count(presence, b"offline") == 1
    # The Will is retained on every broker: a client subscribing anywhere later gets it once, as retained.
    for k in range(3):
        late = federation.client("peer-1", k)
        wait_until(lambda: late.received(presence), f"the retained Will on broker-{k + 1}")
        time.sleep(0.2)  # (the retained message comes with the subscription: nothing more is on its way)
        assert late.received(presence) == [(b"offline", True)]


def test_the_per_peer_acl_holds_on_every_broker(federation):
    clients = [federation.client(peer, k) for k, peer in enumerate(PEERS)]
    federation.wait_bridged(clients)
    for k, impostor in enumerate(clients):
        victim = PEERS[(k + 1) % 3]
        impostor.publish(f"sd/r/init/{victim}", b"forged")  # the broker takes it and drops it: not authorised
        impostor.publish(f"sd/r/init/{impostor.user}", b"own")
    for client in clients:
        others = [c for c in clients if c is not client]
        wait_until(lambda: all(client.count(f"sd/r/init/{o.user}", b"own") for o in others), f"{client.user}'s own")
        assert all(client.count(f"sd/r/init/{peer}", b"forged") == 0 for peer in PEERS)
    # A wrong password and an anonymous client are refused on every broker.
    for broker in federation.brokers:
        assert connack(broker, "peer-1", "wrong-password") == "Not authorized"
        assert connack(broker, None, None) == "Not authorized"


def connack(broker: Broker, user: str | None, password: str | None) -> str:
    """The broker's answer to a login, in paho's words."""
    answer: list[str] = []
    done = threading.Event()
    client = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    if user is not None:
        client.username_pw_set(user, password)

    def on_connect(c, userdata, flags, reason_code, properties):
        answer.append(str(reason_code))
        done.set()

    client.on_connect = on_connect
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        assert done.wait(WAIT_S), f"no answer from {broker.name}"
    finally:
        client.disconnect()
        client.loop_stop()
    return answer[0]


def test_when_the_root_broker_is_killed_the_others_join_up_under_its_stand_in(federation):
    two, three = federation.client("peer-2", 1), federation.client("peer-3", 2)
    federation.wait_bridged([two, three])
    root = federation.brokers[0].proc
    assert root is not None
    root.kill()
    root.wait()
    # broker-3's bridge moves to broker-2 (after mosquitto's restart_timeout): messages flow again, each once.
    sent = itertools.count()

    def bridged_again() -> bool:
        three.publish("sd/r/init/peer-3", f"after {next(sent)}".encode())
        time.sleep(0.2)
        return bool(two.received("sd/r/init/peer-3"))

    wait_until(bridged_again, "broker-3 to bridge to broker-2")
    two.publish("sd/r/init/peer-2", b"from two")
    three.publish("sd/r/init/peer-3", b"from three")
    wait_until(lambda: three.count("sd/r/init/peer-2", b"from two"), "peer-2's message on broker-3")
    wait_until(lambda: two.count("sd/r/init/peer-3", b"from three"), "peer-3's message on broker-2")
    two.publish("sd/r/init/peer-2", b"end")
    wait_until(lambda: three.count("sd/r/init/peer-2", b"end"), "the end marker")
    assert three.count("sd/r/init/peer-2", b"from two") == 1 and two.count("sd/r/init/peer-3", b"from three") == 1
