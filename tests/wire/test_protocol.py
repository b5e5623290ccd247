import dataclasses
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from peer.wire import weights
from peer.wire.errors import ProtocolError
from peer.wire.ids import RUN_ID_PATTERN, valid_run_id
from peer.wire.messages import (
    FRAME_MAGIC,
    MAX_CONTROL_BYTES,
    MAX_TERM,
    MESSAGE_TYPES,
    PROTOCOL_VERSION,
    Aggregation,
    Claim,
    Evaluation,
    Finish,
    Heartbeat,
    Init,
    Keys,
    Masked,
    Maskers,
    Metrics,
    Presence,
    Reveal,
    Roster,
    ServerState,
    Shares,
    Solution,
    Training,
    Unmask,
    Vote,
    decode,
    encode,
    encoded_size,
)
from peer.wire.topics import Topics
from peer.wire.weights import MAX_TENSOR_DIMS, MAX_TENSORS, WeightCodec

TOPICS = sorted({cls.TOPIC for cls in MESSAGE_TYPES.values()})  # every topic a message type is sent on

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def weights_equal(a, b):
    """Bit-for-bit, so -0.0 and subnormals count too."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and np.array_equal(x.view(np.uint32), y.view(np.uint32))
        for x, y in zip(a, b)
    )


def header_of(message):
    return {k: v for k, v in vars(message).items() if k != "weights"}


def assert_same_message(got, want):
    assert type(got) is type(want)
    assert header_of(got) == header_of(want)
    if want.CARRIES_WEIGHTS:
        dtype = np.uint32 if want.INTEGER_WEIGHTS else np.float32
        assert weights_equal(got.weights, [np.asarray(w, dtype) for w in want.weights])


def small_weights():
    # No 0-d tensor here: scalars have their own tests, so a scalar bug does not mask everything else.
    return [
        np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
        np.array([-1.5, 0.0, 2.25], np.float32),
        np.array([[3.0]], np.float32),
        np.zeros((0, 4), np.float32),
    ]


# One valid instance of every message type.
SAMPLES = [
    Init(
        peer="peer-1",
        term=0,
        round=0,
        pid=4321,
        train_samples=600,
        test_samples=200,
        reply=False,
        model="0123456789abcdef",
    ),
    Presence(peer="peer-1", status="online"),
    Presence(peer="peer_2.b", status="offline"),
    Vote(term=3, peer="peer-2", vote=0.625, round=4, reason="controller silent"),
    Claim(term=3, peer="peer-2", vote=0.625, round=4, reason="won", members=("peer-1", "peer-2", "peer-3")),
    Heartbeat(term=3, controller="peer-2", round=5, phase="training", model="0123456789abcdef"),
    Training(term=3, controller="peer-2", round=5, attempt=1, trainers=("peer-1", "peer-3"), digest="ab" * 16),
    Solution(term=3, round=5, attempt=2, peer="peer-3", samples=1200, loss=0.314159, weights=small_weights()),
    Aggregation(term=3, controller="peer-2", round=5, trainers=("peer-1", "peer-3"), weights=small_weights()),
    Aggregation(
        term=3,
        controller="peer-2",
        round=6,
        trainers=("peer-1",),
        weights=small_weights(),
        evaluators=("peer-1",),
        plan={"aggregation": "fedavg", "server_optimizer": "adam", "server_lr": 0.01, "dp_local": False, "x": None},
    ),
    ServerState(
        term=3,
        controller="peer-2",
        round=6,
        digest="cd" * 16,
        optimizer="adam",
        step=6,
        participation={"peer-1": 3, "peer-3": 2},
        unattributed=1,
        weights=small_weights() + small_weights(),
    ),
    Evaluation(term=3, round=5, peer="peer-4", accuracy=0.9123, loss=0.25, samples=2000),
    Metrics(
        term=3,
        controller="peer-2",
        round=5,
        accuracy=1.0,
        loss=0.0,
        samples=10000,
        trainers=("peer-1", "peer-3"),
        duration_s=12.5,
        bytes=1_234_567,
        run_started=1_700_000_000.25,
    ),
    Metrics(
        term=3,
        controller="peer-2",
        round=6,
        accuracy=0.5,
        loss=1.0,
        samples=100,
        trainers=("peer-1",),
        duration_s=1.0,
        bytes=1,
        run_started=1_700_000_000.25,
        epsilon=2.5,
    ),
    Finish(term=3, controller="peer-2", round=10, reason="target accuracy reached", accuracy=0.991),
    # secure aggregation (tests/wire/test_secure_messages.py has their own rules)
    Keys(term=3, round=5, attempt=1, peer="peer-3", share_key="ab" * 32, mask_key="cd" * 32, seed_digest="ef" * 32),
    Roster(
        term=3,
        controller="peer-2",
        round=5,
        attempt=1,
        threshold=2,
        clip=8.0,
        weight_bound=2400,
        keys=(("peer-1", "01" * 32, "02" * 32, "03" * 32), ("peer-3", "04" * 32, "05" * 32, "06" * 32)),
    ),
    Shares(term=3, round=5, attempt=1, peer="peer-3", ciphertexts=(("peer-1", "A" * 107 + "="),)),
    Maskers(term=3, controller="peer-2", round=5, attempt=1, maskers=("peer-1", "peer-3")),
    Masked(
        term=3,
        round=5,
        attempt=1,
        peer="peer-3",
        samples=1200,
        loss=0.5,
        weights=[np.array([0, 1, 2**32 - 1], np.uint32)],
    ),
    Unmask(term=3, controller="peer-2", round=5, attempt=1, survivors=("peer-1", "peer-3"), dropped=()),
    Reveal(term=3, round=5, attempt=1, peer="peer-3", shares=(("peer-1", "07" * 32), ("peer-3", "08" * 32))),
]
WEIGHTLESS = [m for m in SAMPLES if not m.CARRIES_WEIGHTS]


def sample(cls):
    return next(m for m in SAMPLES if type(m) is cls)


WEIGHTED = [m for m in SAMPLES if m.CARRIES_WEIGHTS]


def raw_frame(header: dict | bytes, weights: bytes = b"", version=PROTOCOL_VERSION, header_len=None) -> bytes:
    """A frame built by hand, so tests can put anything in it."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(head) if header_len is None else header_len
    return struct.pack("<4sBxxxI", FRAME_MAGIC, version, length) + head + weights


