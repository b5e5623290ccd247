"""The envelope (`Seal`, `Stamp`): layout, sealing, opening, and everything opening must refuse."""

import hashlib
import hmac
import math
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from peer.config import read_secret_file
from peer.wire.envelope import (
    ENVELOPE_MAGIC,
    ENVELOPE_OVERHEAD_OPEN,
    ENVELOPE_OVERHEAD_SEALED,
    ENVELOPE_VERSION,
    FLAG_MAC,
    MAC_BYTES,
    MIN_SECRET_BYTES,
    Seal,
    Stamp,
    Stamper,
    new_incarnation,
    sealed_size,
)
from peer.wire.errors import ProtocolError
from peer.wire.messages import FRAME_MAGIC, decode, encode
from peer.wire.topics import Topics
from tests.netutil import fresh_stamper
from tests.wire.test_protocol import SAMPLES, assert_same_message

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SECRET = b"0123456789abcdef0123456789abcdef"
OTHER_SECRET = b"0123456789abcdef0123456789abcdeF"
TOPIC = "sd/default/heartbeat/peer-2"
BODY = b'{"v":1,"type":"heartbeat","term":3,"controller":"peer-2","round":5,"phase":"training"}'
STAMP = Stamp(incarnation=0x0102030405060708, seq=9, sent_at=1.5)
SEALED, OPEN = Seal(SECRET), Seal(None)

NOT_SEALED = "not sealed with the federation secret"
HAS_NO_SECRET = "sealed with a federation secret; this peer has none: pass --secret-file"
BAD_SIGNATURE = "bad signature"


def expected_mac(secret: bytes, topic: str, signed: bytes) -> bytes:
    """The MAC as docs/PROTOCOL.md describes it, computed independently of peer.protocol."""
    key = hmac.new(secret, b"sdfl federation key v1", hashlib.sha256).digest()
    return hmac.new(key, topic.encode() + b"\x00" + signed, hashlib.sha256).digest()


def hand_built(
    version=ENVELOPE_VERSION,
    flags=FLAG_MAC,
    reserved=0,
    sent_at=1.5,
    body=BODY,
    magic=ENVELOPE_MAGIC,
    secret=SECRET,
    topic=TOPIC,
) -> bytes:
    """An envelope built by hand, with a MAC that is valid for whatever it holds (when flags say MAC)."""
    head = struct.pack("<4sBBHQQd", magic, version, flags, reserved, STAMP.incarnation, STAMP.seq, sent_at)
    signed = head + body
    return signed + (expected_mac(secret, topic, signed) if flags & FLAG_MAC else b"")


def refuses(seal, payload, match=None, topic=TOPIC):
    with pytest.raises(ProtocolError, match=match):
        seal.open(topic, payload)


# --- layout -----------------------------------------------------------------------------------------------------------


def test_sealed_layout_matches_hand_built_example():
    head = (
        b"SDEN"  # magic
        + b"\x01"  # envelope version 1
        + b"\x01"  # flags: bit 0, a MAC follows
        + b"\x00\x00"  # reserved
        + b"\x08\x07\x06\x05\x04\x03\x02\x01"  # incarnation 0x0102030405060708, u64 LE
        + b"\x09\x00\x00\x00\x00\x00\x00\x00"  # seq 9
        + b"\x00\x00\x00\x00\x00\x00\xf8\x3f"
    )  # sent_at 1.5, f64 LE
    want = head + BODY + expected_mac(SECRET, TOPIC, head + BODY)
    assert SEALED.seal(TOPIC, BODY, STAMP) == want == hand_built()
    assert len(head) == ENVELOPE_OVERHEAD_OPEN == 32 and MAC_BYTES == 32
    body, stamp = SEALED.open(TOPIC, want)
    assert bytes(body) == BODY and stamp == STAMP


