"""The MQTT transport against real mosquitto brokers on free ports: several brokers of one federation given in a list,
the first reachable one used, the next one taken when it is lost, subscriptions renewed there."""

from __future__ import annotations

import queue

import pytest

from peer.node.transport import Connected, Disconnected, Inbound, MqttTransport
from scripts.localnet import Broker, find_mosquitto, free_port
from tests.netutil import wait_until

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto broker")

WAIT_S = 30  # generous: a loaded machine may be slow to connect, never this slow
TOPIC = "sd/t/init/"


def next_event(events: queue.Queue, kind: type, timeout: float = WAIT_S):
    """The next event of `kind`, skipping others; fails if none comes within `timeout`."""
    seen = []
    while True:
        try:
            event = events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no {kind.__name__} within {timeout} s (saw {seen})") from None
        if isinstance(event, kind):
            return event
        seen.append(event)


def said_until_heard(sender: MqttTransport, topic: str, payload: bytes, events: queue.Queue) -> Inbound:
    """`sender` publishes `payload` every half second until an Inbound reaches `events` (which it returns)."""

    def said_and_heard() -> Inbound | None:
        sender.publish(topic, payload)
        try:
            return next_event(events, Inbound, timeout=0.5)
        except AssertionError:
            return None

    return wait_until(said_and_heard, WAIT_S, f"a publication on {topic} to be heard", interval=0)


def transport(name: str, brokers: list[Broker | int]) -> tuple[MqttTransport, queue.Queue]:
    events: queue.Queue = queue.Queue()
    hosts = [("127.0.0.1", b.port if isinstance(b, Broker) else b) for b in brokers]
    t = MqttTransport(hosts, name, [("sd/t/#", True)], events, keepalive=5)
    t.start(f"sd/t/presence/{name}", b"offline")
    return t, events


def test_the_first_reachable_broker_of_the_list_is_used():
    nobody = free_port()  # nothing listens there
    with Broker() as second:
        t, events = transport("a", [nobody, second])
        try:
            connected = next_event(events, Connected)
            assert connected.broker == second.address == t.broker
        finally:
            t.close()


def test_a_lost_broker_is_left_for_the_next_one_where_subscriptions_are_renewed():
    first, second = Broker().start(), Broker().start()
    a, a_events = transport("a", [first, second])
    b, b_events = transport("b", [first, second])
    try:
        assert next_event(a_events, Connected).broker == first.address
        assert next_event(b_events, Connected).broker == first.address
        assert first.proc is not None
        first.proc.kill()  # SIGKILL: no goodbye, the connections reset
        first.proc.wait()
        lost = next_event(a_events, Disconnected)
        assert (lost.broker, lost.next_broker) == (first.address, second.address)
        assert next_event(a_events, Connected).broker == second.address
        assert next_event(b_events, Connected).broker == second.address
        # Both subscribed again on the second broker: a message of one reaches the other, not itself (no_local).
        # b's Connected comes once it has asked to subscribe there, but the broker may handle a's publication first
        # (the packets of two clients have no order between them): a says hello until b hears it.
        inbound = said_until_heard(a, TOPIC + "a", b"hello from a", b_events)
        assert (inbound.topic, inbound.payload) == (TOPIC + "a", b"hello from a")
        b.publish(TOPIC + "b", b"hello from b")  # (a's subscription came before its hello: it is there)
        assert next_event(a_events, Inbound).payload == b"hello from b"
        assert all(not isinstance(e, Inbound) or e.topic != TOPIC + "a" for e in list(a_events.queue))
    finally:
        a.close()
        b.close()
        first.close()
        second.close()


def test_a_single_broker_is_tried_again_and_closing_says_no_disconnection():
    with Broker() as only:
        t, events = transport("a", [only])
        try:
            assert next_event(events, Connected).broker == only.address
            only.restart(pause=0.2)
            lost = next_event(events, Disconnected)
            assert lost.broker == lost.next_broker == only.address
            assert next_event(events, Connected).broker == only.address
        finally:
            t.close()
        assert not any(isinstance(e, Disconnected) for e in list(events.queue))


def test_closing_while_no_broker_answers_returns():
    t, events = transport("a", [free_port(), free_port()])
    t.close(timeout=2)  # must not hang trying the list
    assert not t.connected
