"""The MQTT adapter: the one module that talks to paho-mqtt.

paho runs its network loop in its own thread and calls our callbacks there. An exception in a callback kills that
thread silently, and waiting in one deadlocks it, so the callbacks only put events on a queue; the peer's worker
does everything else. paho reconnects by itself (the broker restarted, the network blipped); after each connect we
subscribe again and tell the worker, which announces the peer again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

# Refusals that retrying cannot fix (MQTT v5 reason codes): bad credentials, not authorised, banned.
FATAL_REFUSALS = {134, 135, 138, 140}


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True)
class Connected:
    pass


@dataclass(frozen=True)
class Disconnected:
    reason: str


@dataclass(frozen=True)
class BrokerRefused:
    """The broker refused the connection; `fatal`: retrying cannot help (bad login, not authorised, banned)."""

    reason: str
    fatal: bool


def _expiry(packet_type: int, seconds: int | None) -> Properties | None:
    if not seconds:
        return None
    props = Properties(packet_type)
    props.MessageExpiryInterval = seconds
    return props


class MqttTransport:
    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        subscriptions: list[tuple[str, bool]],
        events: queue.Queue,
        keepalive: int = 5,
        username: str | None = None,
        password: str | None = None,
    ):
        """`subscriptions`: (topic filter, no_local) pairs; no_local: the broker does not send our own messages back."""
        self.host, self.port, self.keepalive = host, port, keepalive
        self.events = events
        self.subscriptions: dict[str, bool] = dict(subscriptions)  # renewed on every connect
        self._connected = threading.Event()

        self._disconnected = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if username:
            self.client.username_pw_set(username, password)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=2)  # type: ignore[arg-type]  # paho takes floats
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    # --- paho callbacks (paho's thread: hand over, never block, never raise) ----------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.events.put(BrokerRefused(str(reason_code), reason_code.value in FATAL_REFUSALS))
            return
        self._subscribe(list(self.subscriptions.items()))
        self._connected.set()
        self.events.put(Connected())

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        self._disconnected.set()
        self.events.put(Disconnected(str(reason_code)))

    def _on_message(self, client, userdata, message):
        self.events.put(Inbound(message.topic, message.payload, bool(message.retain)))

    # --- used by the peer's worker ----------------------------------------------------------------------------------

    def start(self, will_topic: str, will_payload: bytes, will_expiry: int | None = None) -> None:
        """Connect in the background (retrying until the broker answers) with a retained Last Will."""
        self.client.will_set(
            will_topic, will_payload, qos=1, retain=True, properties=_expiry(PacketTypes.WILLMESSAGE, will_expiry)
        )
        self.client.connect_async(self.host, self.port, keepalive=self.keepalive, clean_start=True)
        self.client.loop_start()

    def _subscribe(self, pairs: list[tuple[str, bool]]) -> None:
        # retainHandling 0: the broker sends the retained messages at every subscribe, also of a filter we hold
        # already, which is how `fetch_retained` gets them again.
        if pairs:
            self.client.subscribe(
                [(topic, SubscribeOptions(qos=1, noLocal=no_local, retainHandling=0)) for topic, no_local in pairs]
            )

    def subscribe(self, pairs: list[tuple[str, bool]]) -> None:
        """Add subscriptions (kept across reconnects)."""
        self.subscriptions.update(pairs)
        if self.connected:
            self._subscribe(pairs)

    def unsubscribe(self, topics: list[str]) -> None:
        for topic in topics:
            self.subscriptions.pop(topic, None)
        if self.connected and topics:
            self.client.unsubscribe(list(topics))

    def fetch_retained(self, topic: str) -> None:
        """Have the broker send the retained messages under a filter we subscribe to once more."""
        if self.connected and topic in self.subscriptions:
            self._subscribe([(topic, self.subscriptions[topic])])

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def publish(self, topic: str, payload: bytes, retain: bool = False, expiry: int | None = None):
        return self.client.publish(
            topic, payload, qos=1, retain=retain, properties=_expiry(PacketTypes.PUBLISH, expiry)
        )

    def publish_paced(self, messages, retain: bool = False, expiry: int | None = None, timeout: float = 30.0) -> None:
        """Publish (topic, payload) pairs from an iterator, the next one only once the broker has the one before
        last: the chunks of a large model are made and held two at a time, not all at once in paho's queue. Gives up
        waiting (and just queues the rest) after `timeout` seconds in all, or when the connection is lost."""
        deadline = time.monotonic() + timeout
        sent = []
        for topic, payload in messages:
            sent.append(self.publish(topic, payload, retain, expiry))
            while len(sent) >= 2 and not sent[-2].is_published() and self.connected and time.monotonic() < deadline:
                try:
                    sent[-2].wait_for_publish(0.05)
                except (RuntimeError, ValueError):
                    break  # not connected: paho queues the rest, as for any message

    def close(self, last: Sequence[tuple[str, bytes, bool]] = (), timeout: float = 5.0) -> None:
        """Publish the last messages, wait (bounded) until the broker has them, and disconnect cleanly, which
        tells the broker not to send the Last Will."""
        infos = [self.publish(topic, payload, retain) for topic, payload, retain in last] if self.connected else []
        for info in infos:
            try:
                info.wait_for_publish(timeout)
            except (RuntimeError, ValueError):
                pass  # not connected any more: nothing more can be delivered
        if self.connected:
            self._disconnected.clear()
            self.client.disconnect()
            # Stopping the loop before paho has sent DISCONNECT would drop the connection instead, and the broker
            # would then publish our Last Will ("offline") after we cleared our presence.
            self._disconnected.wait(timeout)
        self.client.loop_stop()