def payload_with(message, header: dict | bytes) -> bytes:
    """`message`'s wire form with its JSON header replaced."""
    head = header if isinstance(header, bytes) else json.dumps(header).encode()
    if message.CARRIES_WEIGHTS:
        return raw_frame(
            head, WeightCodec.encode(message.weights, weights.INTEGERS if message.INTEGER_WEIGHTS else "float32")
        )
    return head


def rejects(topic, payload):
    with pytest.raises(ProtocolError):
        decode(topic, payload)


# --- WeightCodec ------------------------------------------------------------------------------------------------------


def test_weight_bytes_layout_matches_hand_built_example():
    tensors = [np.array([1.0, -2.0], np.float32), np.zeros((0, 3), np.float32)]
    expected = (
        b"\x02\x00\x00\x00"  # 2 tensors
        + b"\x01\x01"
        + b"\x02\x00\x00\x00"  # float32, ndim 1, shape (2,)
        + b"\x00\x00\x80\x3f"
        + b"\x00\x00\x00\xc0"  # 1.0, -2.0
        + b"\x01\x02"
        + b"\x00\x00\x00\x00"
        + b"\x03\x00\x00\x00"  # float32, ndim 2, shape (0, 3), no values
    )
    assert WeightCodec.encode(tensors) == expected
    assert weights_equal(WeightCodec.decode(expected), tensors)


def test_scalar_weight_layout_has_zero_dimensions():
    scalar = np.array(0.5, np.float32)
    expected = b"\x01\x00\x00\x00" + b"\x01\x00" + b"\x00\x00\x00\x3f"  # 1 tensor, float32, ndim 0, 0.5
    assert WeightCodec.decode(expected)[0].shape == ()
    assert WeightCodec.encode([scalar]) == expected


@pytest.mark.parametrize("scalar", [np.array(0.5, np.float32), np.float32(-2.0), np.array(7.0)])
def test_scalar_weight_round_trip_keeps_shape(scalar):
    (back,) = WeightCodec.decode(WeightCodec.encode([scalar]))
    assert back.shape == () and back == np.float32(scalar)


def test_weight_layout_of_a_matrix_is_c_order_even_for_fortran_or_big_endian_input():
    matrix = np.array([[1, 2], [3, 4]], np.float32)
    want = b"\x01\x00\x00\x00\x01\x02\x02\x00\x00\x00\x02\x00\x00\x00" + struct.pack("<4f", 1, 2, 3, 4)
    assert WeightCodec.encode([matrix]) == want
    assert WeightCodec.encode([np.asfortranarray(matrix)]) == want
    assert WeightCodec.encode([matrix.astype(">f4")]) == want
    assert WeightCodec.encode([matrix.T.T]) == want


def test_empty_weight_list():
    assert WeightCodec.encode([]) == b"\x00\x00\x00\x00"
    assert WeightCodec.decode(b"\x00\x00\x00\x00") == []


finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


def tensors_of(min_dims):
    return st.lists(
        hnp.arrays(
            np.float32, hnp.array_shapes(min_dims=min_dims, max_dims=4, min_side=0, max_side=5), elements=finite_f32
        ),
        max_size=6,
    )


@FAST
@given(tensors_of(min_dims=1))
def test_weight_round_trip_is_exact(tensors):
    data = WeightCodec.encode(tensors)
    back = WeightCodec.decode(data)
    assert weights_equal(back, tensors)
    assert all(t.dtype == np.float32 for t in back)
    # Exact size: header plus 4 bytes a value, nothing else.
    assert len(data) == 4 + sum(2 + 4 * t.ndim + 4 * t.size for t in tensors)


@FAST
@given(tensors_of(min_dims=0))
def test_weight_round_trip_with_scalars(tensors):
    assert weights_equal(WeightCodec.decode(WeightCodec.encode(tensors)), tensors)


def test_decoded_weights_are_writable_copies():
    data = WeightCodec.encode([np.ones(3, np.float32)])
    back = WeightCodec.decode(bytearray(data))
    back[0][0] = 7.0
    assert WeightCodec.decode(data)[0][0] == 1.0


def test_float64_input_is_rounded_to_float32():
    values = np.array([0.1, 1e-40, 3.4e38], np.float64)
    (back,) = WeightCodec.decode(WeightCodec.encode([values]))
    assert back.dtype == np.float32
    assert np.array_equal(back, values.astype(np.float32))


def test_weight_limits_are_inclusive():
    at_limit = WeightCodec.encode([np.array(1.0, np.float32)] * MAX_TENSORS)
    assert len(WeightCodec.decode(at_limit)) == MAX_TENSORS
    deepest = np.ones((1,) * MAX_TENSOR_DIMS, np.float32)
    assert WeightCodec.decode(WeightCodec.encode([deepest]))[0].shape == deepest.shape


GOOD_WEIGHTS = WeightCodec.encode([np.array([1.0, 2.0], np.float32), np.array(3.0, np.float32)])


@pytest.mark.parametrize(
    "data, why",
    [
        (b"", "empty"),
        (b"\x01\x00\x00", "truncated count"),
        (b"\x01\x00\x00\x00", "tensor promised, no header"),
        (b"\x01\x00\x00\x00\x01", "truncated tensor header"),
        (b"\x01\x00\x00\x00\x01\x02\x02\x00\x00\x00", "truncated shape"),
        (b"\x01\x00\x00\x00\x01\x01\x02\x00\x00\x00" + b"\x00" * 7, "truncated values"),
        (b"\x01\x00\x00\x00\x02\x01\x02\x00\x00\x00" + b"\x00" * 3, "truncated float16 values"),
        (b"\x01\x00\x00\x00\x04\x01\x01\x00\x00\x00" + b"\x00" * 4, "unknown dtype"),
        (b"\x01\x00\x00\x00\x00\x01\x01\x00\x00\x00" + b"\x00" * 4, "dtype zero"),
        (GOOD_WEIGHTS[:-1], "last byte cut"),
        (GOOD_WEIGHTS + b"\x00", "one trailing byte"),
        (GOOD_WEIGHTS + GOOD_WEIGHTS, "two frames glued"),
        (struct.pack("<I", MAX_TENSORS + 1) + b"\x00\x00\x00\x00" * (MAX_TENSORS + 1), "too many tensors"),
        (struct.pack("<I", 2**32 - 1), "absurd tensor count"),
        (
            b"\x01\x00\x00\x00\x01"
            + bytes([MAX_TENSOR_DIMS + 1])
            + b"\x01\x00\x00\x00" * (MAX_TENSOR_DIMS + 1)
            + b"\x00" * 4,
            "too many dimensions",
        ),
        (b"\x01\x00\x00\x00\x01\x02" + struct.pack("<2I", 2**32 - 1, 2**32 - 1), "shape far larger than the data"),
    ],
)
def test_weight_decode_rejects_malformed(data, why):
    with pytest.raises(ProtocolError):
        WeightCodec.decode(data)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_weight_decode_rejects_non_finite(bad):
    data = WeightCodec.encode([np.array([0.0, 1.0], np.float32), np.array([[1.0, bad]], np.float32)])
    with pytest.raises(ProtocolError):
        WeightCodec.decode(data)


