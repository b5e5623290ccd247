"""The wire session, sans-IO (as h11's `Connection`): what arrives becomes messages, what is sent becomes frames.

`Inbox.receive(topic, payload, retained, now)` takes one MQTT publication as it came off the broker and answers
`Delivered` (a whole, signed, fresh, decoded message and what it cost), `Pending` (a chunk is in, its message waits
for more) or `Refused` (why not, in one line). In that order it: finds the run's topic and its sender, opens the
envelope (the federation secret's MAC over the topic), puts chunks back together (only message kinds that carry
weights may be chunked, and only from senders the node's `ChunkGate` entitles: a chunk costs no memory before
both are known), decodes and validates the message (it must name the sender its topic names), and asks the
`ReplayGuard` whether it is fresh. A peer and the live page's observer receive through the same Inbox, so the page
trusts exactly what a peer trusts and sees every message a peer sees, chunked ones included.

`Outbox.frames(message, retain)` turns a message into the (topic, payload, retain) frames to publish: one sealed
envelope, or, for a body larger than the broker takes, one per chunk (made lazily, so a large model is never held
twice), followed by the clearing of stale retained chunks. `Outbox.cost(message)` is what a message puts on the
wire, without encoding its weights: the controller counts a round's bytes with it.

No I/O, no clock, no threads: the caller passes `now` (wall-clock seconds: the age check compares it with the
sender's clock) and publishes the frames.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from peer.wire.chunks import CHUNK_HEAD_SIZE, Complete, Pending, Reassembler, chunk_count, is_chunk, split
from peer.wire.envelope import MIN_CHUNKED_MESSAGE_BYTES, Seal, Stamp, Stamper, chunk_limit, sealed_size, wire_size
from peer.wire.errors import ProtocolError, Refused
from peer.wire.messages import Message, decode, encode_parts, encoded_size
from peer.wire.topics import Topics
from peer.wire.weights import MAX_WEIGHT_BYTES

MAX_AGE_S = 120.0  # a live message sent longer ago than this (its sender's clock against ours) is a replay
CHUNK_TIMEOUT_S = 60.0  # a chunked message whose next chunk is this late is dropped (the round logic retries)
CHUNKED_KINDS = frozenset(
    {"training", "solution", "aggregation", "server-state"}
)  # the kinds whose messages carry weights
# The fewest data bytes in a peer's chunk (all but a message's last): what a chunk holds under the smallest broker
# limit a peer works with (--max-message-bytes), sealed. A sender of smaller ones is no peer.
MIN_CHUNK_DATA = chunk_limit(MIN_CHUNKED_MESSAGE_BYTES, True) - CHUNK_HEAD_SIZE
# Whether chunks of (kind, sender, retained) are taken at all: None if so, else why not (the node's admission rules).
ChunkGate = Callable[[str, str, bool], Refused | None]


def _any_sender(kind: str, sender: str, retained: bool) -> Refused | None:
    return None


@dataclass
class ReplayGuard:
    """Whether a signed message is fresh: not a copy of one already seen, not a live message sent long ago. Every
    envelope carries its sender's (incarnation, seq, sent_at): the incarnation names one process, and its seq grows
    with every message that process sends. So a copy (a QoS 1 duplicate, or a capture replayed) repeats a seq already
    seen of that incarnation, and an old capture is too old.

    Each incarnation is judged on its own: a restarted peer and its predecessor, or (for the seconds until one of them
    exits) two processes started with one id, must not silence each other. Presence is exempt from the order and the
    age: the broker publishes a Last Will, signed when its peer connected, only when the peer dies. Retained messages
    are history (delivered when this peer subscribes): exempt from the age, not from the order. Our own messages are
    the node's to judge (an echo, or another process with our id)."""

    me: str
    # (sender, incarnation) -> (highest seq, the seqs seen within WINDOW of it)
    seen: dict[tuple[str, int], tuple[int, set[int]]] = field(default_factory=dict)
    lives: dict[str, list[int]] = field(default_factory=dict)  # sender -> its incarnations seen, newest last

    LIVES_KEPT = 4  # per sender: a peer restarted more often than this within MAX_AGE_S is not worth remembering
    # Messages of one sender may arrive out of order: the broker hands a subscriber the retained messages of several
    # topics (a claim, a heartbeat, the chunks of a model) in no particular order. So a seq below the highest is
    # fresh if it is within WINDOW of it and not seen yet (as IPsec's anti-replay window).
    WINDOW = 4096

    def check(self, kind: str, sender: str, stamp: Stamp, retained: bool, wall_now: float) -> Refused | None:
        if sender == self.me or kind == "presence":
            return None
        key = (sender, stamp.incarnation)
        highest, recent = self.seen.get(key, (0, set()))
        if stamp.seq in recent or stamp.seq <= highest - self.WINDOW or stamp.seq == 0:
            return Refused(f"ignored a copy of {sender}'s message {stamp.seq} (a duplicate or a replay)")
        if not retained and abs(wall_now - stamp.sent_at) > MAX_AGE_S:
            offset = stamp.sent_at - wall_now
            why = (
                f"ignored a {kind} from {sender} sent {-offset:.0f}s ago by its clock: a replay, or clocks more than "
                f"{MAX_AGE_S:.0f}s apart"
            )
            # The newest word of the sender's newest life, off by as much: its clock (or ours) is wrong. An older
            # one is a capture replayed, which says nothing of anyone's clock.
            lives = self.lives.get(sender, [])
            if stamp.seq > highest and (not lives or stamp.incarnation >= max(lives)):
                return OffClock(why, "warning", "clock", sender, offset)
            return Refused(why, "warning")
        if key not in self.seen:
            lives = self.lives.setdefault(sender, [])
            lives.append(stamp.incarnation)
            while len(lives) > self.LIVES_KEPT:
                self.seen.pop((sender, lives.pop(0)), None)
        recent.add(stamp.seq)
        if stamp.seq > highest:
            highest = stamp.seq
            if len(recent) > 2 * self.WINDOW:  # forget what the window has passed
                recent = {seq for seq in recent if seq > highest - self.WINDOW}
        self.seen[key] = (highest, recent)
        return None


