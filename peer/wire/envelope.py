"""The envelope every payload travels in: who sent it (incarnation, sequence number, clock) and, with a federation
secret, an HMAC-SHA256 over the topic and all of it. Every message is published on `<prefix>/<run_id>/<kind>/<sender>`
(`peer.wire.topics`), and the MAC covers the topic, so a payload cannot be moved to another kind, run or sender.
Also what a body costs on the wire, chunked or not."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import struct
from collections.abc import Callable
from dataclasses import dataclass

from peer.wire.chunks import CHUNK_HEAD_SIZE
from peer.wire.errors import ProtocolError, require

MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the brokers' message_size_limit (broker/*.conf): a larger payload is chunked
MIN_CHUNKED_MESSAGE_BYTES = 65536  # the smallest broker limit a peer works with (a chunk must hold some data)

# Every payload on the wire: a fixed head, the body (`encode(message)`), and with a federation secret a MAC.
#   magic, envelope version, flags, reserved u16, incarnation u64, seq u64, sent_at f64 (little-endian, 32 bytes)
ENVELOPE_MAGIC = b"SDEN"
ENVELOPE_VERSION = 1
_ENVELOPE_HEAD = struct.Struct("<4sBBHQQd")
FLAG_MAC = 0x01  # bit 0 of flags: a MAC follows the body; the other bits are reserved (zero)
MAC_BYTES = 32  # HMAC-SHA256
ENVELOPE_OVERHEAD_OPEN = _ENVELOPE_HEAD.size  # 32
ENVELOPE_OVERHEAD_SEALED = _ENVELOPE_HEAD.size + MAC_BYTES  # 64
MIN_SECRET_BYTES = 16
_KEY_LABEL = b"sdfl federation key v1"
_U64 = 2**64 - 1


def sealed_size(body_len: int, sealed: bool) -> int:
    """The length of an envelope holding a body of `body_len` bytes, with (sealed) or without a MAC."""
    return body_len + (ENVELOPE_OVERHEAD_SEALED if sealed else ENVELOPE_OVERHEAD_OPEN)


def chunk_limit(max_message_bytes: int, sealed: bool) -> int:
    """The most bytes a chunk's body may have so that its envelope fits a broker message of `max_message_bytes`."""
    return max_message_bytes - sealed_size(0, sealed)