@pytest.fixture
def small_weight_limit(monkeypatch):
    """MAX_WEIGHT_BYTES at 1 MiB: the limit's rules, without gigabyte buffers in the tests."""
    monkeypatch.setattr(weights, "MAX_WEIGHT_BYTES", 1 << 20)
    return 1 << 20


def test_weight_decode_rejects_oversized_buffer(small_weight_limit):
    # Zero tensors then padding: the size check must come before anything else is read.
    data = b"\x00\x00\x00\x00" + bytes(small_weight_limit)
    with pytest.raises(ProtocolError, match="limit"):
        WeightCodec.decode(data)


def test_zero_size_tensor_with_huge_other_dim_is_fine():
    data = b"\x01\x00\x00\x00\x01\x02" + struct.pack("<2I", 0, 2**32 - 1)
    (back,) = WeightCodec.decode(data)
    assert back.shape == (0, 2**32 - 1) and back.size == 0


# --- every message type -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_message_round_trip(message):
    payload = encode(message)
    assert_same_message(decode(message.TOPIC, payload), message)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_encoding_form(message):
    payload = encode(message)
    if message.CARRIES_WEIGHTS:
        assert payload[:4] == FRAME_MAGIC and payload[4] == PROTOCOL_VERSION
        (header_len,) = struct.unpack_from("<I", payload, 8)
        header = json.loads(payload[12 : 12 + header_len])
        assert weights_equal(WeightCodec.decode(payload[12 + header_len :]), message.weights)
    else:
        header = json.loads(payload)
    assert header["v"] == PROTOCOL_VERSION and header["type"] == message.TYPE
    assert "weights" not in header
    assert set(header) - {"v", "type"} == set(header_of(message))


def test_every_registered_type_has_a_sample():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())


def test_float_fields_accept_json_integers():
    header = json.loads(encode(sample(Evaluation)))
    header.update(accuracy=1, loss=3)
    message = decode("evaluation", json.dumps(header).encode())
    assert message.accuracy == 1.0 and message.loss == 3.0


def test_boundary_values_are_accepted():
    message = Evaluation(term=0, round=0, peer="x" * 64, accuracy=0.0, loss=0.0, samples=0)
    assert_same_message(decode("evaluation", encode(message)), message)
    message = Vote(term=MAX_TERM, peer="A.b_c-9", vote=1.0, round=2**53 - 1, reason="r" * 200)
    assert_same_message(decode("election", encode(message)), message)
    message = Claim(term=1, peer="p", vote=0.0, round=1, reason="", members=())
    assert_same_message(decode("election", encode(message)), message)


def test_weighted_message_with_no_tensors_round_trips():
    message = Aggregation(term=1, controller="c", round=1, trainers=(), weights=[])
    assert_same_message(decode("aggregation", encode(message)), message)


# --- Topics -----------------------------------------------------------------------------------------------------------

SENDERS = {
    Init: "peer",
    Presence: "peer",
    Vote: "peer",
    Claim: "peer",
    Solution: "peer",
    Evaluation: "peer",
    Heartbeat: "controller",
    Training: "controller",
    Aggregation: "controller",
    Metrics: "controller",
    Finish: "controller",
    Keys: "peer",
    Shares: "peer",
    Masked: "peer",
    Reveal: "peer",
    Roster: "controller",
    Maskers: "controller",
    Unmask: "controller",
    ServerState: "controller",
}


def test_every_type_names_its_sender():
    assert set(SENDERS) == set(MESSAGE_TYPES.values())
    for message in SAMPLES:
        assert message.sender == getattr(message, SENDERS[type(message)])


def test_topics_with_custom_prefix_and_run():
    topics = Topics("fl/test", "run-7")
    assert topics.subscription == "fl/test/run-7/#"
    assert topics.presence("peer-9") == "fl/test/run-7/presence/peer-9"
    assert topics.topic("evaluation", "peer-1") == "fl/test/run-7/evaluation/peer-1"
    assert topics.of(Presence(peer="peer-9", status="online")) == "fl/test/run-7/presence/peer-9"
    assert (
        topics.of(sample(Vote))
        == topics.of(dataclasses.replace(sample(Claim), peer="peer-2"))
        == "fl/test/run-7/election/peer-2"
    )
    assert topics.of(sample(Heartbeat)) == "fl/test/run-7/heartbeat/peer-2"
    assert topics.parse("fl/test/run-7/metrics/peer-2") == ("metrics", "peer-2")
    assert topics.parse("fl/test/run-7/presence/peer-9") == ("presence", "peer-9")


def test_default_prefix_and_run():
    topics = Topics()
    assert topics.subscription == "sd/default/#"
    assert topics.of(sample(Heartbeat)) == "sd/default/heartbeat/peer-2"
    assert topics.parse("sd/default/heartbeat/peer-2") == ("heartbeat", "peer-2")
    assert Topics("sd").run_id == "default"