def test_open_layout_is_the_head_and_the_body():
    payload = OPEN.seal(TOPIC, BODY, STAMP)
    assert payload == hand_built(flags=0)
    assert payload[:4] == ENVELOPE_MAGIC != FRAME_MAGIC and payload[5] == 0
    body, stamp = OPEN.open(TOPIC, payload)
    assert bytes(body) == BODY and stamp == STAMP


def test_the_mac_key_is_derived_not_the_raw_secret():
    raw = hmac.new(SECRET, TOPIC.encode() + b"\x00" + hand_built(flags=FLAG_MAC)[:-MAC_BYTES], hashlib.sha256).digest()
    assert SEALED.seal(TOPIC, BODY, STAMP)[-MAC_BYTES:] != raw


@pytest.mark.parametrize("seal", [SEALED, OPEN], ids=["sealed", "open"])
@pytest.mark.parametrize("body_len", [0, 1, 1000])
def test_overhead(seal, body_len):
    assert (ENVELOPE_OVERHEAD_OPEN, ENVELOPE_OVERHEAD_SEALED) == (32, 64)
    payload = seal.seal(TOPIC, bytes(body_len), STAMP)
    assert len(payload) == sealed_size(body_len, seal.sealed) == body_len + seal.overhead
    assert seal.overhead == (ENVELOPE_OVERHEAD_SEALED if seal.sealed else ENVELOPE_OVERHEAD_OPEN)


def test_sealed_property():
    assert SEALED.sealed and not OPEN.sealed


@pytest.mark.parametrize("seal", [SEALED, OPEN], ids=["sealed", "open"])
def test_every_message_through_topic_envelope_and_decoder(seal):
    topics, stamper = Topics("sd", "run-1"), fresh_stamper()
    for message in SAMPLES:
        topic = topics.of(message)
        payload = seal.seal(topic, encode(message), stamper.next())
        kind, sender = topics.parse(topic)
        body, stamp = seal.open(topic, payload)
        assert_same_message(decode(kind, body, sender), message)
        assert stamp.incarnation == stamper.incarnation and stamp.seq == stamper.seq


# --- opening refuses --------------------------------------------------------------------------------------------------


def test_mode_mismatch_is_refused_both_ways():
    refuses(SEALED, OPEN.seal(TOPIC, BODY, STAMP), NOT_SEALED)
    refuses(OPEN, SEALED.seal(TOPIC, BODY, STAMP), HAS_NO_SECRET)


def test_another_secret_is_a_bad_signature():
    refuses(Seal(OTHER_SECRET), SEALED.seal(TOPIC, BODY, STAMP), BAD_SIGNATURE)


@pytest.mark.parametrize(
    "moved_to",
    [
        "sd/default/heartbeat/peer-3",  # another sender
        "sd/other/heartbeat/peer-2",  # another run
        "sd/default/training/peer-2",  # another kind
        "fl/default/heartbeat/peer-2",  # another prefix
        "sd/default/heartbeat/peer-2/",
        "sd/default/heartbeat/peer-",
        "",
        "sd/default/heartbeat/peer-2\x00",
    ],
)
def test_a_payload_moved_to_another_topic_is_refused(moved_to):
    refuses(SEALED, SEALED.seal(TOPIC, BODY, STAMP), topic=moved_to)


def test_every_single_bit_flip_of_a_sealed_payload_is_refused():
    payload = SEALED.seal(TOPIC, BODY, STAMP)
    for index in range(len(payload)):
        for bit in range(8):
            flipped = bytearray(payload)
            flipped[index] ^= 1 << bit
            refuses(SEALED, bytes(flipped))


def test_every_single_bit_flip_of_the_topic_is_refused():
    payload = SEALED.seal(TOPIC, BODY, STAMP)
    raw = TOPIC.encode()
    for index in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[index] ^= 1 << bit
            # A flip can make invalid UTF-8: surrogateescape keeps such a topic a str, which must be refused too.
            refuses(SEALED, payload, topic=bytes(flipped).decode("utf-8", "surrogateescape"))


