"""The messages of the protocol: their types, the rules every field is checked by, encoding, and decoding that
validates.

A message's body: control messages are UTF-8 JSON objects with a "type" field. Messages that carry a model
(training, solution, aggregation) are a binary frame: a small fixed header, the same JSON object, then the weights in
`WeightCodec`'s format. Decoding never trusts the sender: every field is type- and range-checked, and anything off
raises `ProtocolError` (the peer logs it in one line and drops the message). Encoding refuses the same things, so a
peer never sends what its peers would drop. See docs/PROTOCOL.md for the reader's version.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field, fields
from typing import ClassVar

from peer.wire.errors import ProtocolError, require
from peer.wire.ids import PEER_ID_PATTERN
from peer.wire.weights import DIGEST_HEX, FINGERPRINT_HEX, WIRE_DTYPES, WeightCodec

PROTOCOL_VERSION = 2  # 2: per-tensor dtype (float16 on the wire), weightless training orders
MAX_CONTROL_BYTES = 64 * 1024
MAX_TERM = 2**31 - 1  # the highest term: encode and decode refuse more
_MAX_COUNT = 2**53 - 1  # the largest integer a JSON reader in any language reads exactly


# Binary frame of messages that carry weights: magic, version, JSON header length, JSON header, weights.
FRAME_MAGIC = b"SDFL"
_FRAME_HEAD = struct.Struct("<4sBxxxI")  # magic, version, 3 reserved bytes, header length


# --- field validation -------------------------------------------------------------------------------------------------


def _peer_id(value, name: str) -> str:
    require(isinstance(value, str) and PEER_ID_PATTERN.fullmatch(value) is not None, f"{name}: not a valid peer id")
    return value


def _count(value, name: str, low: int = 0, high: int = _MAX_COUNT) -> int:
    require(
        isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
        f"{name}: expected an integer from {low} to {high}",
    )
    return value


def _number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}: expected a number")
    try:
        value = float(value)
    except OverflowError:
        raise ProtocolError(f"{name}: too large") from None
    require(math.isfinite(value), f"{name}: not finite")
    require(low is None or value >= low, f"{name}: below {low}")
    require(high is None or value <= high, f"{name}: above {high}")
    return value


def _text(value, name: str, limit: int = 200) -> str:
    require(isinstance(value, str) and len(value) <= limit, f"{name}: expected a string of at most {limit} characters")
    return value


def _hex(length: int):
    def rule(value, name: str) -> str:
        require(
            isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value),
            f"{name}: expected {length} lowercase hex digits",
        )
        return value

    return rule


def _peer_list(value, name: str) -> tuple[str, ...]:
    require(isinstance(value, list) and len(value) <= 10_000, f"{name}: expected a list of peer ids")
    ids = tuple(_peer_id(item, f"{name}[]") for item in value)
    require(len(set(ids)) == len(ids), f"{name}: duplicate peer ids")
    return ids


def _one_of(value, name: str, allowed: tuple, spelled: str) -> object:
    """`value` if it is one of `allowed`, of the same type too (JSON's true is not 1); `spelled` names them."""
    require(any(type(value) is type(a) and value == a for a in allowed), f"{name}: expected {spelled}")
    return value


# Per field name: how to validate it. Messages below use only these names, so each rule lives in one place.
_FIELD_RULES = {
    "peer": _peer_id,
    "controller": _peer_id,
    "term": lambda v, n: _count(v, n, 0, MAX_TERM),
    "round": _count,
    "attempt": lambda v, n: _count(v, n, 1),
    "vote": lambda v, n: _number(v, n, 0.0, 1.0),
    "samples": _count,
    "accuracy": lambda v, n: _number(v, n, 0.0, 1.0),
    "loss": lambda v, n: _number(v, n, 0.0),
    "duration_s": lambda v, n: _number(v, n, 0.0),
    "bytes": _count,
    "run_started": lambda v, n: _number(v, n, 0.0),
    "status": lambda v, n: _one_of(v, n, ("online", "offline"), "online or offline"),
    "reason": _text,
    "phase": _text,
    "trainers": _peer_list,
    "members": _peer_list,
    "evaluators": _peer_list,
    "pid": _count,
    "train_samples": _count,
    "test_samples": _count,
    "reply": lambda v, n: _one_of(v, n, (True, False), "true or false"),
    "model": _hex(FINGERPRINT_HEX),
    "digest": _hex(DIGEST_HEX),
}


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str]
    TOPIC: ClassVar[str]  # the topic's kind level: <prefix>/<run_id>/<TOPIC>/<sender>
    SENDER: ClassVar[str]  # the field that names the peer sending it
    CARRIES_WEIGHTS: ClassVar[bool] = False

    @property
    def sender(self) -> str:
        """The id of the peer that sends this message: the last level of its topic."""
        return getattr(self, self.SENDER)

    def header(self) -> dict:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weights"}
        for key, value in body.items():
            if isinstance(value, tuple):
                body[key] = list(value)
        return {"v": PROTOCOL_VERSION, "type": self.TYPE, **body}