@pytest.mark.parametrize(
    "foreign",
    [
        "sd/default/metrics/peer-2",  # another prefix
        "fl/test/run-8/metrics/peer-2",
        "fl/test/run/metrics/peer-2",
        "fl/test/run-7x/metrics/peer-2",  # another run
        "fl/test/metrics/peer-2",
        "fl/test/run-7/metrics",
        "fl/test/run-7/metrics/",
        "fl/test/run-7",
        "fl/test/run-7/",
        "fl/test",
        "fl",
        "",
        "/fl/test/run-7/metrics/peer-2",  # levels
        "fl/test/run-7/metrics/peer-2/x",
        "fl/test/run-7/presence/peer-9/extra",
        "other/fl/test/run-7/metrics/peer-2",
        "fl/testing/run-7/metrics/peer-2",
        "fl/test/run-7/nope/peer-2",
        "fl/test/run-7/Metrics/peer-2",
        "fl/test/run-7/vote/peer-2",  # unknown kind
        "fl/test/run-7/claim/peer-2",
        "fl/test/run-7//peer-2",
        "fl/test/run-7/metrics/has space",
        "fl/test/run-7/metrics/+",
        "fl/test/run-7/metrics/#",  # bad sender
        "fl/test/run-7/metrics/" + "x" * 65,
        "fl/test/run-7/metrics/pe\u00e9r",
        "fl/test/run-7/metrics/peer\n",
        "fl/test/run-7/+/peer-2",
        "fl/test/run-7/#",
    ],
)
def test_parse_refuses_every_other_topic(foreign):
    assert Topics("fl/test", "run-7").parse(foreign) is None


def test_parse_refuses_non_strings():
    for value in (None, b"sd/default/init/p", 5):
        assert Topics().parse(value) is None


def test_kinds_are_the_message_topics():
    topics = Topics()
    for kind in TOPICS:
        assert topics.parse(topics.topic(kind, "p")) == (kind, "p")


@pytest.mark.parametrize(
    "kind, sender",
    [
        ("vote", "p"),
        ("nope", "p"),
        ("", "p"),
        ("init", ""),
        ("init", "a/b"),
        ("init", "+"),
        ("init", "x" * 65),
        ("init", None),
    ],
)
def test_topic_refuses_bad_kind_or_sender(kind, sender):
    with pytest.raises(ValueError):
        Topics().topic(kind, sender)


def test_of_needs_a_message_not_a_class():
    with pytest.raises(TypeError):
        Topics().of(Heartbeat)


@pytest.mark.parametrize("run_id", ["", "x" * 65, "a/b", "a b", "+", "#", "r\u00e9", "run\n", None, 5])
def test_bad_run_ids(run_id):
    assert not valid_run_id(run_id)
    with pytest.raises(ValueError, match="run id"):
        Topics("sd", run_id)


@pytest.mark.parametrize("run_id", ["default", "x" * 64, "A", "2024-01-01_run.3", "-", "."])
def test_good_run_ids(run_id):
    assert valid_run_id(run_id) and RUN_ID_PATTERN.fullmatch(run_id)
    assert Topics("sd", run_id).subscription == f"sd/{run_id}/#"


@pytest.mark.parametrize("prefix", ["", "/", "sd/", "/sd", "sd//x", "s d", "sd/#", "sd/+"])
def test_bad_prefixes(prefix):
    with pytest.raises(ValueError, match="prefix"):
        Topics(prefix)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_full_topic_round_trip(message):
    topics = Topics("fl/test", "run-7")
    full = topics.of(message)
    assert full == f"fl/test/run-7/{message.TOPIC}/{message.sender}"
    kind, sender = topics.parse(full)
    assert (kind, sender) == (message.TOPIC, message.sender)
    assert_same_message(decode(kind, encode(message), sender), message)


# --- decode binds the sender ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_message_published_as_another_peer_is_refused(message):
    with pytest.raises(ProtocolError, match=f"claims to be {message.sender} but was published as peer-x"):
        decode(message.TOPIC, encode(message), sender="peer-x")
    assert_same_message(decode(message.TOPIC, encode(message), sender=message.sender), message)
    assert_same_message(decode(message.TOPIC, encode(message), None), message)


def test_sender_is_checked_before_the_weights_are_read():
    # A frame whose weights are broken but whose header is a forgery says so: the header is checked first.
    message = sample(Solution)
    payload = raw_frame(message.header(), b"\x01\x00")
    with pytest.raises(ProtocolError, match="claims to be"):
        decode("solution", payload, sender="peer-x")
    with pytest.raises(ProtocolError, match="weights"):
        decode("solution", payload, sender=message.sender)


def test_decode_reads_a_memoryview_body():
    for message in SAMPLES:
        payload = b"ENVELOPE" + encode(message) + b"MAC"
        body = memoryview(payload)[8:-3]
        assert_same_message(decode(message.TOPIC, body, message.sender), message)


# --- decode rejects, always with ProtocolError --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b" ",
        b"\x00",
        b"\xff\xfe\xfd",
        b"hello",
        b"{",
        b"{}",
        b"[]",
        b"null",
        b"1",
        b'"evaluation"',
        b"true",
        b'{"v":1,"type":"evaluation"',
        '{"v":1}'.encode("utf-16"),
        b"SDF",
        b"SDFL",
        b"SDFL\x01\x00\x00",
    ],
)
def test_garbage_is_rejected(payload):
    for topic in TOPICS:
        rejects(topic, payload)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("version", [0, 1, 3, -1, "2", None, 2.5, [2]])
def test_wrong_version(message, version):
    header = message.header() | {"v": version}
    rejects(message.TOPIC, payload_with(message, header))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_missing_version(message):
    header = message.header()
    del header["v"]
    rejects(message.TOPIC, payload_with(message, header))


@pytest.mark.parametrize("message", [sample(Evaluation), sample(Training)], ids=lambda m: type(m).__name__)
def test_version_true_is_not_version_1(message):
    # JSON `true` is not the integer 1, though Python's True == 1.
    rejects(message.TOPIC, payload_with(message, message.header() | {"v": True}))


@pytest.mark.parametrize("type_", ["nope", "", "Evaluation", None, 5, 1.0, True])
def test_unknown_type(type_):
    for topic in TOPICS:
        rejects(topic, json.dumps({"v": 1, "type": type_}).encode())


