import hashlib
import mmap
import random
import struct
import time
import tracemalloc

import numpy as np
import pytest

from peer.wire.chunks import (
    CHUNK_HEAD_SIZE,
    CHUNK_MAGIC,
    Complete,
    Pending,
    Reassembler,
    chunk_count,
    is_chunk,
    split,
)
from peer.wire.errors import Refused

HEAD = struct.Struct("<4sBxxxQIIIQ32s")
MB = 1024 * 1024


def body_of(size, seed=0):
    return random.Random(seed).randbytes(size)


def reassembler(**limits):
    return Reassembler(**{"max_message_bytes": 10 * MB, "max_buffered_bytes": 20 * MB, "timeout_s": 60.0, **limits})


def deliver(assembler, chunks, sender="peer-3", incarnation=7, kind="aggregation", now=0.0):
    return [assembler.offer(sender, incarnation, kind, chunk, now) for chunk in chunks]


def head_of(chunk):
    magic, version, message_id, index, count, chunk_size, total, digest = HEAD.unpack_from(chunk)
    return dict(
        magic=magic,
        version=version,
        message_id=message_id,
        index=index,
        count=count,
        chunk_size=chunk_size,
        total=total,
        digest=digest,
    )


def with_head(chunk, **changes):
    fields = {**head_of(chunk), **changes}
    return HEAD.pack(*fields.values()) + chunk[CHUNK_HEAD_SIZE:]


