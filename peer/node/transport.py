"""The MQTT adapter: the one module that talks to paho-mqtt.

paho runs its network loop in its own thread and calls our callbacks there. An exception in a callback kills that
thread silently, and waiting in one deadlocks it, so the callbacks only put events on a queue; the peer's worker
does everything else. paho reconnects by itself (the broker restarted, the network blipped); after each connect we
subscribe again and tell the worker, which announces the peer again.

Given several brokers (bridged, or nodes of one cluster), the transport connects to the first it reaches and, when
it loses that one or cannot reach it, moves to the next in the list (round the list, for ever): a broker killed
outright is noticed at once (the connection resets), a hung one after paho's keepalive, and the next broker is tried
within the reconnect delay (0.2 s, doubling up to 2 s while none answers). The session starts clean on every
broker; paho sends again the QoS 1 messages the lost broker had not acknowledged, and the copies a bridge may have
passed on already are dropped by the receivers' replay guard (peer.wire.session).
"""

from __future__ import annotations

import queue
import socket
import ssl
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
    broker: str  # HOST:PORT of the broker this connection is to


@dataclass(frozen=True)
class Disconnected:
    reason: str
    broker: str  # the broker lost
    next_broker: str  # the broker tried next (the same one when there is only one)


@dataclass(frozen=True)
class BrokerRefused:
    """The broker refused the connection, or (`tls`) this peer refused the broker's certificate; `fatal`: retrying
    cannot help (bad login, not authorised, banned, a certificate not trusted)."""

    reason: str
    fatal: bool
    tls: bool = False


class _CheckedSocket(ssl.SSLSocket):
    """A TLS socket that tells its context's `on_untrusted` why a broker's certificate was refused: paho retries any
    failed connection for ever, but a certificate this peer does not trust will not become trusted by retrying."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except ssl.SSLCertVerificationError as err:
            report = getattr(self.context, "on_untrusted", None)
            if report is not None:
                report(err.verify_message or err.reason or str(err))
            raise


def untrusted_broker(brokers: Sequence[tuple[str, int]], tls: ssl.SSLContext, timeout: float = 3.0) -> str | None:
    """Why the first broker of `brokers` that answers with a TLS certificate this peer does not trust, or without TLS,
    is refused (None: every broker that answered is trusted; one that does not answer is the transport's to retry).
    A peer asks once at start, so a wrong --tls-ca or port is said in one line before anything else happens."""
    for host, port in brokers:
        try:
            raw = socket.create_connection((host, port), timeout=timeout)
        except OSError:
            continue  # not there (yet): the transport tries again
        try:
            with tls.wrap_socket(raw, server_hostname=host):
                pass
        except ssl.SSLCertVerificationError as err:
            return f"broker {host}:{port} presents a TLS certificate this peer does not trust ({err.verify_message})"
        except (ssl.SSLError, ConnectionError) as err:  # e.g. a plain MQTT listener: it answers, but not in TLS
            why = err.reason if isinstance(err, ssl.SSLError) else "it closed the connection"
            return f"broker {host}:{port} does not speak TLS there ({why or err})"
        except OSError:
            continue
        finally:
            raw.close()
    return None


def _expiry(packet_type: int, seconds: int | None) -> Properties | None:
    if not seconds:
        return None
    props = Properties(packet_type)
    props.MessageExpiryInterval = seconds
    return props


def address(broker: tuple[str, int]) -> str:
    return f"{broker[0]}:{broker[1]}"


class MqttTransport:
    def __init__(
        self,
        brokers: Sequence[tuple[str, int]],
        client_id: str,
        subscriptions: list[tuple[str, bool]],
        events: queue.Queue,
        keepalive: int = 5,
        username: str | None = None,
        password: str | None = None,
        tls: ssl.SSLContext | None = None,
    ):
        """`brokers`: (host, port) of every broker of the federation, in the order to try them. `subscriptions`:
        (topic filter, no_local) pairs; no_local: the broker does not send our own messages back. `tls`: connect
        over TLS with this context (its own: the transport has it report untrusted certificates)."""
        if not brokers:
            raise ValueError("a transport needs at least one broker")
        self.brokers, self.keepalive = list(brokers), keepalive
        self.current = 0  # index in `brokers` of the broker connected to, or being tried
        self._closing = False
        self.events = events
        self.subscriptions: dict[str, bool] = dict(subscriptions)  # renewed on every connect
        self._connected = threading.Event()

        self._disconnected = threading.Event()
        self.client = mqtt.Client(
            callback_api_version=mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        if username:
            self.client.username_pw_set(username, password)
        if tls is not None:
            tls.sslsocket_class = _CheckedSocket
            tls.on_untrusted = self._on_untrusted  # type: ignore[attr-defined]  # read by _CheckedSocket
            self.client.tls_set_context(tls)
        self.client.reconnect_delay_set(min_delay=0.2, max_delay=2)  # type: ignore[arg-type]  # paho takes floats
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    @property
    def broker(self) -> str:
        """HOST:PORT of the broker connected to, or being tried."""
        return address(self.brokers[self.current])

    def _move_on(self) -> None:
        """Aim paho's next reconnect at the next broker of the list (paho's thread, between two attempts: its
        connect_async only records where to connect; the loop's reconnect does it after the reconnect delay)."""
        if len(self.brokers) > 1 and not self._closing:
            self.current = (self.current + 1) % len(self.brokers)
            host, port = self.brokers[self.current]
            self.client.connect_async(host, port, keepalive=self.keepalive, clean_start=True)

    # --- paho callbacks (paho's thread: hand over, never block, never raise) ----------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.events.put(BrokerRefused(str(reason_code), reason_code.value in FATAL_REFUSALS))
            return
        self._subscribe(list(self.subscriptions.items()))
        self._connected.set()
        self.events.put(Connected(self.broker))

    def _on_untrusted(self, why: str) -> None:
        self.events.put(
            BrokerRefused(f"{self.broker} presents a TLS certificate this peer does not trust ({why})", True, tls=True)
        )

    def _on_connect_fail(self, client, userdata):
        self._move_on()  # not reachable (refused, no route): the next broker, after the reconnect delay

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        self._disconnected.set()
        lost = self.broker
        self._move_on()
        if not self._closing:
            self.events.put(Disconnected(str(reason_code), lost, self.broker))

    def _on_message(self, client, userdata, message):
        self.events.put(Inbound(message.topic, message.payload, bool(message.retain)))

    # --- used by the peer's worker ----------------------------------------------------------------------------------

    def start(self, will_topic: str | None, will_payload: bytes = b"", will_expiry: int | None = None) -> None:
        """Connect in the background (retrying until the broker answers) with a retained Last Will (None: none, for
        a client that is no peer, e.g. a recorder)."""
        if will_topic is not None:
            self.client.will_set(
                will_topic, will_payload, qos=1, retain=True, properties=_expiry(PacketTypes.WILLMESSAGE, will_expiry)
            )
        host, port = self.brokers[self.current]
        self.client.connect_async(host, port, keepalive=self.keepalive, clean_start=True)
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
        self._closing = True  # no moving on to another broker from here
        if self.connected:
            self._disconnected.clear()
            self.client.disconnect()
            # Stopping the loop before paho has sent DISCONNECT would drop the connection instead, and the broker
            # would then publish our Last Will ("offline") after we cleared our presence.
            self._disconnected.wait(timeout)
        self.client.loop_stop()