@pytest.mark.parametrize("type_", [[], {"evaluation": 1}])
def test_unhashable_type_value_is_a_protocol_error(type_):
    rejects("evaluation", json.dumps({"v": 1, "type": type_}).encode())
    rejects("training", raw_frame({"v": 1, "type": type_}, WeightCodec.encode([])))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_missing_type(message):
    header = message.header()
    del header["type"]
    rejects(message.TOPIC, payload_with(message, header))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_wrong_topic(message):
    for topic in TOPICS + ["presence/peer-1", "", "nope"]:
        if topic != message.TOPIC:
            rejects(topic, encode(message))


def test_missing_every_field():
    for message in SAMPLES:
        for name in header_of(message):
            header = message.header()
            del header[name]
            with pytest.raises(ProtocolError, match=name):
                decode(message.TOPIC, payload_with(message, header))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
@pytest.mark.parametrize("extra", [{"extra": 1}, {"Term": 1}, {"": None}])
def test_extra_fields(message, extra):
    rejects(message.TOPIC, payload_with(message, message.header() | extra))


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_weights_key_in_the_json_header_is_an_extra_field(message):
    # The weights travel after the header; a "weights" key inside it is not part of any message.
    rejects(message.TOPIC, payload_with(message, message.header() | {"weights": [[1.0]]}))


def test_weighted_message_without_frame_is_rejected():
    for message in WEIGHTED:
        rejects(message.TOPIC, json.dumps(message.header()).encode())


def test_weightless_message_in_a_frame_is_rejected():
    for message in WEIGHTLESS:
        rejects(message.TOPIC, raw_frame(message.header(), WeightCodec.encode([])))


NOT_PEER_IDS = ["", " ", "has space", "a/b", "+", "#", "x" * 65, "peer\n", "pe\u00e9r", 5, None, True, ["peer-1"]]
NOT_COUNTS = [True, False, -1, 1.5, 1.0, "1", None, [1], {}, 2**53, 10**30]
NOT_UNIT = [-0.01, 1.0000001, 2, True, "0.5", None, [0.5]]
NOT_NON_NEGATIVE = [-1e-9, -1, True, "1", None, {}]
NOT_TEXT = [5, None, True, ["text"], {"a": "b"}, "x" * 201]
NOT_PEER_LISTS = ["peer-1", None, 5, {"peer-1": 1}, ["peer-1", "peer-1"], ["bad id"], [1], [None], [["peer-1"]]]
NOT_KEYS = ["AB" * 32, "ab" * 31, "ab" * 33, "xy" * 32, "", 0, None, ["ab" * 32]]
# rows [peer, value, ...]: not a list, a bad peer, two rows of one peer, out of order, a row of the wrong width
NOT_ROWS = [
    None,
    "rows",
    {"peer-1": "ab"},
    [["bad id", "ab" * 32]],
    [["peer-2", "ab" * 32], ["peer-1", "ab" * 32]],
    [["peer-1", "ab" * 32], ["peer-1", "ab" * 32]],
    [["peer-1"]],
    ["peer-1"],
    [["peer-1"]] * 201,
]

BAD_VALUES = {
    "peer": NOT_PEER_IDS,
    "controller": NOT_PEER_IDS,
    "term": NOT_COUNTS + [MAX_TERM + 1, 2**53 - 1],
    "round": NOT_COUNTS,
    "samples": NOT_COUNTS,
    "bytes": NOT_COUNTS,
    "pid": NOT_COUNTS,
    "train_samples": NOT_COUNTS,
    "test_samples": NOT_COUNTS,
    "reply": [1, 0, "true", None, []],
    "attempt": NOT_COUNTS + [0],
    "vote": NOT_UNIT,
    "accuracy": NOT_UNIT,
    "loss": NOT_NON_NEGATIVE,
    "duration_s": NOT_NON_NEGATIVE,
    "run_started": NOT_NON_NEGATIVE,
    "status": ["away", "", "Online", True, None, ["online"], 1],
    "reason": NOT_TEXT,
    "phase": NOT_TEXT,
    "model": ["0123456789ABCDEF", "0123456789abcde", "0123456789abcdef0", "0123456789abcdeg", "", 7, None, []],
    "digest": ["AB" * 16, "ab" * 15, "ab" * 17, "xy" * 16, "", 0, None, ["ab" * 16]],
    "trainers": NOT_PEER_LISTS,
    "members": NOT_PEER_LISTS,
    "evaluators": NOT_PEER_LISTS,
    "share_key": NOT_KEYS,
    "mask_key": NOT_KEYS,
    "seed_digest": NOT_KEYS,
    "threshold": [True, 1, 0, 201, 2.0, "2", None],
    "clip": [0, -1.0, 2.0**21, True, "8", None],
    "weight_bound": NOT_COUNTS + [0],
    "keys": NOT_ROWS + [[["peer-1", "ab" * 32, "ab" * 32]], [["peer-1", "AB" * 32, "ab" * 32, "ab" * 32]]],
    "ciphertexts": NOT_ROWS + [[["peer-1", "A" * 108]], [["peer-1", "A" * 106 + "=="]], [["peer-1", "*" * 108]]],
    "shares": NOT_ROWS + [[["peer-1", "ab" * 31]], [["peer-1", 5]]],
    "maskers": NOT_PEER_LISTS,
    "survivors": NOT_PEER_LISTS,
    "dropped": NOT_PEER_LISTS,
    "plan": [
        None,
        [],
        "fedavg",
        {"Upper": 1},
        {"": 1},
        {"k": [1]},
        {"k": {"a": 1}},
        {"k": "x" * 201},
        {f"k{i}": 1 for i in range(33)},
    ],
    "epsilon": [v for v in NOT_NON_NEGATIVE if v is not None],  # None: no DP in this run
    "optimizer": NOT_TEXT,
    "step": NOT_COUNTS,
    "participation": [None, [], "peer-1", {"bad id!": 1}, {"peer-1": 0}, {"peer-1": 1.5}, {"peer-1": True}],
    "unattributed": NOT_COUNTS,
}


FIELD_CASES = [pytest.param(m, name, id=f"{type(m).__name__}.{name}") for m in SAMPLES for name in header_of(m)]


def test_every_field_has_bad_values():
    assert {name for m in SAMPLES for name in header_of(m)} <= set(BAD_VALUES)