# --- split ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size, limit",
    [
        (1000, CHUNK_HEAD_SIZE + 100),  # an exact multiple: 10 full chunks
        (1001, CHUNK_HEAD_SIZE + 100),  # a 1-byte last chunk
        (999, CHUNK_HEAD_SIZE + 100),
        (1000, CHUNK_HEAD_SIZE + 1),  # one byte per chunk
        (1000, CHUNK_HEAD_SIZE + 999),  # 2 chunks, the last of 1 byte
        (1000, CHUNK_HEAD_SIZE + 1000),  # fits one chunk: count 1
        (300_000, 64 * 1024),
    ],
)
def test_split_then_reassemble_gives_the_body_back(size, limit):
    body = body_of(size, seed=size + limit)
    chunks = list(split([body], limit, message_id=12))
    assert len(chunks) == chunk_count(size, limit) == -(-size // (limit - CHUNK_HEAD_SIZE))
    assert all(len(chunk) <= limit for chunk in chunks)
    assert all(len(chunk) == limit for chunk in chunks[:-1])  # every chunk but the last is full
    assert len(chunks[-1]) == CHUNK_HEAD_SIZE + size - (len(chunks) - 1) * (limit - CHUNK_HEAD_SIZE)
    heads = [head_of(chunk) for chunk in chunks]
    assert [h["index"] for h in heads] == list(range(len(chunks)))
    assert {(h["magic"], h["version"], h["message_id"], h["count"], h["total"], h["digest"]) for h in heads} == {
        (CHUNK_MAGIC, 1, 12, len(chunks), size, hashlib.sha256(body).digest())
    }
    assert all(chunk[5:8] == b"\0\0\0" for chunk in chunks)
    results = deliver(reassembler(), chunks)
    assert all(isinstance(r, Pending) for r in results[:-1])
    assert isinstance(results[-1], Complete) and results[-1].body == body


def test_split_reads_across_part_boundaries_including_empty_parts_and_numpy_views():
    array = np.arange(1000, dtype=np.float32)
    parts = [b"head", b"", memoryview(array).cast("B"), b"x", memoryview(array[:3]), b""]
    body = b"head" + array.tobytes() + b"x" + array[:3].tobytes()
    for limit in (CHUNK_HEAD_SIZE + 1, CHUNK_HEAD_SIZE + 3, CHUNK_HEAD_SIZE + 4096, CHUNK_HEAD_SIZE + len(body)):
        chunks = list(split(parts, limit, message_id=1))
        assert b"".join(chunk[CHUNK_HEAD_SIZE:] for chunk in chunks) == body
        assert isinstance(deliver(reassembler(), chunks)[-1], Complete)


@pytest.mark.parametrize(
    "parts, limit, message_id",
    [
        ([], 1000, 1),
        ([b""], 1000, 1),  # nothing to send
        ([b"abc"], CHUNK_HEAD_SIZE, 1),  # no room for data
        ([b"abc"], 1000, -1),
        ([b"abc"], 1000, 2**64),  # not a u64
    ],
)
def test_split_refuses_what_it_cannot_encode(parts, limit, message_id):
    with pytest.raises(ValueError):
        split(parts, limit, message_id)


def test_split_never_copies_the_whole_body():
    total = 64 * MB
    weights = np.random.default_rng(0).random(total // 4, dtype=np.float32)
    parts = [b"frame head", memoryview(weights[: total // 8]).cast("B"), memoryview(weights[total // 8 :]).cast("B")]
    limit = 1 * MB
    tracemalloc.start()
    try:
        count = 0
        digest = hashlib.sha256()
        for chunk in split(parts, limit, message_id=5):
            assert len(chunk) <= limit
            digest.update(chunk[CHUNK_HEAD_SIZE:])
            count += 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == chunk_count(total + 10, limit)
    assert digest.digest() == hashlib.sha256(b"frame head" + weights.tobytes()).digest()
    assert peak < 4 * limit, f"split's peak was {peak} bytes for a {total}-byte body"


# --- delivery order ---------------------------------------------------------------------------------------------------


def test_chunks_in_reverse_and_shuffled_order_reassemble():
    body = body_of(5000)
    chunks = list(split([body], CHUNK_HEAD_SIZE + 333, message_id=3))
    assert len(chunks) == 16
    for order in (chunks[::-1], random.Random(1).sample(chunks, len(chunks)), chunks[1:] + chunks[:1]):
        results = deliver(reassembler(), order)
        assert all(isinstance(r, Pending) for r in results[:-1]), results
        assert isinstance(results[-1], Complete) and results[-1].body == body


def test_duplicates_are_ignored_and_the_message_still_completes():
    body = body_of(1000)
    chunks = list(split([body], CHUNK_HEAD_SIZE + 300, message_id=3))  # 4 chunks
    assembler = reassembler()
    results = deliver(assembler, [chunks[0], chunks[0], chunks[2], chunks[0], chunks[2], chunks[1], chunks[3]])
    assert [type(r) for r in results] == [Pending, Refused, Pending, Refused, Refused, Pending, Complete]
    assert all(r.level == "debug" and "duplicate" in r.reason for r in results if isinstance(r, Refused))
    assert results[-1].body == body
    assert assembler.buffered_bytes == 0


def test_a_chunk_of_a_finished_message_does_not_open_it_again():
    body = body_of(1000)
    chunks = list(split([body], CHUNK_HEAD_SIZE + 300, message_id=3))
    assembler = reassembler()
    assert isinstance(deliver(assembler, chunks)[-1], Complete)
    late = deliver(assembler, [chunks[3]])[0]  # QoS 1 may deliver it twice
    assert isinstance(late, Refused) and late.level == "debug" and "already complete" in late.reason
    assert assembler.buffered_bytes == 0 and assembler.expire(1000.0) == []


def test_complete_is_the_only_reference_and_memory_is_freed():
    body = body_of(1000)
    assembler = reassembler()
    result = deliver(assembler, split([body], CHUNK_HEAD_SIZE + 300, message_id=3))[-1]
    assert isinstance(result.body, memoryview) and isinstance(result.body.obj, (bytearray, mmap.mmap))
    assert assembler.buffered_bytes == 0 and not assembler._partials


def test_interleaved_messages_of_two_senders_and_two_kinds_stay_apart():
    limit = CHUNK_HEAD_SIZE + 100
    bodies = {
        ("peer-1", "solution"): body_of(950, 1),
        ("peer-2", "solution"): body_of(950, 2),
        ("peer-1", "training"): body_of(720, 3),
    }
    # the same message id everywhere: only sender and kind tell them apart
    streams = {key: list(split([body], limit, message_id=1)) for key, body in bodies.items()}
    assembler = reassembler()
    completed = {}
    for step in range(max(len(s) for s in streams.values())):
        for (sender, kind), chunks in streams.items():
            if step < len(chunks):
                result = assembler.offer(sender, 1, kind, chunks[step], float(step))
                if isinstance(result, Complete):
                    completed[(sender, kind)] = bytes(result.body)
                else:
                    assert isinstance(result, Pending), result
    assert completed == bodies


def test_a_new_incarnation_is_a_new_message():
    body = body_of(1000)
    chunks = list(split([body], CHUNK_HEAD_SIZE + 300, message_id=3))
    assembler = reassembler()
    deliver(assembler, chunks[:2], incarnation=1)
    results = deliver(assembler, chunks, incarnation=2)
    assert isinstance(results[-1], Complete)
    assert isinstance(deliver(assembler, chunks[2:3], incarnation=1)[0], Pending)  # the old one still waits


# --- loss and corruption ----------------------------------------------------------------------------------------------


def test_a_lost_chunk_expires_with_the_number_missing():
    chunks = list(split([body_of(700)], CHUNK_HEAD_SIZE + 100, message_id=12))  # 7 chunks
    assembler = reassembler(timeout_s=60.0)
    deliver(assembler, [c for i, c in enumerate(chunks) if i not in (1, 4, 5)], now=10.0)
    assert assembler.buffered_bytes > 0
    assert assembler.expire(70.0) == []  # 60 s after the last chunk, not more
    [dropped] = assembler.expire(70.5)
    assert dropped == Refused("message 12 of peer-3 (aggregation): 3 of 7 chunks missing after 60s; dropped", "warning")
    assert assembler.buffered_bytes == 0 and assembler.expire(1000.0) == []


def test_expiry_counts_from_the_latest_chunk():
    chunks = list(split([body_of(700)], CHUNK_HEAD_SIZE + 100, message_id=12))
    assembler = reassembler(timeout_s=60.0)
    assembler.offer("peer-3", 7, "aggregation", chunks[0], 0.0)
    assembler.offer("peer-3", 7, "aggregation", chunks[1], 50.0)
    assert assembler.expire(100.0) == []
    assert len(assembler.expire(110.5)) == 1


def test_a_corrupted_data_byte_fails_the_digest_and_frees_the_message():
    chunks = list(split([body_of(1000)], CHUNK_HEAD_SIZE + 300, message_id=3))
    bad = bytearray(chunks[2])
    bad[CHUNK_HEAD_SIZE + 17] ^= 0x01
    assembler = reassembler()
    results = deliver(assembler, [chunks[0], chunks[1], bytes(bad), chunks[3]])
    assert isinstance(results[-1], Refused) and results[-1].level == "warning"
    assert "digest mismatch: corrupted in transit" in results[-1].reason
    assert assembler.buffered_bytes == 0 and not assembler._partials


def test_a_corrupted_lone_chunk_fails_the_digest():
    [chunk] = split([body_of(100)], 1000, message_id=3)
    bad = bytearray(chunk)
    bad[-1] ^= 0x80
    result = reassembler().offer("peer-3", 7, "aggregation", bad, 0.0)
    assert isinstance(result, Refused) and "digest mismatch" in result.reason


def valid_chunks():
    return list(split([body_of(1000)], CHUNK_HEAD_SIZE + 300, message_id=3))  # 4 chunks: 300, 300, 300, 100


@pytest.mark.parametrize(
    "changes, why",
    [
        (dict(magic=b"SDFL"), "magic"),
        (dict(version=2), "version"),
        (dict(count=0), "count of 0"),
        (dict(index=4), "not below the count"),
        (dict(chunk_size=0), "chunk size of 0"),
        (dict(total=10 * MB + 1), "exceeds"),
        (dict(total=900), "do not make"),  # 3 chunks of 300 hold it: count 4 is wrong
        (dict(total=1201), "do not make"),
        (dict(count=3), "do not make"),
        (dict(chunk_size=334), "do not make"),  # 3 chunks of 334 are already 1002 bytes
    ],
)
def test_a_bad_head_field_is_dropped_with_a_reason(changes, why):
    chunk = with_head(valid_chunks()[1], **changes)
    result = reassembler().offer("peer-3", 7, "aggregation", chunk, 0.0)
    assert isinstance(result, Refused) and result.level == "warning" and why in result.reason, result


def test_reserved_bytes_must_be_zero():
    chunk = bytearray(valid_chunks()[0])
    chunk[6] = 1
    result = reassembler().offer("peer-3", 7, "aggregation", chunk, 0.0)
    assert isinstance(result, Refused) and "reserved" in result.reason


@pytest.mark.parametrize("data_change", [-1, +1])
def test_data_of_the_wrong_length_is_dropped(data_change):
    for chunk in (valid_chunks()[0], valid_chunks()[3]):  # a full chunk and the short last one
        chunk = chunk[:-1] if data_change < 0 else chunk + b"\0"
        result = reassembler().offer("peer-3", 7, "aggregation", chunk, 0.0)
        assert isinstance(result, Refused) and "data bytes, expected" in result.reason


def test_a_later_chunk_that_disagrees_with_the_first_is_dropped():
    chunks = valid_chunks()
    other = list(split([body_of(1000, seed=99)], CHUNK_HEAD_SIZE + 300, message_id=3))  # same id, other digest
    assembler = reassembler()
    assert isinstance(assembler.offer("peer-3", 7, "aggregation", chunks[0], 0.0), Pending)
    result = assembler.offer("peer-3", 7, "aggregation", other[1], 0.0)
    assert isinstance(result, Refused) and "disagrees" in result.reason
    results = deliver(assembler, chunks[1:])
    assert isinstance(results[-1], Complete)  # the refused chunk left no trace in the buffer


def test_truncated_heads_are_dropped():
    chunk = valid_chunks()[0]
    for length in (0, 3, 4, CHUNK_HEAD_SIZE - 1):
        result = reassembler().offer("peer-3", 7, "aggregation", chunk[:length], 0.0)
        assert isinstance(result, Refused) and "truncated" in result.reason


def test_no_input_bytes_ever_raise():
    rng = random.Random(2024)
    chunks = valid_chunks() + list(split([body_of(50)], 1000, message_id=9))
    assembler = reassembler(max_message_bytes=4096, max_buffered_bytes=20_000)
    for attempt in range(2000):
        chunk = bytearray(rng.choice(chunks))
        mutation = rng.randrange(4)
        if mutation == 0:
            chunk = chunk[: rng.randrange(len(chunk))]
        elif mutation == 1:
            for _ in range(rng.randint(1, 4)):
                chunk[rng.randrange(CHUNK_HEAD_SIZE)] = rng.randrange(256)  # mostly the head: that is parsed
        elif mutation == 2:
            chunk[rng.randrange(len(chunk))] ^= 1 << rng.randrange(8)
        else:
            chunk = bytearray(CHUNK_MAGIC + bytes([1, 0, 0, 0]) + rng.randbytes(rng.randrange(200)))
        result = assembler.offer(
            f"peer-{rng.randrange(3)}",
            rng.randrange(2),
            rng.choice(["solution", "training"]),
            bytes(chunk),
            float(attempt),
        )
        assert isinstance(result, (Complete, Pending, Refused))
        assert result.level in ("debug", "warning") if isinstance(result, Refused) else True
        assert assembler.buffered_bytes <= 20_000
    for garbage in (rng.randbytes(rng.randrange(300)) for _ in range(500)):
        assert isinstance(assembler.offer("peer-1", 0, "solution", garbage, 0.0), Refused)
    assert all(isinstance(d, Refused) for d in assembler.expire(1e9))
    assert assembler.buffered_bytes == 0


# --- memory bounds ----------------------------------------------------------------------------------------------------


def first_chunks(sender_ids, size=1000, limit=CHUNK_HEAD_SIZE + 100):
    """The first chunk of a `size`-byte message per message id (10 chunks each: a 2-byte bitmap)."""
    return {i: next(split([body_of(size, seed=i)], limit, message_id=i)) for i in sender_ids}


COST = 1000 + 2  # the buffer and the chunk bitmap of one such message


def test_a_message_over_the_size_limit_is_refused_before_allocating():
    result = reassembler(max_message_bytes=999).offer("peer-3", 7, "solution", first_chunks([1])[1], 0.0)
    assert isinstance(result, Refused) and "exceeds the 999-byte limit" in result.reason


def test_the_buffer_budget_holds_and_one_sender_cannot_evict_another():
    firsts = first_chunks([1, 2, 3])
    assembler = reassembler(max_buffered_bytes=2 * COST, max_partials_per_sender=5)
    assert isinstance(assembler.offer("peer-1", 1, "solution", firsts[1], 0.0), Pending)
    assert isinstance(assembler.offer("peer-2", 1, "solution", firsts[2], 0.0), Pending)
    assert assembler.buffered_bytes == 2 * COST
    result = assembler.offer("peer-3", 1, "solution", firsts[3], 0.0)
    assert isinstance(result, Refused) and result.level == "warning" and "would not fit" in result.reason
    assert assembler.buffered_bytes == 2 * COST
    # its later chunks are not refused one warning at a time
    later = list(split([body_of(1000, seed=3)], CHUNK_HEAD_SIZE + 100, message_id=3))[1]
    assert assembler.offer("peer-3", 1, "solution", later, 0.0).level == "debug"


def test_a_sender_over_the_budget_evicts_its_own_oldest_message():
    firsts = first_chunks([1, 2, 3])
    assembler = reassembler(max_buffered_bytes=2 * COST, max_partials_per_sender=5)
    deliver(assembler, [firsts[1]], sender="peer-1")
    deliver(assembler, [firsts[2]], sender="peer-1")
    [result] = deliver(assembler, [firsts[3]], sender="peer-1")
    assert isinstance(result, Pending)
    [evicted] = result.evicted
    assert evicted.level == "warning" and evicted.reason.startswith("message 1 of peer-1 (aggregation): evicted")
    assert assembler.buffered_bytes == 2 * COST
    assert sorted(key[3] for key in assembler._partials) == [2, 3]


def test_a_sender_has_at_most_max_partials_and_the_oldest_goes_first():
    firsts = first_chunks([1, 2, 3, 4])
    assembler = reassembler(max_partials_per_sender=2)
    results = deliver(assembler, [firsts[1], firsts[2], firsts[3], firsts[4]])
    assert [len(r.evicted) for r in results] == [0, 0, 1, 1]
    assert ["message 1 " in results[2].evicted[0].reason, "message 2 " in results[3].evicted[0].reason] == [True, True]
    assert sorted(key[3] for key in assembler._partials) == [3, 4]
    assert assembler.buffered_bytes == 2 * COST
    # another sender's partials are its own
    assert deliver(assembler, [firsts[1]], sender="peer-9")[0] == Pending()


def test_an_evicted_message_stays_dropped():
    chunks = list(split([body_of(1000, seed=1)], CHUNK_HEAD_SIZE + 100, message_id=1))
    firsts = first_chunks([2, 3])
    assembler = reassembler(max_partials_per_sender=2)
    deliver(assembler, [chunks[0], firsts[2], firsts[3]])
    results = deliver(assembler, chunks[1:])
    assert all(isinstance(r, Refused) and "evicted" in r.reason for r in results)
    assert assembler.buffered_bytes == 2 * COST


def test_a_message_larger_than_the_whole_budget_is_refused_without_evicting():
    firsts = first_chunks([1])
    big = next(split([body_of(3000)], CHUNK_HEAD_SIZE + 100, message_id=2))
    assembler = reassembler(max_buffered_bytes=2 * COST)
    deliver(assembler, [firsts[1]])
    result = deliver(assembler, [big])[0]
    assert isinstance(result, Refused) and "would not fit" in result.reason
    assert [key[3] for key in assembler._partials] == [1]  # the sender's older message may still complete


# --- is_chunk ---------------------------------------------------------------------------------------------------------


def test_is_chunk_checks_the_magic():
    chunk = valid_chunks()[0]
    assert is_chunk(chunk) and is_chunk(memoryview(chunk)) and is_chunk(memoryview(chunk)[:4])
    assert not is_chunk(b"SDFL" + chunk[4:]) and not is_chunk(b'{"v":1}') and not is_chunk(b"SDC") and not is_chunk(b"")


# --- a member that floods (issue 19): chunks cost nothing until data comes ---------------------------------------------

GIB = 1024 * MB


def opener(message_id, total=GIB, data=65536):
    """The first chunk of a message declaring `total` bytes, carrying `data` of them (a head that promises much)."""
    count = -(-total // data)
    head = HEAD.pack(CHUNK_MAGIC, 1, message_id, 0, count, data, total, bytes(32))
    return head + bytes(data)


def resident() -> int:
    """This process's resident memory now (bytes)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


def test_a_chunk_declaring_a_gigabyte_costs_its_data_not_the_gigabyte():
    # At 672ce7a every such opener zeroed 1 GiB on the event loop: 22 s of CPU and 3.6 GB of memory per peer.
    assembler = reassembler(max_message_bytes=GIB + 4096, max_buffered_bytes=4 * GIB)
    openers = [opener(message_id) for message_id in range(1, 21)]
    before, started = resident(), time.process_time()
    for chunk in openers:  # 20 openers, one after the other: each evicts the sender's oldest
        assert isinstance(assembler.offer("peer-3", 7, "aggregation", chunk, 0.0), Pending)
    grown, cpu = resident() - before, time.process_time() - started
    assert grown < 32 * MB, grown  # two partial messages of 64 KiB each: not 2 (or 3) GiB
    assert cpu < 2.0, cpu  # (at 672ce7a: a second or more per opener, zeroing its gigabyte)
    assert assembler.held_bytes == 2 * 65536  # at most two partial messages per sender: what they brought
    assert assembler.buffered_bytes <= 2 * (GIB + GIB // 65536)  # the bound counts what they may come to hold


def test_chunks_smaller_than_a_peer_s_are_refused_before_anything_is_held():
    assembler = reassembler(min_chunk_bytes=65404)
    result = assembler.offer("peer-3", 7, "aggregation", opener(1, total=10 * MB, data=1), 0.0)
    assert isinstance(result, Refused) and "chunks of 1 bytes: a peer's hold at least 65404" in result.reason
    assert assembler.held_bytes == assembler.buffered_bytes == 0 and result.kind == "chunk-head"
    # the last chunk of a message may be short, and a lone chunk is as short as its message
    [chunk] = split([body_of(100)], 1000, message_id=3)
    assert isinstance(assembler.offer("peer-3", 7, "aggregation", chunk, 0.0), Complete)


def test_evictions_say_their_kind_so_a_flood_of_them_is_one_log_line_per_period():
    assembler = reassembler(max_partials_per_sender=2)
    results = deliver(assembler, [opener(i, total=MB, data=1000) for i in range(1, 6)])
    evicted = [refusal for result in results for refusal in result.evicted]
    assert len(evicted) == 3 and {r.kind for r in evicted} == {"chunk-evicted"}


def test_a_message_is_held_once_its_chunks_written_in_place_never_copied_whole():
    body = body_of(32 * MB)
    chunks = list(split([body], 4 * MB + CHUNK_HEAD_SIZE, message_id=4))  # 8 chunks of 4 MiB
    assembler = reassembler(max_message_bytes=64 * MB, max_buffered_bytes=128 * MB)
    before = resident()
    results = deliver(assembler, chunks)
    grown = resident() - before
    assert isinstance(results[-1], Complete) and results[-1].body == body
    assert grown < 32 * MB + 8 * MB, grown  # the body once (and a chunk in flight), never twice
    assert assembler.held_bytes == 0