def test_open_mode_checks_the_form_only():
    # Without a secret there is no integrity: a changed body or stamp passes. That is what open mode is.
    payload = bytearray(OPEN.seal(TOPIC, BODY, STAMP))
    payload[-1] ^= 1
    payload[16] ^= 1
    body, stamp = OPEN.open("any/topic", bytes(payload))
    assert bytes(body) != BODY and stamp.seq == STAMP.seq ^ 1


@pytest.mark.parametrize("seal, flags", [(SEALED, FLAG_MAC), (OPEN, 0)], ids=["sealed", "open"])
def test_every_truncation_is_refused(seal, flags):
    payload = seal.seal(TOPIC, BODY, STAMP)
    cuts = range(len(payload)) if seal.sealed else range(ENVELOPE_OVERHEAD_OPEN)
    for cut in cuts:
        refuses(seal, payload[:cut])


def test_a_sealed_envelope_too_short_for_its_mac_says_truncated():
    refuses(SEALED, hand_built(body=b"")[:40], "truncated")


@pytest.mark.parametrize("seal, flags", [(SEALED, FLAG_MAC), (OPEN, 0)], ids=["sealed", "open"])
@pytest.mark.parametrize(
    "change, match",
    [
        ({"version": 0}, "version 0"),
        ({"version": 2}, "version 2"),
        ({"version": 255}, "version 255"),
        ({"reserved": 1}, "reserved"),
        ({"reserved": 0x8000}, "reserved"),
        ({"sent_at": math.nan}, "sent_at"),
        ({"sent_at": math.inf}, "sent_at"),
        ({"sent_at": -math.inf}, "sent_at"),
        ({"magic": b"SDFL"}, "magic"),
        ({"magic": b"sden"}, "magic"),
        ({"magic": b'{"v"'}, "magic"),
    ],
)
def test_malformed_heads_are_refused_even_with_a_valid_mac(seal, flags, change, match):
    refuses(seal, hand_built(flags=flags, **change), match)


@pytest.mark.parametrize("seal", [SEALED, OPEN], ids=["sealed", "open"])
@pytest.mark.parametrize("flags", [0x02, 0x03, 0x80, 0xFF])
def test_unknown_flags_are_refused(seal, flags):
    refuses(seal, hand_built(flags=flags), "flags")


@pytest.mark.parametrize("seal", [SEALED, OPEN], ids=["sealed", "open"])
def test_older_peers_payloads_are_refused(seal):
    for message in SAMPLES:
        refuses(seal, encode(message), "magic")


@pytest.mark.parametrize("seal", [SEALED, OPEN], ids=["sealed", "open"])
@pytest.mark.parametrize("payload", [b"", b"S", b"SDEN", b"SDEN\x01", bytes(31), b"\xff" * 64])
def test_short_garbage_is_refused(seal, payload):
    refuses(seal, payload)


def test_edge_stamps_and_empty_body_round_trip():
    for stamp in (Stamp(0, 0, 0.0), Stamp(2**64 - 1, 2**64 - 1, -1e308), Stamp(1, 2, 5e-324), Stamp(1, 2, 7)):
        for seal in (SEALED, OPEN):
            body, back = seal.open(TOPIC, seal.seal(TOPIC, b"", stamp))
            assert bytes(body) == b"" and back == stamp


# --- properties -------------------------------------------------------------------------------------------------------

topics_text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=80)
any_topic = st.text(max_size=40) | st.binary(max_size=40).map(lambda b: b.decode("utf-8", "surrogateescape"))
stamps = st.builds(
    Stamp, st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.floats(allow_nan=False, allow_infinity=False)
)
secrets_ = st.binary(min_size=MIN_SECRET_BYTES, max_size=64)


