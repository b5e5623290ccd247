"""Chunking: a message body too large for one broker message travels as several chunk bodies, and comes back whole.

The broker refuses any message over its message_size_limit (16 MiB), so a model body larger than that is cut into
chunks, each sealed and published as a message of its own. Pure: no I/O, no clock (`now` is passed in), no threads.

A chunk body, little-endian throughout:

    CHUNK_HEAD = struct "<4sBxxxQIIIQ32s" (68 bytes)
        4s   magic       b"SDCK"
        B    version     1
        xxx  reserved    3 zero bytes
        Q    message_id  u64, chosen by the sender; unique per (sender incarnation, kind)
        I    index       u32, 0 <= index < count
        I    count       u32, the number of chunks of the message
        I    chunk_size  u32, the data bytes of every chunk but the last
        Q    total       u64, the length of the whole original body: (count-1)*chunk_size < total <= count*chunk_size
        32s  digest      SHA-256 of the whole original body
    then the chunk's data: bytes [index*chunk_size, min(total, (index+1)*chunk_size)) of the original body.

Every chunk but the last carries exactly chunk_size bytes, so a receiver knows every chunk's offset and length from
its head alone, and chunks may arrive in any order (the broker re-delivers retained messages in arbitrary order),
or twice (QoS 1). The digest is checked once the last missing chunk is in.

`split` cuts a body given as parts (bytes, memoryviews of numpy arrays) without ever joining it; `Reassembler`
puts chunks back together within fixed memory bounds, holding only the data that arrived (nothing is set aside for
what a head declares), and turns every bad input into a `Refused` verdict (one log line), never an exception.
"""

from __future__ import annotations

import hashlib
import hmac
import mmap
import struct
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from peer.wire.errors import Refused

CHUNK_MAGIC = b"SDCK"
CHUNK_VERSION = 1
_CHUNK_HEAD = struct.Struct("<4sBxxxQIIIQ32s")
# The same layout with the reserved bytes read, not skipped, so a receiver can insist they are zero.
_CHUNK_HEAD_READ = struct.Struct("<4sB3sQIIIQ32s")
CHUNK_HEAD_SIZE = _CHUNK_HEAD.size  # 68
_MAX_U32 = 2**32 - 1
_MAX_U64 = 2**64 - 1

# How many finished (completed or given-up) messages a Reassembler remembers, so that a late duplicate or a straggler
# of one of them is ignored instead of opening a partial message that could only expire.
_REMEMBERED_FINISHED = 1024


def _byte_view(part) -> memoryview:
    """A flat, one-byte-per-item view of a bytes-like object (a numpy array's memoryview has float items)."""
    return memoryview(part).cast("B")


def is_chunk(body) -> bool:
    """Whether a body is a chunk (by its magic alone; `Reassembler.offer` checks the rest)."""
    return bytes(_byte_view(body)[:4]) == CHUNK_MAGIC