@dataclass(frozen=True)
class OffClock(Refused):
    """A live message refused because its sender's clock and ours are further apart than the replay window
    (`offset`: its clock minus ours, seconds): the sender, or this peer, has a wrong clock."""

    sender: str = ""
    offset: float = 0.0


@dataclass(frozen=True)
class Delivered:
    """A message that is whole, signed, fresh and well formed: for the admission rules to route."""

    message: Message
    stamp: Stamp
    retained: bool
    size: int  # the bytes it took on the wire (a chunked message: its body, sealed once)


class Inbox:
    """Publications in, messages out (see the module's doc). Memory is bounded: partial chunked messages hold at most
    two models per sender and four in all; the replay guard a window of sequence numbers per sender life."""

    def __init__(
        self,
        me: str,
        topics: Topics,
        seal: Seal,
        guard: ReplayGuard | None = None,
        reassembler: Reassembler | None = None,
        may_chunk: ChunkGate = _any_sender,
    ):
        self.me, self.topics, self.seal = me, topics, seal
        self.may_chunk = may_chunk
        self.guard = guard or ReplayGuard(me)
        self.reassembler = reassembler or Reassembler(
            MAX_WEIGHT_BYTES + 4096, 4 * MAX_WEIGHT_BYTES, CHUNK_TIMEOUT_S, min_chunk_bytes=MIN_CHUNK_DATA
        )

    def receive(self, topic: str, payload: bytes, retained: bool, now: float) -> Delivered | Pending | Refused:
        """One publication as the broker delivered it; `now` is wall-clock seconds. Never raises on any payload."""
        located = self.topics.locate(topic)
        if located is None:
            return Refused(f"ignored a message on {topic[:120]!r}: not a topic of this run")
        if not payload:  # a cleared retained slot: anyone can send one, and it says nothing
            return Refused(f"ignored an empty payload on {topic}")
        kind, sender, index = located
        try:
            body, stamp = self.seal.open(topic, payload)
            if index is None and not is_chunk(body):
                message = decode(kind, body, sender=sender)
                refusal = self.guard.check(kind, sender, stamp, retained, now)
                return refusal or Delivered(message, stamp, retained, len(payload))
            if index is None or not is_chunk(body):
                raise ProtocolError("a chunk must come on a chunk's topic, and only a chunk")
            if kind not in CHUNKED_KINDS:
                raise ProtocolError(f"a {kind} message is never chunked (only models are)")
            if refusal := self.may_chunk(kind, sender, retained):
                return refusal
            if refusal := self.guard.check(kind, sender, stamp, retained, now):
                return refusal
            result = self.reassembler.offer(sender, stamp.incarnation, kind, body, now)
            if not isinstance(result, Complete):
                return result
            message = decode(kind, result.body, sender=sender)
            return Delivered(message, stamp, retained, sealed_size(len(result.body), self.seal.sealed))
        except ProtocolError as err:
            return Refused(
                f"dropped a malformed message on {topic} ({len(payload)} bytes): {err}", "warning", f"malformed:{kind}"
            )

    def expire(self, now: float) -> list[Refused]:
        """The chunked messages given up because their next chunk is more than CHUNK_TIMEOUT_S late."""
        return self.reassembler.expire(now)