@dataclass(frozen=True)
class Init(Message):
    """A peer announces itself (on start, after every reconnect, and to every newcomer): its train and test sample
    counts bound what it may later declare in a solution or an evaluation; `model` is its model's fingerprint (tensor
    shapes and dtypes): peers of another model are not counted in this run."""

    TYPE = "init"
    TOPIC = "init"
    SENDER = "peer"
    peer: str
    term: int
    round: int
    pid: int
    train_samples: int
    test_samples: int
    reply: bool  # an answer to another peer's init (answers are not answered)
    model: str


@dataclass(frozen=True)
class Presence(Message):
    """Retained on presence/<peer>; the broker publishes the offline one as the peer's Last Will."""

    TYPE = "presence"
    TOPIC = "presence"
    SENDER = "peer"
    peer: str
    status: str


@dataclass(frozen=True)
class Vote(Message):
    """A ballot for `term`. The best (round, vote, peer) among the votes a peer has seen is its candidate;
    `round` is the voter's latest global model, so a peer that missed an aggregation cannot win."""

    TYPE = "vote"
    TOPIC = "election"
    SENDER = "peer"
    term: int
    peer: str
    vote: float
    round: int
    reason: str


@dataclass(frozen=True)
class Claim(Message):
    """`peer` believes it won `term`. The first claim of a term that the broker delivers decides it for everyone."""

    TYPE = "claim"
    TOPIC = "election"
    SENDER = "peer"
    term: int
    peer: str
    vote: float
    round: int
    reason: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Heartbeat(Message):
    """The controller is alive (retained: the latest names the run's leader); `model` is the run's model
    fingerprint, so a peer started with another model learns at once that it cannot take part."""

    TYPE = "heartbeat"
    TOPIC = "heartbeat"
    SENDER = "controller"
    term: int
    controller: str
    round: int
    phase: str
    model: str


@dataclass(frozen=True)
class Training(Message):
    """Controller to trainers: fit the global model of round-1, the one whose `WeightCodec.digest` is `digest`, and
    send back a solution. Its weights are empty: every peer received that model as the controller's aggregation (a
    trainer that lacks it fetches the retained one). Only a controller that resumed from a model it did not publish
    itself (another controller's, before a failover) sends the model along."""

    TYPE = "training"
    TOPIC = "training"
    SENDER = "controller"
    CARRIES_WEIGHTS = True
    term: int
    controller: str
    round: int
    attempt: int
    trainers: tuple[str, ...]
    digest: str
    weights: list = field(default_factory=list)


@dataclass(frozen=True)
class Solution(Message):
    TYPE = "solution"
    TOPIC = "solution"
    SENDER = "peer"
    CARRIES_WEIGHTS = True
    term: int
    round: int
    attempt: int
    peer: str
    samples: int
    loss: float
    weights: list


@dataclass(frozen=True)
class Aggregation(Message):
    """The new global model (retained, so a peer that joins late starts from it). `evaluators`: the peers asked to
    evaluate it; empty: every peer (the default, and always for the last round's model)."""

    TYPE = "aggregation"
    TOPIC = "aggregation"
    SENDER = "controller"
    CARRIES_WEIGHTS = True
    term: int
    controller: str
    round: int
    trainers: tuple[str, ...]
    weights: list
    evaluators: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation(Message):
    TYPE = "evaluation"
    TOPIC = "evaluation"
    SENDER = "peer"
    term: int
    round: int
    peer: str
    accuracy: float
    loss: float
    samples: int


@dataclass(frozen=True)
class Metrics(Message):
    """The round's global metric (sample-weighted mean of the evaluations); the round is finished."""

    TYPE = "metrics"
    TOPIC = "metrics"
    SENDER = "controller"
    term: int
    controller: str
    round: int
    accuracy: float
    loss: float
    samples: int
    trainers: tuple[str, ...]
    duration_s: float
    bytes: int
    run_started: float


@dataclass(frozen=True)
class Finish(Message):
    TYPE = "finish"
    TOPIC = "finish"
    SENDER = "controller"
    term: int
    controller: str
    round: int
    reason: str
    accuracy: float


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (Init, Presence, Vote, Claim, Heartbeat, Training, Solution, Aggregation, Evaluation, Metrics, Finish)
}


# --- encode / decode --------------------------------------------------------------------------------------------------


def _json(header: dict) -> bytes:
    return json.dumps(header, separators=(",", ":"), allow_nan=False).encode()