@pytest.mark.parametrize("message, name", FIELD_CASES)
def test_bad_field_value(message, name):
    for value in BAD_VALUES[name]:
        payload = payload_with(message, message.header() | {name: value})
        # The error names the field, so the one-line log says what was wrong.
        with pytest.raises(ProtocolError, match=f"{message.TYPE}.{name}"):
            decode(message.TOPIC, payload)
            pytest.fail(f"{name}={value!r} was accepted")


NUMBER_FIELDS = [(m, name) for m in SAMPLES for name, v in header_of(m).items() if isinstance(v, float)]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
@pytest.mark.parametrize("message, name", NUMBER_FIELDS, ids=[f"{type(m).__name__}.{n}" for m, n in NUMBER_FIELDS])
def test_non_finite_numbers_written_by_hand(message, name, literal):
    # Python's json reads these non-standard literals; the validator must still say no.
    text = json.dumps(message.header() | {name: "@@"}).replace('"@@"', literal)
    rejects(message.TOPIC, payload_with(message, text.encode()))


def test_nan_accuracy_literal():
    rejects(
        "evaluation",
        b'{"v":1,"type":"evaluation","term":1,"round":1,"peer":"p","accuracy":NaN,"loss":0.5,"samples":10}',
    )


def test_huge_integer_in_a_float_field_is_a_protocol_error():
    # Fits in the JSON size limit, but float() of it overflows.
    text = (
        '{"v":1,"type":"evaluation","term":1,"round":1,"peer":"p","accuracy":0.5,"loss":1'
        + "0" * 400
        + ',"samples":10}'
    )
    rejects("evaluation", text.encode())


def test_integer_with_too_many_digits_is_a_protocol_error():
    # Python refuses to parse integers over 4300 digits with a plain ValueError.
    text = '{"v":1,"type":"evaluation","term":' + "1" * 5000 + "}"
    rejects("evaluation", text.encode())


def test_deeply_nested_json_is_a_protocol_error():
    # Far under the 64 KiB limit, but deep enough to exhaust the JSON parser's recursion.
    rejects("evaluation", b"[" * 50_000)
    rejects("evaluation", b'{"v":1,"type":"evaluation","reason":' + b"[" * 50_000 + b"]" * 50_000 + b"}")


def test_oversized_control_message():
    message = sample(Evaluation)
    header = json.dumps(message.header())
    padded = header[:-1] + " " * (MAX_CONTROL_BYTES - len(header) + 1) + "}"
    assert len(padded) == MAX_CONTROL_BYTES + 1
    rejects("evaluation", padded.encode())
    at_limit = header[:-1] + " " * (MAX_CONTROL_BYTES - len(header)) + "}"
    assert len(at_limit) == MAX_CONTROL_BYTES
    assert_same_message(decode("evaluation", at_limit.encode()), message)


def test_invalid_utf8_in_json():
    rejects("evaluation", b'{"v":1,"type":"evaluation","peer":"\xff"}')


# --- frames -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", WEIGHTED, ids=lambda m: type(m).__name__)
def test_frame_defects(message):
    good = encode(message)
    header = json.dumps(message.header()).encode()
    weights = WeightCodec.encode(message.weights)
    for cut in range(1, len(good)):
        rejects(message.TOPIC, good[:cut])
    rejects(message.TOPIC, good + b"\x00")
    rejects(message.TOPIC, good + good)
    rejects(message.TOPIC, raw_frame(header, weights, version=0))
    rejects(message.TOPIC, raw_frame(header, weights, version=1))
    rejects(message.TOPIC, raw_frame(header, weights, version=3))
    rejects(message.TOPIC, raw_frame(header, weights, header_len=len(header) + 1))
    rejects(message.TOPIC, raw_frame(header, weights, header_len=len(header) - 1))
    rejects(message.TOPIC, raw_frame(header, weights, header_len=2**32 - 1))
    rejects(message.TOPIC, raw_frame(header, weights, header_len=MAX_CONTROL_BYTES + 1))
    rejects(message.TOPIC, raw_frame(header, b""))
    rejects(message.TOPIC, raw_frame(b"[]", weights))
    rejects(message.TOPIC, raw_frame(b"\xff\xff", weights))


@pytest.mark.parametrize("message", WEIGHTED, ids=lambda m: type(m).__name__)
def test_frame_limits_on_weights(message):
    header = message.header()
    too_many = struct.pack("<I", MAX_TENSORS + 1) + b"\x00\x00\x00\x00" * (MAX_TENSORS + 1)
    rejects(message.TOPIC, raw_frame(header, too_many))
    too_deep = (
        b"\x01\x00\x00\x00" + bytes([MAX_TENSOR_DIMS + 1]) + b"\x01\x00\x00\x00" * (MAX_TENSOR_DIMS + 1) + b"\x00" * 4
    )
    rejects(message.TOPIC, raw_frame(header, too_deep))
    for bad in (np.nan, np.inf, -np.inf):
        weights = [np.ones(3, np.float32), np.array([[0.0, bad]], np.float32)]
        rejects(message.TOPIC, raw_frame(header, WeightCodec.encode(weights)))


def test_oversized_frame(small_weight_limit):
    message = WEIGHTED[0]
    payload = raw_frame(message.header(), b"\x00\x00\x00\x00" + bytes(small_weight_limit))
    rejects(message.TOPIC, payload)


def test_frame_reserved_bytes_do_not_matter():
    message = WEIGHTED[0]
    payload = bytearray(encode(message))
    payload[5:8] = b"\x01\x02\x03"
    assert_same_message(decode(message.TOPIC, bytes(payload)), message)


# --- fuzzing ----------------------------------------------------------------------------------------------------------


def decodes_or_rejects(topic, payload):
    """The property every input must satisfy: a valid message, or ProtocolError, nothing else."""
    try:
        message = decode(topic, payload)
    except ProtocolError:
        return None
    assert type(message).TOPIC == topic
    # Whatever was accepted is itself valid: re-encoding it round-trips.
    assert_same_message(decode(topic, encode(message)), message)
    return message


@FAST
@given(topic=st.sampled_from(TOPICS + ["presence/peer-1", "nope", ""]), payload=st.binary(max_size=300))
def test_fuzz_arbitrary_bytes(topic, payload):
    decodes_or_rejects(topic, payload)