@FAST
@given(secret=st.none() | secrets_, topic=topics_text, body=st.binary(max_size=2000), stamp=stamps)
def test_fuzz_round_trip(secret, topic, body, stamp):
    seal = Seal(secret)
    payload = seal.seal(topic, body, stamp)
    assert len(payload) == sealed_size(len(body), seal.sealed)
    got, back = seal.open(topic, payload)
    assert bytes(got) == body
    assert back == stamp
    assert got.obj is payload  # a view into the payload, not a copy


@FAST
@given(secret=st.none() | secrets_, topic=any_topic, payload=st.binary(max_size=300))
def test_fuzz_open_arbitrary_bytes_raises_only_protocol_error(secret, topic, payload):
    try:
        Seal(secret).open(topic, payload)
    except ProtocolError:
        pass


@FAST
@given(secret=st.none() | secrets_, topic=any_topic, flags=st.integers(0, 255), rest=st.binary(max_size=120))
def test_fuzz_open_arbitrary_bytes_behind_a_valid_magic_and_version(secret, topic, flags, rest):
    payload = ENVELOPE_MAGIC + bytes([ENVELOPE_VERSION, flags]) + rest
    try:
        Seal(secret).open(topic, payload)
    except ProtocolError:
        pass


@FAST
@given(data=st.data(), secret=secrets_, topic=topics_text.filter(bool), body=st.binary(max_size=500), stamp=stamps)
def test_fuzz_single_bit_flips_are_refused(data, secret, topic, body, stamp):
    seal = Seal(secret)
    payload = bytearray(seal.seal(topic, body, stamp))
    where = data.draw(st.integers(0, len(payload) - 1))
    payload[where] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ProtocolError):
        seal.open(topic, bytes(payload))
    raw = bytearray(topic.encode())
    where = data.draw(st.integers(0, len(raw) - 1))
    raw[where] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(ProtocolError):
        seal.open(bytes(raw).decode("utf-8", "surrogateescape"), seal.seal(topic, body, stamp))


@FAST
@given(secret=secrets_, other=secrets_, topic=topics_text, body=st.binary(max_size=500), stamp=stamps)
def test_fuzz_another_secret_is_refused(secret, other, topic, body, stamp):
    if secret == other:
        return
    with pytest.raises(ProtocolError, match=BAD_SIGNATURE):
        Seal(other).open(topic, Seal(secret).seal(topic, body, stamp))


@FAST
@given(secret=secrets_, topic=topics_text, body=st.binary(max_size=500), stamp=stamps)
def test_fuzz_mode_mismatch_is_refused_both_ways(secret, topic, body, stamp):
    sealed = Seal(secret)
    with pytest.raises(ProtocolError, match=NOT_SEALED):
        sealed.open(topic, OPEN.seal(topic, body, stamp))
    with pytest.raises(ProtocolError, match=HAS_NO_SECRET):
        OPEN.open(topic, sealed.seal(topic, body, stamp))


# --- large bodies -----------------------------------------------------------------------------------------------------


def test_a_100_mb_body_is_copied_once_to_seal_and_never_to_open():
    body = bytes(100 * 1024 * 1024)
    tracemalloc.start()
    try:
        payload = SEALED.seal(TOPIC, body, STAMP)
        _, sealing_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        before, _ = tracemalloc.get_traced_memory()  # the payload, allocated while tracing
        opened, stamp = SEALED.open(TOPIC, payload)
        opening_peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert sealing_peak < len(body) + 1024 * 1024  # the payload itself, and no second copy
    assert opening_peak < 1024 * 1024  # nothing of the body's size
    assert len(opened) == len(body) and opened.obj is payload and stamp == STAMP
    del opened


# --- Seal, Stamp, Stamper ---------------------------------------------------------------------------------------------


def test_seal_does_not_keep_or_show_the_secret():
    seal = Seal(SECRET)
    assert repr(seal) == "Seal(sealed)" and repr(OPEN) == "Seal(open)"
    assert all(SECRET not in bytes(v) for v in vars(seal).values() if isinstance(v, (bytes, bytearray)))