def encode(message: Message, wire_dtype: str = "float32") -> bytes:
    """The message's body: JSON, or a frame for a message that carries weights (as `wire_dtype`, see WeightCodec).

    Refuses (ProtocolError) whatever `decode` would refuse: a field against its rule (a NaN loss, a negative count,
    a term above MAX_TERM, a bad peer id, an over-long reason), a JSON header over MAX_CONTROL_BYTES, and weights
    that are non-finite or beyond the tensor limits (`WeightCodec.checked`). A peer never sends what others drop."""
    return b"".join(encode_parts(message, wire_dtype))


def encode_parts(message: Message, wire_dtype: str = "float32") -> list:
    """`encode(message)` in pieces (the weights' values are views, not copies): what a model larger than one broker
    message is cut into chunks from, without ever holding its whole body at once."""
    require(wire_dtype in WIRE_DTYPES, f"wire dtype {wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    header = message.header()
    for name, value in header.items():
        if name not in ("v", "type"):
            _FIELD_RULES[name](value, f"{message.TYPE}.{name}")
    raw = _json(header)
    require(
        len(raw) <= MAX_CONTROL_BYTES,
        f"{message.TYPE}: a JSON header of {len(raw)} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit",
    )
    if not message.CARRIES_WEIGHTS:
        return [raw]
    arrays = WeightCodec.checked(getattr(message, "weights"))
    return [_FRAME_HEAD.pack(FRAME_MAGIC, PROTOCOL_VERSION, len(raw)), raw, *WeightCodec.parts(arrays, wire_dtype)]


def encoded_size(message: Message, wire_dtype: str = "float32") -> int:
    """len(encode(message)) without serialising the weights: what a message's body costs, for the round's byte
    count, at the price of its small JSON header. The envelope adds a fixed `Seal.overhead` (`sealed_size`)."""
    header = len(_json(message.header()))
    if not message.CARRIES_WEIGHTS:
        return header
    return _FRAME_HEAD.size + header + WeightCodec.size(getattr(message, "weights"), wire_dtype)


def decode(kind: str, body: bytes | memoryview, sender: str | None = None) -> Message:
    """Parse and validate one message body received on a topic of `kind` (the topic's kind level, see `Topics.parse`).

    With `sender` (the topic's sender level), the message must name that peer as its sender (`Message.sender`): one
    published on another peer's topic is refused. The JSON header is checked before the weights are read."""
    view = memoryview(body)
    weights_view = None
    if bytes(view[:4]) == FRAME_MAGIC:
        if len(view) < _FRAME_HEAD.size:
            raise ProtocolError("frame: truncated header")
        _, version, header_len = _FRAME_HEAD.unpack_from(view)
        require(version == PROTOCOL_VERSION, f"frame: version {version} is not {PROTOCOL_VERSION}")
        require(header_len <= MAX_CONTROL_BYTES, "frame: header too large")
        start = _FRAME_HEAD.size
        require(start + header_len <= len(view), "frame: truncated JSON header")
        raw_header = view[start : start + header_len]
        weights_view = view[start + header_len :]
    else:
        require(len(view) <= MAX_CONTROL_BYTES, f"control message of {len(view)} bytes is too large")
        raw_header = view
    try:
        header = json.loads(raw_header.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:  # bad UTF-8 or JSON, a 5000-digit number, "[[[[..." nesting
        raise ProtocolError(f"not valid JSON: {str(err)[:200]}") from None
    require(isinstance(header, dict), "expected a JSON object")
    version, type_ = header.get("v"), header.get("type")
    require(
        type(version) is int and version == PROTOCOL_VERSION,
        f"protocol version {str(version)[:20]} is not {PROTOCOL_VERSION}",
    )
    cls = MESSAGE_TYPES.get(type_) if isinstance(type_, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {str(type_)[:40]!r}")
    require(cls.TOPIC == kind, f"a {cls.TYPE} message does not belong on topic {str(kind)[:80]!r}")
    require(
        cls.CARRIES_WEIGHTS == (weights_view is not None),
        f"a {cls.TYPE} message {'needs' if cls.CARRIES_WEIGHTS else 'cannot carry'} weights",
    )
    values = {}
    for f in fields(cls):
        if f.name == "weights":
            continue
        require(f.name in header, f"{cls.TYPE}: missing field {f.name!r}")
        values[f.name] = _FIELD_RULES[f.name](header[f.name], f"{cls.TYPE}.{f.name}")
    extra = set(header) - {f.name for f in fields(cls) if f.name != "weights"} - {"v", "type"}
    require(not extra, f"{cls.TYPE}: unexpected fields {sorted(extra)}")
    claimed = values[cls.SENDER]
    require(
        sender is None or claimed == sender,
        f"a {cls.TYPE} claims to be {claimed} but was published as {str(sender)[:80]}",
    )
    if weights_view is not None:
        values["weights"] = WeightCodec.decode(weights_view)
    return cls(**values)
