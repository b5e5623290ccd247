"""The container broker's login and ACL, checked against a real Mosquitto on this machine.

broker/mosquitto.conf is written for the broker image (login files under /etc/sdfl/login); here a copy points at a
temp folder and a free loopback port, with the login made by scripts.up.make_credentials exactly as a real network
gets it (one login per peer, hashed by the launcher itself). MQTT v5 is used so that refusals come back as reason codes instead of silence.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from scripts.up.compose import compose_config
from scripts.up.logins import make_credentials
from scripts.up.network import Network

paho = pytest.importorskip("paho.mqtt.client")
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MOSQUITTO = shutil.which("mosquitto") or next(
    (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.access(p, os.X_OK)), None
)

pytestmark = pytest.mark.skipif(
    MOSQUITTO is None or shutil.which("mosquitto_passwd") is None,
    reason="needs the mosquitto package (mosquitto, mosquitto_passwd)",
)

WAIT = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_env(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


class Broker:
    def __init__(self, port: int, peer_password: str, health_password: str, other_password: str):
        self.port = port
        self.peer_password = peer_password  # peer-1's
        self.health_password = health_password
        self.other_password = other_password  # peer-2's


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    work = tmp_path_factory.mktemp("broker")
    # The login exactly as a real network gets it (scripts/up.py, make_credentials).
    login = make_credentials(work / "login", ["peer-1", "peer-2", "peer-3"])
    creds = read_env(login.env_file("peer-1"))
    health = read_env(login.health_env)

    port = free_port()
    conf = (ROOT / "broker" / "mosquitto.conf").read_text()
    assert re.search(r"^listener 1883$", conf, re.M)
    conf = re.sub(r"^listener 1883$", f"listener {port} 127.0.0.1", conf, flags=re.M)
    assert "/etc/sdfl/login/" in conf
    conf = conf.replace("/etc/sdfl/login/", f"{login.folder}/")
    if os.geteuid() == 0:
        # As root, Mosquitto drops to the mosquitto user before reading the login files; in the container they are
        # mounted where it can read them, here they sit in a private temporary folder, so stay root.
        conf += "\nuser root\n"
    conf_path = work / "test.conf"
    conf_path.write_text(conf)
    log = open(work / "mosquitto.log", "w")
    proc = subprocess.Popen([MOSQUITTO, "-c", str(conf_path)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + WAIT
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mosquitto exited: {(work / 'mosquitto.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("mosquitto did not open its port")
                time.sleep(0.05)
        assert creds["FL_USERNAME"] == "peer-1"
        broker = Broker(
            port,
            creds["FL_PASSWORD"],
            health["MQTT_HEALTH_PASSWORD"],
            read_env(login.env_file("peer-2"))["FL_PASSWORD"],
        )
        broker.logins = {peer: read_env(login.env_file(peer)) for peer in ("peer-1", "peer-2", "peer-3")}
        yield broker
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Client:
    """A paho client driven synchronously: each call waits for the broker's answer."""

    def __init__(self, broker: Broker, username: str | None, password: str | None):
        self.client = paho.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=f"test-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if username is not None:
            self.client.username_pw_set(username, password)
        self.connected = threading.Event()
        self.connack = None
        self.acks: dict[int, object] = {}
        self.acked = threading.Condition()
        self.messages: list[tuple[str, bytes]] = []
        self.got_message = threading.Condition()
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_ack
        self.client.on_subscribe = self._on_ack
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port, keepalive=30)
        self.client.loop_start()
        assert self.connected.wait(WAIT), "no CONNACK"

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        self.connack = reason_code
        self.connected.set()
        if reason_code.is_failure:
            client.disconnect()

    def _on_ack(self, client, userdata, mid, reason_code, properties):
        with self.acked:
            self.acks[mid] = reason_code
            self.acked.notify_all()

    def _on_message(self, client, userdata, message):
        with self.got_message:
            self.messages.append((message.topic, message.payload))
            self.got_message.notify_all()

    def _wait_ack(self, mid):
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, WAIT), "no acknowledgement"
            return self.acks[mid]

    def subscribe(self, topic):
        _, mid = self.client.subscribe(topic, qos=1)
        return self._wait_ack(mid)

    def publish(self, topic, payload, retain=False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return self._wait_ack(info.mid)

    def wait_message(self, topic, timeout=WAIT):
        with self.got_message:
            self.got_message.wait_for(lambda: any(t == topic for t, _ in self.messages), timeout)
            return [p for t, p in self.messages if t == topic]

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def clients():
    made = []

    def make(broker, username, password):
        c = Client(broker, username, password)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_anonymous_connect_is_refused(broker, clients):
    assert clients(broker, None, None).connack.is_failure


def test_wrong_password_is_refused(broker, clients):
    assert clients(broker, "peer-1", "not-the-password").connack.is_failure
    assert clients(broker, "intruder", broker.peer_password).connack.is_failure
    # Each peer has a login of its own: one peer's password opens no other's.
    assert clients(broker, "peer-2", broker.peer_password).connack.is_failure
    assert not clients(broker, "peer-2", broker.other_password).connack.is_failure


def test_peer_publishes_and_subscribes_on_federation_topics(broker, clients):
    sub = clients(broker, "peer-2", broker.other_password)
    pub = clients(broker, "peer-1", broker.peer_password)
    assert not sub.connack.is_failure
    assert not sub.subscribe("sd/#")[0].is_failure
    # Four times the peers' ~250 KB model, well inside the 16 MB limit.
    model = os.urandom(1024 * 1024)
    assert not pub.publish("sd/run-a/solution/peer-1", model).is_failure
    assert sub.wait_message("sd/run-a/solution/peer-1") == [model]
    # Retained state (presence, aggregation, finish) reaches a peer that subscribes later.
    assert not pub.publish("sd/run-a/presence/peer-1", b"online", retain=True).is_failure
    late = clients(broker, "peer-2", broker.other_password)
    late.subscribe("sd/run-a/presence/+")
    assert late.wait_message("sd/run-a/presence/peer-1") == [b"online"]
    pub.publish("sd/run-a/presence/peer-1", b"", retain=True)


def test_a_peer_cannot_publish_as_another_peer(broker, clients):
    # The ACL: a login publishes only on topics whose last level (the sender) is itself.
    peer = clients(broker, "peer-1", broker.peer_password)
    for topic in (
        "sd/run-a/finish/peer-2",
        "sd/run-a/presence/peer-2",
        "sd/run-a/solution/peer-3",
        "sd/run-a/solution/peer-3/0",
        "sd/run-a/solution/peer-1/0/1",
        "sd/solution",
    ):
        assert peer.publish(topic, b"x").is_failure, topic
    # the chunks of its own large model (<topic>/<i>) are its to publish
    assert not peer.publish("sd/run-a/solution/peer-1/0", b"x").is_failure


def test_a_peers_session_cannot_be_taken_over_without_its_password(broker, clients):
    # use_username_as_clientid: the client id is the login's, whatever the client asks for, so connecting with
    # peer-1's client id under another login does not kick peer-1 off.
    victim = clients(broker, "peer-1", broker.peer_password)
    lost = threading.Event()
    victim.client.on_disconnect = lambda *args: lost.set()
    intruder = paho.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id="peer-1", protocol=paho.MQTTv5)
    intruder.username_pw_set("peer-2", broker.other_password)
    intruder.connect("127.0.0.1", broker.port)
    intruder.loop_start()
    try:
        assert not lost.wait(1.5)
        assert not victim.publish("sd/run-a/heartbeat/peer-1", b"x").is_failure
    finally:
        intruder.disconnect()
        intruder.loop_stop()