def wire_size(body_len: int, sealed: bool, max_message_bytes: int = MAX_MESSAGE_BYTES) -> int:
    """The bytes a body of `body_len` puts on the wire: one envelope, or (beyond `max_message_bytes`) one per chunk."""
    if sealed_size(body_len, sealed) <= max_message_bytes:
        return sealed_size(body_len, sealed)
    data = chunk_limit(max_message_bytes, sealed) - CHUNK_HEAD_SIZE
    count = -(-body_len // data)
    return body_len + count * sealed_size(CHUNK_HEAD_SIZE, sealed)


@dataclass(frozen=True)
class Stamp:
    """Which life of its sender sent a payload, its place in that life, and when: from the envelope's head (under
    the MAC when sealed).

    incarnation: identifies the sending process's life; a later life of the same peer id has a larger one
                 (`new_incarnation`). seq: that process's message counter. sent_at: its wall clock (Unix seconds)."""

    incarnation: int
    seq: int
    sent_at: float

    def __post_init__(self):
        for name in ("incarnation", "seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
                raise ValueError(f"stamp {name}: expected an integer from 0 to 2^64 - 1, not {value!r}")
        if (
            not isinstance(self.sent_at, (int, float))
            or isinstance(self.sent_at, bool)
            or not math.isfinite(self.sent_at)
        ):
            raise ValueError(f"stamp sent_at: expected a finite number, not {self.sent_at!r}")


def new_incarnation(now_ns: int) -> int:
    """A process's incarnation: microseconds of wall time (`now_ns`, nanoseconds) shifted left 12 bits, plus 12
    random bits. A life started a microsecond or more later has a larger one (unless the wall clock went back); two
    processes started in the same microsecond differ with probability 4095/4096. Fits a u64 until the year 2112."""
    micros = now_ns // 1000
    return ((micros << 12) | secrets.randbits(12)) & _U64


class Stamper:
    """The stamps of one process: one incarnation (`new_incarnation`), seq 1, 2, 3, ... and sent_at from `clock`, the
    wall clock handed in (Unix seconds)."""

    def __init__(self, incarnation: int, clock: Callable[[], float]):
        self.incarnation = incarnation
        self.clock = clock
        self.seq = 0  # the last one handed out

    def next(self) -> Stamp:
        self.seq += 1
        return Stamp(self.incarnation, self.seq, float(self.clock()))


def _topic_bytes(topic) -> bytes | None:
    """The topic as the MAC covers it, or None if it cannot be a topic (not a str, no UTF-8, a NUL character)."""
    if not isinstance(topic, str) or "\x00" in topic:
        return None
    try:
        return topic.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate
        return None


class Seal:
    """Seals message bodies into envelopes and opens them, with the federation secret or, with None, in open mode.

    The MAC key is derived from the secret (HMAC-SHA256(secret, "sdfl federation key v1")); the secret itself is
    not kept. A Seal with a secret opens only payloads sealed with the same secret for the same topic; a Seal
    without one opens only unsealed payloads. Opening raises ProtocolError and nothing else for any payload."""

    def __init__(self, secret: bytes | None):
        self._key: bytes | None
        if secret is None:
            self._key = None
            return
        if not isinstance(secret, (bytes, bytearray, memoryview)):
            raise TypeError(f"the federation secret must be bytes, not {type(secret).__name__}")
        secret = bytes(secret)
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the federation secret has {len(secret)} bytes; it needs at least {MIN_SECRET_BYTES}")
        self._key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()

    def __repr__(self) -> str:  # never the key
        return f"Seal({'sealed' if self.sealed else 'open'})"

    @property
    def sealed(self) -> bool:
        """Whether this Seal has a federation secret (signs what it seals, and demands a signature)."""
        return self._key is not None

    @property
    def overhead(self) -> int:
        """Bytes an envelope adds to a body: ENVELOPE_OVERHEAD_SEALED or ENVELOPE_OVERHEAD_OPEN."""
        return ENVELOPE_OVERHEAD_SEALED if self.sealed else ENVELOPE_OVERHEAD_OPEN

    def _mac(self, topic: bytes, *chunks) -> bytes:
        if self._key is None:
            raise ValueError("an open Seal signs nothing")
        mac = hmac.new(self._key, topic, hashlib.sha256)
        mac.update(b"\x00")
        for chunk in chunks:
            mac.update(chunk)
        return mac.digest()

    def seal(self, topic: str, body: bytes, stamp: Stamp) -> bytes:
        """The payload to publish on `topic`: envelope head, `body`, and the MAC if this Seal has a secret. The body is
        copied once (into the result) and hashed in place."""
        if not isinstance(stamp, Stamp):
            raise TypeError(f"expected a Stamp, not {type(stamp).__name__}")
        topic_bytes = _topic_bytes(topic)
        if topic_bytes is None:
            raise ValueError(f"cannot seal for topic {topic!r}: not a UTF-8 string without NUL")
        flags = FLAG_MAC if self.sealed else 0
        head = _ENVELOPE_HEAD.pack(
            ENVELOPE_MAGIC, ENVELOPE_VERSION, flags, 0, stamp.incarnation, stamp.seq, float(stamp.sent_at)
        )
        if not self.sealed:
            return b"".join((head, body))
        return b"".join((head, body, self._mac(topic_bytes, head, body)))

    def open(self, topic: str, payload: bytes | memoryview) -> tuple[memoryview, Stamp]:
        """The body (a memoryview into `payload`, not a copy) and the stamp of a payload received on `topic`.
        ProtocolError if it is not a well-formed envelope, or not sealed the way this Seal demands, or its MAC does
        not match this secret and this topic."""
        view = memoryview(payload).cast("B")
        head_size = _ENVELOPE_HEAD.size
        require(len(view) >= head_size, f"envelope: truncated ({len(view)} bytes, the head alone is {head_size})")
        magic, version, flags, reserved, incarnation, seq, sent_at = _ENVELOPE_HEAD.unpack_from(view)
        require(
            magic == ENVELOPE_MAGIC,
            f"envelope: no {ENVELOPE_MAGIC.decode()} magic (a peer of an older version, or not a peer)",
        )
        require(version == ENVELOPE_VERSION, f"envelope: version {version} is not {ENVELOPE_VERSION}")
        require(flags & ~FLAG_MAC == 0, f"envelope: unknown flags 0x{flags:02x}")
        require(reserved == 0, "envelope: reserved bits are set")
        require(math.isfinite(sent_at), "envelope: sent_at is not finite")
        stamp = Stamp(incarnation, seq, sent_at)
        has_mac = bool(flags & FLAG_MAC)
        if not self.sealed:
            require(not has_mac, "sealed with a federation secret; this peer has none: pass --secret-file")
            return view[head_size:], stamp
        require(has_mac, "not sealed with the federation secret")
        end = len(view) - MAC_BYTES
        require(end >= head_size, f"envelope: truncated ({len(view)} bytes, no room for the MAC)")
        topic_bytes = _topic_bytes(topic)
        if topic_bytes is None:
            raise ProtocolError("envelope: the topic is not a UTF-8 string without NUL")
        require(hmac.compare_digest(self._mac(topic_bytes, view[:end]), view[end:]), "bad signature")
        return view[head_size:end], stamp