@FAST
@given(topic=st.sampled_from(TOPICS), payload=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes_behind_a_frame_magic(topic, payload):
    decodes_or_rejects(topic, FRAME_MAGIC + payload)


def mutate(data: bytes, draw) -> bytes:
    kind = draw(st.sampled_from(["flip", "set", "truncate", "extend", "delete", "insert"]))
    if not data or kind == "extend":
        return data + draw(st.binary(min_size=1, max_size=16))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        return data[:at] + bytes([data[at] ^ (1 << draw(st.integers(0, 7)))]) + data[at + 1 :]
    if kind == "set":
        return data[:at] + bytes([draw(st.integers(0, 255))]) + data[at + 1 :]
    if kind == "delete":
        return data[:at] + data[at + 1 :]
    return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]


@FAST
@given(data=st.data())
def test_fuzz_mutated_valid_payloads(data):
    message = data.draw(st.sampled_from(SAMPLES))
    payload = encode(message)
    for _ in range(data.draw(st.integers(1, 4))):
        payload = mutate(payload, data.draw)
    topic = data.draw(st.sampled_from([message.TOPIC, message.TOPIC, message.TOPIC] + TOPICS))
    decodes_or_rejects(topic, payload)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@FAST
@given(data=st.data())
def test_fuzz_json_field_values(data):
    # Well-formed JSON with any value in any field: a sharper fuzz than raw bytes for the validators.
    message = data.draw(st.sampled_from(SAMPLES))
    header = message.header()
    for name in data.draw(st.lists(st.sampled_from(sorted(header)), min_size=1, max_size=3, unique=True)):
        header[name] = data.draw(json_values)
    decodes_or_rejects(message.TOPIC, payload_with(message, header))


# --- encode refuses what decode refuses ---------------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_encoded_size_is_the_encoded_length(message):
    assert encoded_size(message) == len(encode(message))


@pytest.mark.parametrize("message, name", FIELD_CASES)
def test_encode_refuses_a_bad_field_value(message, name):
    extra = [float("nan"), float("inf"), -float("inf")] if isinstance(getattr(message, name), float) else []
    for value in BAD_VALUES[name] + extra:
        with pytest.raises(ProtocolError, match=f"{message.TYPE}.{name}"):
            encode(dataclasses.replace(message, **{name: value}))
            pytest.fail(f"{name}={value!r} was encoded")


def test_encode_refuses_terms_above_max_term():
    vote = sample(Vote)
    assert decode("election", encode(dataclasses.replace(vote, term=MAX_TERM))).term == MAX_TERM == 2**31 - 1
    with pytest.raises(ProtocolError, match="vote.term"):
        encode(dataclasses.replace(vote, term=MAX_TERM + 1))
    rejects("election", payload_with(vote, vote.header() | {"term": MAX_TERM + 1}))


def test_encode_refuses_numpy_scalars_json_cannot_write():
    # np.float32 is no float and np.int64 no int: they used to fail in json.dumps with a TypeError.
    with pytest.raises(ProtocolError, match="evaluation.accuracy"):
        encode(dataclasses.replace(sample(Evaluation), accuracy=np.float32(0.5)))
    with pytest.raises(ProtocolError, match="evaluation.samples"):
        encode(dataclasses.replace(sample(Evaluation), samples=np.int64(5)))
    # np.float64 is a float: accepted, and written as one
    message = dataclasses.replace(sample(Evaluation), accuracy=np.float64(0.5))
    assert decode("evaluation", encode(message)).accuracy == 0.5


def test_encode_refuses_a_header_over_the_limit():
    # 10,000 trainers are allowed by the field rule, but their JSON is far over 64 KiB: decode would refuse it.
    trainers = tuple(f"peer-{i:058d}" for i in range(1200))
    message = dataclasses.replace(sample(Aggregation), trainers=trainers)
    with pytest.raises(ProtocolError, match="exceeds"):
        encode(message)
    rejects("aggregation", raw_frame(message.header(), WeightCodec.encode(message.weights)))
    fits = dataclasses.replace(sample(Metrics), trainers=trainers[:900])
    assert len(encode(fits)) <= MAX_CONTROL_BYTES


@pytest.mark.parametrize("message", [m for m in WEIGHTED if not m.INTEGER_WEIGHTS], ids=lambda m: type(m).__name__)
@pytest.mark.parametrize(
    "weights, why",
    [
        ([np.ones(3, np.float32), np.array([[0.0, np.nan]], np.float32)], "NaN or infinity"),
        ([np.array(np.inf, np.float32)], "NaN or infinity"),
        ([np.array([-np.inf])], "NaN or infinity"),
        ([np.array([1e39])], "NaN or infinity"),  # a float64 beyond float32: infinity on the wire
        ([np.zeros(1, np.float32)] * (MAX_TENSORS + 1), "tensors exceeds"),
        ([np.ones((1,) * (MAX_TENSOR_DIMS + 1), np.float32)], "dimensions exceeds"),
        ([np.zeros(2**20, np.float32)], "byte limit"),
        ([np.zeros((0, 2**32), np.float32)], r"2\^32 - 1"),
        ([["a", "b"]], "not a list of float tensors"),
        ([[[1.0], [1.0, 2.0]]], "not a list of float tensors"),
        (None, "not a list of float tensors"),
    ],
)
def test_encode_refuses_weights_decode_would_refuse(message, weights, why, small_weight_limit):
    with pytest.raises(ProtocolError, match=why):
        encode(dataclasses.replace(message, weights=weights))


def test_weights_at_the_limits_are_encoded(small_weight_limit):
    message = sample(Solution)
    largest = (small_weight_limit - 4 - 2 - 4) // 4
    for tensors in (
        [np.zeros(largest, np.float32)],
        [np.array(1.0, np.float32)] * MAX_TENSORS,
        [np.ones((1,) * MAX_TENSOR_DIMS, np.float32)],
        [np.full(3, np.finfo(np.float32).max)],
    ):
        message = dataclasses.replace(message, weights=tensors)
        payload = encode(message)
        assert len(payload) == encoded_size(message)
        assert_same_message(decode("solution", payload), message)