def test_peer_cannot_publish_outside_federation_topics(broker, clients):
    peer = clients(broker, "peer-1", broker.peer_password)
    for topic in ("other/topic", "sdx/training", "$SYS/broker/uptime"):
        assert peer.publish(topic, b"x").is_failure, topic


def test_peer_cannot_read_outside_federation_topics(broker, clients):
    # Mosquitto 2.0 grants the subscription and filters on delivery, so the proof is that nothing arrives while
    # the health user, allowed to, gets the same retained value at once.
    health = clients(broker, "health", broker.health_password)
    health.subscribe("$SYS/broker/uptime")
    assert health.wait_message("$SYS/broker/uptime")
    peer = clients(broker, "peer-1", broker.peer_password)
    peer.subscribe("$SYS/#")
    peer.subscribe("#")
    assert peer.wait_message("$SYS/broker/uptime", timeout=1.5) == []


def test_health_user_cannot_touch_federation_topics(broker, clients):
    health = clients(broker, "health", broker.health_password)
    assert health.publish("sd/run-a/training/health", b"x").is_failure


def compose_healthcheck(tmp_path: Path) -> str:
    net = Network(project="t", run_dir=tmp_path, peers=["peer-1", "peer-2"], total=2)
    compose = compose_config(net)
    test = compose["services"]["broker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    # Compose turns $$ into $ before handing the command to the container's shell.
    return test[1].replace("$$", "$")


@pytest.mark.skipif(shutil.which("mosquitto_sub") is None, reason="needs mosquitto_sub (mosquitto-clients)")
def test_compose_healthcheck_logs_in_for_real(broker, tmp_path):
    command = compose_healthcheck(tmp_path)
    assert "-p 1883" in command
    command = command.replace("-p 1883", f"-p {broker.port}")
    ok = subprocess.run(
        ["sh", "-c", command],
        env={**os.environ, "MQTT_HEALTH_PASSWORD": broker.health_password},
        capture_output=True,
        timeout=30,
    )
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        ["sh", "-c", command], env={**os.environ, "MQTT_HEALTH_PASSWORD": "wrong"}, capture_output=True, timeout=30
    )
    assert bad.returncode != 0
    # The same command with the peer's login must fail too: the ACL gives the healthcheck topic to health only.
    # (-W 1: the refusal shows as a timeout, no need to wait the healthcheck's full 5 s for it.)
    as_peer = re.sub(r"-W \d+", "-W 1", command.replace("-u health", "-u peer-1"))
    denied = subprocess.run(
        ["sh", "-c", as_peer],
        env={**os.environ, "MQTT_HEALTH_PASSWORD": broker.peer_password},
        capture_output=True,
        timeout=30,
    )
    assert denied.returncode != 0, shlex.quote(as_peer)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION.is_dir(), reason=f"needs the Fashion-MNIST files in {FASHION} (no download here)")
def test_peers_complete_a_run_behind_the_login_and_acl(broker, tmp_path):
    # The real peers, logged in as the containers are, on the container broker's ACL: any topic outside sd/#
    # (or a Last Will or retained message the ACL refused) would stall the run instead of finishing it.
    from scripts.localnet import LocalNetwork

    class Address:
        address = f"127.0.0.1:{broker.port}"

    # Each peer logs in as itself, as in containers: the ACL lets it publish only as itself.
    env = {
        "FL_DATASET": "fashion-mnist",
        "FL_MIN_PEERS": "3",
        "FL_MAX_ROUNDS": "2",
        "FL_TRAIN_SAMPLES": "200",
        "FL_TEST_SAMPLES": "100",
    }
    net = LocalNetwork(
        tmp_path / "run", peers=3, broker=Address(), env=env, python=sys.executable, peer_env=broker.logins
    )
    with net:
        codes = net.wait(180)
    assert codes == {"peer-1": 0, "peer-2": 0, "peer-3": 0}, {p: net.peer_log(p)[-2000:] for p in codes}
    rounds = (tmp_path / "run" / "rounds.csv").read_text().splitlines()
    assert len(rounds) == 3, rounds