@pytest.mark.parametrize("secret", [b"", b"x", b"x" * (MIN_SECRET_BYTES - 1)])
def test_short_secrets_are_refused(secret):
    with pytest.raises(ValueError, match="at least 16"):
        Seal(secret)


def test_secret_must_be_bytes():
    with pytest.raises(TypeError):
        Seal("0123456789abcdef0123")
    assert Seal(bytearray(SECRET)).seal(TOPIC, BODY, STAMP) == SEALED.seal(TOPIC, BODY, STAMP)


@pytest.mark.parametrize("content", [SECRET, SECRET + b"\n", SECRET + b"\r\n", SECRET + b"\n\n"])
def test_secret_file_strips_trailing_newlines(tmp_path, content):
    path = tmp_path / "secret"
    path.write_bytes(content)
    assert Seal(read_secret_file(path)).seal(TOPIC, BODY, STAMP) == SEALED.seal(TOPIC, BODY, STAMP)
    assert Seal(read_secret_file(str(path))).sealed


@pytest.mark.parametrize(
    "content, match",
    [
        (b"", "is empty"),
        (b"\n", "is empty"),
        (b"\r\n\n", "is empty"),
        (b"short\n", "5 bytes; it needs at least 16"),
        (b"x" * 15, "15 bytes"),
    ],
)
def test_secret_file_refuses_empty_or_short(tmp_path, content, match):
    path = tmp_path / "fl.secret"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as caught:
        Seal(read_secret_file(path))
    assert str(path) in str(caught.value)


def test_secret_file_that_cannot_be_read(tmp_path):
    for path in (tmp_path / "missing", tmp_path):
        with pytest.raises(ValueError, match="cannot read") as caught:
            Seal(read_secret_file(path))
        assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    "fields",
    [
        (-1, 0, 0.0),
        (0, -1, 0.0),
        (2**64, 0, 0.0),
        (0, 2**64, 0.0),
        (True, 0, 0.0),
        (0, 0, math.nan),
        (0, 0, math.inf),
        (0, 0, "1"),
        (1.0, 0, 0.0),
        (0, 0, None),
    ],
)
def test_invalid_stamps_cannot_be_made(fields):
    with pytest.raises(ValueError):
        Stamp(*fields)


def test_seal_refuses_what_cannot_be_a_topic_or_stamp():
    for seal in (SEALED, OPEN):
        with pytest.raises(ValueError):
            seal.seal("a\x00b", BODY, STAMP)
        with pytest.raises(ValueError):
            seal.seal("a\udcffb", BODY, STAMP)
        with pytest.raises(TypeError):
            seal.seal(TOPIC, BODY, (1, 2, 3.0))


def test_stamper_counts_and_keeps_its_incarnation():
    times = iter([10.0, 10.5, 11.25])
    stamper = Stamper(incarnation=77, clock=lambda: next(times))
    assert [stamper.next() for _ in range(3)] == [Stamp(77, 1, 10.0), Stamp(77, 2, 10.5), Stamp(77, 3, 11.25)]
    assert stamper.seq == 3
    assert 0 < fresh_stamper().incarnation < 2**64


@FAST
@given(start=st.integers(0, (2**52 - 10**12 - 1) * 1000), later_by_us=st.integers(1, 10**12))
def test_a_later_life_has_a_larger_incarnation(start, later_by_us):
    first = new_incarnation(start)
    second = new_incarnation(start + later_by_us * 1000)
    assert 0 <= first < second < 2**64


def test_incarnation_of_now_is_ordered_and_fits():
    a = new_incarnation(__import__("time").time_ns())
    b = new_incarnation(__import__("time").time_ns() + 1_000)
    assert 0 < a < b < 2**64
    assert new_incarnation(2**52 * 1000 - 1) < 2**64  # microseconds fit 52 bits until the year 2112