@FAST
@given(data=st.data())
def test_fuzz_encode_accepts_exactly_what_decode_accepts(data):
    # Any JSON values in any fields: encode(message) refuses it if and only if decode refuses its header.
    message = data.draw(st.sampled_from(SAMPLES))
    header = message.header()
    for name in data.draw(
        st.lists(st.sampled_from(sorted(set(header) - {"v", "type"})), min_size=1, max_size=3, unique=True)
    ):
        header[name] = data.draw(json_values)
    raw = json.dumps(header).encode()
    changed = {k: v for k, v in json.loads(raw).items() if k not in ("v", "type")}
    try:
        want = decode(message.TOPIC, payload_with(message, raw))
    except ProtocolError:
        want = None
    try:
        got = decode(message.TOPIC, encode(dataclasses.replace(message, **changed)))
    except ProtocolError:
        got = None
    assert (got is None) == (want is None), changed
    if want is not None:
        assert_same_message(got, want)


# --- float16 on the wire, digests, chunk topics -------------------------------------------------------------------------


def test_float16_round_trip_halves_the_values_and_keeps_them_to_float16_precision():
    rng = np.random.default_rng(3)
    tensors = [
        rng.normal(0, 0.05, (64, 32)).astype(np.float32),
        rng.normal(0, 1, 10).astype(np.float32),
        np.array(0.25, np.float32),
        np.zeros((0, 3), np.float32),
    ]
    data = WeightCodec.encode(tensors, "float16")
    assert len(data) == WeightCodec.size(tensors, "float16") == 4 + sum(2 + 4 * t.ndim + 2 * t.size for t in tensors)
    assert len(data) < 0.55 * len(WeightCodec.encode(tensors))
    back = WeightCodec.decode(data)
    assert all(b.dtype == np.float32 and b.shape == t.shape for b, t in zip(back, tensors))
    for b, t in zip(back, tensors):
        assert np.allclose(b, t, rtol=1e-3, atol=1e-7)
        assert np.array_equal(b, t.astype(np.float16).astype(np.float32))
    # what a receiver decodes is exactly what `quantized` gives the sender
    assert weights_equal(back, WeightCodec.quantized(tensors, "float16"))
    assert WeightCodec.quantized(tensors, "float32") is tensors


def test_float16_keeps_a_tensor_beyond_its_range_as_float32():
    big = np.array([1.0, 70000.0, -3.0], np.float32)  # 70000 overflows float16 (max 65504)
    small = np.array([0.5, 2.0], np.float32)
    data = WeightCodec.encode([big, small], "float16")
    assert data[4] == 1 and data[4 + 2 + 4 + 12] == 2  # dtype bytes: float32, then float16
    assert len(data) == WeightCodec.size([big, small], "float16")
    back = WeightCodec.decode(data)
    assert np.array_equal(back[0], big) and np.array_equal(back[1], small)


def test_float16_messages_round_trip_and_say_their_size():
    message = sample(Solution)
    payload = encode(message, "float16")
    assert len(payload) == encoded_size(message, "float16") < encoded_size(message)
    back = decode(message.TOPIC, payload)
    assert weights_equal(back.weights, WeightCodec.quantized(message.weights, "float16"))


def test_unknown_wire_dtype_is_refused():
    with pytest.raises(ProtocolError, match="wire dtype"):
        encode(sample(Solution), "int8")


def test_digest_names_values_and_shapes():
    tensors = small_weights()
    digest = WeightCodec.digest(tensors)
    assert len(digest) == 32 and digest == WeightCodec.digest([t.copy() for t in tensors])
    assert digest == WeightCodec.digest(WeightCodec.decode(WeightCodec.encode(tensors)))
    changed = [t.copy() for t in tensors]
    changed[1][0] += 1e-6
    assert WeightCodec.digest(changed) != digest
    assert WeightCodec.digest([tensors[0].reshape(3, 2), *tensors[1:]]) != digest


def test_chunk_topics_are_located_and_not_parsed_as_messages():
    topics = Topics("sd", "run-1")
    base = topics.topic("aggregation", "peer-2")
    assert topics.locate(base) == ("aggregation", "peer-2", None)
    assert topics.locate(Topics.chunk(base, 0)) == ("aggregation", "peer-2", 0)
    assert topics.locate(Topics.chunk(base, 17)) == ("aggregation", "peer-2", 17)
    assert topics.parse(Topics.chunk(base, 3)) is None and topics.parse(base) == ("aggregation", "peer-2")
    for bad in ("/x", "/01", "/-1", "/1/2", "/", "/1e3", "/٣", "/1234567"):
        assert topics.locate(base + bad) is None, bad


def test_subscriptions_keep_solutions_and_evaluations_for_the_controller():
    topics = Topics("sd", "run-1")
    everyone = dict(topics.subscriptions())
    controller = dict(topics.subscriptions(controller=True))
    assert set(controller) == {"sd/run-1/solution/#", "sd/run-1/evaluation/#", "sd/run-1/server-state/#"}
    assert not set(everyone) & set(controller)
    assert len(everyone) == len(MESSAGE_TYPES and {c.TOPIC for c in MESSAGE_TYPES.values()}) - 3
    # the server state is a model's size or two: its own never comes back to the controller that sent it
    assert controller["sd/run-1/server-state/#"] is True and controller["sd/run-1/solution/#"] is False
    # a peer hears its own ballots (the first claim delivered decides a term) but not its own models and orders
    assert everyone["sd/run-1/election/#"] is False and everyone["sd/run-1/init/#"] is False
    assert everyone["sd/run-1/aggregation/#"] is True and everyone["sd/run-1/training/#"] is True
    assert topics.aggregations() in everyone


def test_wire_size_counts_one_envelope_or_one_per_chunk():
    from peer.wire.chunks import CHUNK_HEAD_SIZE, split
    from peer.wire.envelope import chunk_limit, sealed_size, wire_size

    for sealed in (False, True):
        assert wire_size(1000, sealed, 65536) == sealed_size(1000, sealed)
        body = bytes(300_000)
        chunks = list(split([body], chunk_limit(65536, sealed), 1))
        assert wire_size(len(body), sealed, 65536) == sum(sealed_size(len(c), sealed) for c in chunks)
        assert all(sealed_size(len(c), sealed) <= 65536 for c in chunks) and CHUNK_HEAD_SIZE == 68