def chunk_count(total: int, limit: int) -> int:
    """How many chunk bodies `split` makes of a `total`-byte body with chunk bodies of at most `limit` bytes."""
    return -(-total // _chunk_size(limit))


def _chunk_size(limit: int) -> int:
    if limit <= CHUNK_HEAD_SIZE:
        raise ValueError(
            f"a chunk limit of {limit} bytes leaves no room for data after the {CHUNK_HEAD_SIZE}-byte head"
        )
    return min(limit - CHUNK_HEAD_SIZE, _MAX_U32)


def split(parts: Iterable, limit: int, message_id: int) -> Iterator[bytes]:
    """The chunk bodies of the body that is the concatenation of `parts`, each at most `limit` bytes, in order.

    `parts` are bytes-like (bytes, memoryviews of C-contiguous numpy arrays). The body is never joined: the digest is
    computed over the parts here, before the first chunk, and each chunk copies only its own slices when it is
    produced, so the extra memory at any time is one chunk. The parts must not change until the iterator is
    exhausted (or the receiver's digest check fails). A body that fits one chunk gives one chunk (count 1); whether
    to chunk at all is the caller's choice. ValueError for an empty body, a limit with no room for data, a message
    id outside u64, or more than 2^32-1 chunks."""
    views = [_byte_view(part) for part in parts]
    total = sum(len(view) for view in views)
    chunk_size = _chunk_size(limit)
    if total == 0:
        raise ValueError("an empty body has no chunks")
    if not 0 <= message_id <= _MAX_U64:
        raise ValueError(f"message id {message_id} is not a u64")
    count = -(-total // chunk_size)
    if count > _MAX_U32:
        raise ValueError(f"{total} bytes in chunks of {chunk_size} would take {count} chunks, more than a u32 counts")
    digest = hashlib.sha256()
    for view in views:
        digest.update(view)
    return _chunks(views, total, chunk_size, count, message_id, digest.digest())


def _chunks(
    views: list[memoryview], total: int, chunk_size: int, count: int, message_id: int, digest: bytes
) -> Iterator[bytes]:
    part, offset = 0, 0  # where the next chunk's data starts: views[part][offset:]
    for index in range(count):
        pieces: list[bytes | memoryview] = [
            _CHUNK_HEAD.pack(CHUNK_MAGIC, CHUNK_VERSION, message_id, index, count, chunk_size, total, digest)
        ]
        needed = min(chunk_size, total - index * chunk_size)
        while needed:
            view = views[part]
            take = min(needed, len(view) - offset)
            if take:
                pieces.append(view[offset : offset + take])
            offset += take
            needed -= take
            if offset == len(view):
                part, offset = part + 1, 0
        yield b"".join(pieces)


# --- reassembly --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Complete:
    """Every chunk is in and the digest matches: `body` is the whole original body (the only reference to it: a
    message's buffer, or a lone chunk's copy)."""

    body: memoryview


@dataclass(frozen=True)
class Pending:
    """The chunk is in; the message waits for more. `evicted`: older partial messages of the same sender that were
    given up to make room for this one (each worth a log line)."""

    evicted: tuple[Refused, ...] = ()


class _Partial:
    """One message being reassembled: its buffer, which chunks are in, and when the latest came.

    The buffer is anonymous memory the system hands out a page at a time, when the page is first written: opening a
    message reserves its address range and commits nothing (no page is zeroed or resident), so a head that declares
    a gigabyte and brings a chunk of data costs that chunk; every chunk's data goes straight to its place, and the
    whole message is that one buffer, never copied again."""

    __slots__ = ("count", "chunk_size", "total", "digest", "buffer", "received", "held", "last_at")

    def __init__(self, count: int, chunk_size: int, total: int, digest: bytes, now: float):
        self.count, self.chunk_size, self.total, self.digest = count, chunk_size, total, digest
        self.buffer = mmap.mmap(-1, total)
        self.received: set[int] = set()  # (at most total / min_chunk_bytes entries: chunks are large)
        self.held = 0  # data bytes in the buffer
        self.last_at = now

    @property
    def cost(self) -> int:
        """What the message may come to hold, whole (its declared bytes and one bit per chunk): what the bounds count,
        so that the messages let in can all complete within them."""
        return self.total + (self.count + 7) // 8

    @property
    def missing(self) -> int:
        return self.count - len(self.received)

    def has(self, index: int) -> bool:
        return index in self.received

    def put(self, index: int, data) -> None:
        start = index * self.chunk_size
        self.buffer[start : start + len(data)] = data
        self.received.add(index)
        self.held += len(data)

    def release(self) -> None:
        """Give the memory back at once (an evicted, expired or refused message)."""
        self.buffer.close()
        self.held = 0


def _name(key) -> str:
    sender, _incarnation, kind, message_id = key
    return f"message {message_id} of {sender} ({kind})"


class Reassembler:
    """Chunks back into whole bodies, in bounded memory.

    Partial messages are keyed by (sender, incarnation, kind, message_id). A message holds the data of the chunks that
    arrived, nothing more: its first chunk sets nothing aside for the rest, and once its last chunk is in, the body is
    put together in one buffer, each chunk let go as it is copied. Bounds, on what the messages let in may come to
    hold whole (their declared bytes, `buffered_bytes`; `held_bytes` is what they hold now): no message over
    `max_message_bytes`; all partial messages together at most `max_buffered_bytes`; a sender has at most
    `max_partials_per_sender` partial messages; every chunk but a message's last holds at least `min_chunk_bytes` of
    data (a peer's hold tens of KiB: a flood of byte-sized chunks is no peer's). A new message that would break a bound
    first evicts the oldest partial messages of its own sender (a sender that starts a new model has usually given
    up on the old one), and is refused if that cannot make room: one sender never evicts another's messages. A
    partial message whose last chunk arrived more than `timeout_s` ago is dropped by `expire`.
    """

    def __init__(
        self,
        max_message_bytes: int,
        max_buffered_bytes: int,
        timeout_s: float,
        max_partials_per_sender: int = 2,
        min_chunk_bytes: int = 1,
    ):
        if (
            max_message_bytes < 1
            or max_buffered_bytes < 1
            or max_partials_per_sender < 1
            or min_chunk_bytes < 1
            or not timeout_s > 0
        ):
            raise ValueError("the reassembler's limits and timeout must be positive")
        self.max_message_bytes = max_message_bytes
        self.max_buffered_bytes = max_buffered_bytes
        self.timeout_s = timeout_s
        self.max_partials_per_sender = max_partials_per_sender
        self.min_chunk_bytes = min_chunk_bytes
        self._partials: dict[tuple, _Partial] = {}  # in order of first chunk: the oldest first
        self._finished: OrderedDict[tuple, str] = OrderedDict()  # key -> what became of it, the latest last
        self._buffered = 0

    @property
    def buffered_bytes(self) -> int:
        """The bytes the partial messages may come to hold, whole: what the bounds count."""
        return self._buffered

    @property
    def held_bytes(self) -> int:
        """The data bytes the partial messages hold now (only what arrived)."""
        return sum(partial.held for partial in self._partials.values())

    def offer(self, sender: str, incarnation: int, kind: str, body, now: float) -> Complete | Pending | Refused:
        """Take one chunk body (from an opened envelope: `sender` and `kind` from its topic, `incarnation` from its
        stamp). Never raises on any bytes."""
        view = _byte_view(body)
        where = f"a chunk from {sender} ({kind})"
        if len(view) < CHUNK_HEAD_SIZE:
            return Refused(
                f"{where}: truncated ({len(view)} bytes, the chunk head alone is {CHUNK_HEAD_SIZE})", "warning"
            )
        magic, version, reserved, message_id, index, count, chunk_size, total, digest = _CHUNK_HEAD_READ.unpack_from(
            view
        )
        problem = _head_problem(
            magic, version, reserved, index, count, chunk_size, total, self.max_message_bytes, self.min_chunk_bytes
        )
        if problem:
            return Refused(f"{where}: {problem}", "warning", "chunk-head")
        key = (sender, incarnation, kind, message_id)
        where = f"chunk {index} of {count} of {_name(key)}"
        start = index * chunk_size
        expected = min(total, start + chunk_size) - start
        data = view[CHUNK_HEAD_SIZE:]
        if len(data) != expected:
            return Refused(f"{where}: {len(data)} data bytes, expected {expected}", "warning")
        if key in self._finished:
            return Refused(f"{where}: the message is already {self._finished[key]}; ignored", "debug")

        partial = self._partials.get(key)
        evicted: tuple[Refused, ...] = ()
        if partial is None:
            if count == 1:
                # A body that fits one chunk is normally sent unchunked, but a lone chunk is as safe as any (same
                # checks, same digest) and refusing it would only add a case `split` must avoid; it never buffers.
                return self._finish(key, bytearray(data), digest, where)
            partial, evicted, refusal = self._open(key, count, chunk_size, total, digest, now)
            if refusal:
                return Refused(f"{where}: {refusal}; refused", "warning", "chunk-no-room")
        elif (count, chunk_size, total, digest) != (partial.count, partial.chunk_size, partial.total, partial.digest):
            return Refused(
                f"{where}: count, chunk size, total or digest disagrees with its earlier chunks; ignored", "warning"
            )
        elif partial.has(index):
            return Refused(f"{where}: duplicate; ignored", "debug")

        partial.put(index, data)
        partial.last_at = now
        if partial.missing:
            return Pending(evicted)
        self._forget(key)
        return self._finish(key, partial.buffer, partial.digest, where)

    def expire(self, now: float) -> list[Refused]:
        """Drop the partial messages whose latest chunk arrived more than timeout_s before `now`."""
        stale = [key for key, partial in self._partials.items() if now - partial.last_at > self.timeout_s]
        dropped = []
        for key in stale:
            partial = self._forget(key)
            partial.release()
            self._remember(key, "dropped")
            dropped.append(
                Refused(
                    f"{_name(key)}: {partial.missing} of {partial.count} chunks missing after "
                    f"{self.timeout_s:g}s; dropped",
                    "warning",
                )
            )
        return dropped

    def _open(self, key, count: int, chunk_size: int, total: int, digest: bytes, now: float):
        """A new partial message, the sender's partials evicted to make room for it, or why there is no room."""
        sender = key[0]
        cost = total + (count + 7) // 8
        own = [k for k in self._partials if k[0] == sender]  # oldest first
        own_cost = sum(self._partials[k].cost for k in own)
        if self._buffered - own_cost + cost > self.max_buffered_bytes:
            # Evicting would not be enough: keep the sender's older messages, which may still complete.
            self._remember(key, "refused")
            return (
                None,
                (),
                (
                    f"{total} bytes would not fit in the {self.max_buffered_bytes}-byte reassembly budget "
                    f"({self._buffered - own_cost} bytes promised to other senders' messages)"
                ),
            )
        evicted: list[Refused] = []
        for old in own:
            if (
                self._buffered + cost <= self.max_buffered_bytes
                and len(own) - len(evicted) < self.max_partials_per_sender
            ):
                break
            partial = self._forget(old)
            partial.release()
            self._remember(old, "evicted")
            evicted.append(
                Refused(
                    f"{_name(old)}: evicted with {partial.missing} of {partial.count} chunks missing, "
                    f"to make room for {_name(key)}",
                    "warning",
                    "chunk-evicted",
                )
            )
            del partial  # (released above: its memory went back before anything of the new message comes)
        try:
            partial = _Partial(count, chunk_size, total, digest, now)
        except (OSError, ValueError, OverflowError) as err:  # the system will not map that much (strict overcommit)
            self._remember(key, "refused")
            return None, tuple(evicted), f"no memory for {total} bytes ({err})"
        self._partials[key] = partial
        self._buffered += partial.cost
        return partial, tuple(evicted), None

    def _finish(self, key, buffer: bytearray | mmap.mmap, digest: bytes, where: str) -> Complete | Refused:
        if not hmac.compare_digest(hashlib.sha256(buffer).digest(), digest):
            if isinstance(buffer, mmap.mmap):
                buffer.close()
            self._remember(key, "dropped")
            return Refused(
                f"{where}: digest mismatch: corrupted in transit (or a sender bug); the message is dropped", "warning"
            )
        self._remember(key, "complete")
        return Complete(memoryview(buffer))

    def _forget(self, key) -> _Partial:
        partial = self._partials.pop(key)
        self._buffered -= partial.cost
        return partial

    def _remember(self, key, outcome: str) -> None:
        self._finished[key] = outcome
        self._finished.move_to_end(key)
        while len(self._finished) > _REMEMBERED_FINISHED:
            self._finished.popitem(last=False)


def _head_problem(
    magic: bytes,
    version: int,
    reserved: bytes,
    index: int,
    count: int,
    chunk_size: int,
    total: int,
    max_message_bytes: int,
    min_chunk_bytes: int = 1,
) -> str | None:
    """What is wrong with a chunk head on its own, or None. Checked before anything is allocated."""
    if magic != CHUNK_MAGIC:
        return f"no {CHUNK_MAGIC.decode()} magic"
    if version != CHUNK_VERSION:
        return f"version {version} is not {CHUNK_VERSION}"
    if reserved != b"\0\0\0":
        return "reserved bytes are set"
    if count < 1:
        return "a count of 0 chunks"
    if index >= count:
        return f"index {index} is not below the count {count}"
    if chunk_size < 1:
        return "a chunk size of 0"
    if count > 1 and chunk_size < min_chunk_bytes:
        return f"chunks of {chunk_size} bytes: a peer's hold at least {min_chunk_bytes}"
    if total > max_message_bytes:
        return f"a message of {total} bytes exceeds the {max_message_bytes}-byte limit"
    if not (count - 1) * chunk_size < total <= count * chunk_size:
        return f"{total} bytes do not make {count} chunks of {chunk_size}"
    return None