@dataclass(frozen=True)
class Frame:
    """One publication: what the transport hands the broker."""

    topic: str
    payload: bytes
    retain: bool = False
    expiry: int | None = None  # seconds the broker keeps it (MQTT v5 message expiry); None: no expiry


@dataclass(frozen=True)
class Publication:
    """The frames of one message; `chunked`: more than one, to be published paced (two in flight at a time)."""

    frames: Iterator[Frame]
    chunked: bool


class Outbox:
    """Messages in, frames out (see the module's doc). Remembers how many chunks each retained topic's last message
    took, so a later, smaller model leaves no stale chunk behind."""

    def __init__(
        self,
        topics: Topics,
        seal: Seal,
        stamper: Stamper,
        wire_dtype: str = "float32",
        max_message_bytes: int = 16 * 1024 * 1024,
    ):
        self.topics, self.seal, self.stamper = topics, seal, stamper
        self.wire_dtype, self.max_message_bytes = wire_dtype, max_message_bytes
        self.chunks_out: dict[str, int] = {}  # retained topic -> chunks its last message took

    def frames(self, message: Message, retain: bool = False, expiry: int | None = None) -> Publication:
        """The frames that publish `message`. ProtocolError if it is not a valid message (`encode`)."""
        topic = self.topics.of(message)
        parts = encode_parts(message, self.wire_dtype)
        size = sum(memoryview(part).nbytes for part in parts)
        if sealed_size(size, self.seal.sealed) <= self.max_message_bytes:
            frames = [Frame(topic, self._seal(topic, b"".join(parts)), retain, expiry)]
            return Publication(iter(frames + self._stale_chunks(topic, 0, retain)), chunked=False)
        limit = chunk_limit(self.max_message_bytes, self.seal.sealed)
        message_id = self.stamper.seq + 1
        bodies = split(parts, limit, message_id)
        count = chunk_count(size, limit)
        stale = self._stale_chunks(topic, count, retain)

        def chunked() -> Iterator[Frame]:
            for index, body in enumerate(bodies):
                chunk_topic = Topics.chunk(topic, index)
                yield Frame(chunk_topic, self._seal(chunk_topic, body), retain, expiry)
            yield from stale

        return Publication(chunked(), chunked=True)

    def sealed(self, message: Message) -> bytes:
        """`message` as one sealed payload, never chunked (presence and Last Will: small messages only)."""
        topic = self.topics.of(message)
        return self._seal(topic, b"".join(encode_parts(message, self.wire_dtype)))

    def cleared(self, topic: str) -> list[Frame]:
        """Frames that clear a retained topic and every chunk its last message took."""
        return [Frame(topic, b"", True)] + self._stale_chunks(topic, 0, True)

    def cost(self, message: Message) -> int:
        """The bytes `message` puts on the wire, chunks and envelopes included, without encoding its weights."""
        return wire_size(encoded_size(message, self.wire_dtype), self.seal.sealed, self.max_message_bytes)

    def _stale_chunks(self, topic: str, count: int, retain: bool) -> list[Frame]:
        if not retain:
            return []
        stale = [Frame(Topics.chunk(topic, index), b"", True) for index in range(count, self.chunks_out.get(topic, 0))]
        self.chunks_out[topic] = count
        return stale

    def _seal(self, topic: str, body: bytes) -> bytes:
        return self.seal.seal(topic, body, self.stamper.next())
