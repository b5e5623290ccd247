"""The wire protocol: topics, message types, encoding, and decoding that validates.

Both roles import this module and nothing else builds a payload. See docs/PROTOCOL.md for the reader's version.

Control messages are UTF-8 JSON objects with a "type" field. Messages that carry a model (training, solution,
aggregation) are a binary frame: a small fixed header, the same JSON object, then the weights in `WeightCodec`'s
format. Decoding never trusts the sender: every field is type- and range-checked, and anything off raises
`ProtocolError` (the peer logs it in one line and drops the message).
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass, fields
from typing import ClassVar

import numpy as np

PROTOCOL_VERSION = 1
# What a peer id looks like: it travels in every message and names a topic level and a folder of the run dir.
PEER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MAX_CONTROL_BYTES = 64 * 1024
MAX_TENSORS = 256
MAX_TENSOR_DIMS = 8
MAX_TERM = 2**31 - 1                  # terms beyond cannot be encoded; the election never reaches them
MAX_WEIGHT_BYTES = 16 * 1024 * 1024   # the brokers' message_size_limit (broker/*.conf) is the same


class ProtocolError(ValueError):
    """A payload that does not follow the protocol."""


# --- weights ----------------------------------------------------------------------------------------------------------

class WeightCodec:
    """A list of float32 tensors as bytes, little-endian throughout.

        u32 tensor_count
        per tensor: u8 ndim, ndim x u32 dims, prod(dims) x f32 values (C order)

    No pickle and no JSON lists of floats: a decoder can check every length before reading, and a 57k-parameter
    model costs 4 bytes a parameter.
    """

    @staticmethod
    def encode(tensors: list[np.ndarray]) -> bytes:
        parts = [struct.pack("<I", len(tensors))]
        for tensor in tensors:
            array = np.asarray(tensor, dtype="<f4")   # not ascontiguousarray: it turns a scalar into shape (1,)
            parts.append(struct.pack(f"<B{array.ndim}I", array.ndim, *array.shape))
            parts.append(array.tobytes(order="C"))
        return b"".join(parts)

    @staticmethod
    def size(tensors: list[np.ndarray]) -> int:
        """len(encode(tensors)), without encoding them."""
        return 4 + sum(1 + 4 * np.ndim(t) + 4 * int(np.size(t)) for t in tensors)

    @staticmethod
    def decode(data: bytes | memoryview) -> list[np.ndarray]:
        view = memoryview(data)
        if len(view) > MAX_WEIGHT_BYTES:
            raise ProtocolError(f"weights: {len(view)} bytes exceeds the {MAX_WEIGHT_BYTES}-byte limit")
        if len(view) < 4:
            raise ProtocolError("weights: truncated tensor count")
        (count,) = struct.unpack_from("<I", view, 0)
        if count > MAX_TENSORS:
            raise ProtocolError(f"weights: {count} tensors exceeds the limit of {MAX_TENSORS}")
        offset, tensors = 4, []
        for index in range(count):
            if offset + 1 > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated header")
            ndim = view[offset]
            if ndim > MAX_TENSOR_DIMS:
                raise ProtocolError(f"weights: tensor {index}: {ndim} dimensions exceeds {MAX_TENSOR_DIMS}")
            offset += 1
            if offset + 4 * ndim > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated shape")
            shape = struct.unpack_from(f"<{ndim}I", view, offset)
            offset += 4 * ndim
            size = math.prod(shape) * 4
            if offset + size > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated values ({len(view) - offset} of {size} bytes)")
            array = np.frombuffer(view[offset:offset + size], dtype="<f4").reshape(shape).astype(np.float32)
            if not np.isfinite(array).all():
                raise ProtocolError(f"weights: tensor {index}: contains NaN or infinity")
            tensors.append(array)
            offset += size
        if offset != len(view):
            raise ProtocolError(f"weights: {len(view) - offset} trailing bytes")
        return tensors


# Binary frame of messages that carry weights: magic, version, JSON header length, JSON header, weights.
FRAME_MAGIC = b"SDFL"
_FRAME_HEAD = struct.Struct("<4sBxxxI")  # magic, version, 3 reserved bytes, header length


# --- field validation -------------------------------------------------------------------------------------------------

def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ProtocolError(message)


def _peer_id(value, name: str) -> str:
    _check(isinstance(value, str) and PEER_ID_PATTERN.fullmatch(value) is not None, f"{name}: not a valid peer id")
    return value


def _count(value, name: str, low: int = 0) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value < 2**53, f"{name}: expected an integer >= {low}")
    return value


def _bounded(value: int, name: str, high: int) -> int:
    _check(value <= high, f"{name}: above {high}")
    return value


def _number(value, name: str, low: float | None = None, high: float | None = None) -> float:
    _check(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name}: expected a number")
    try:
        value = float(value)
    except OverflowError:
        raise ProtocolError(f"{name}: too large") from None
    _check(math.isfinite(value), f"{name}: not finite")
    _check(low is None or value >= low, f"{name}: below {low}")
    _check(high is None or value <= high, f"{name}: above {high}")
    return value


def _text(value, name: str, limit: int = 200) -> str:
    _check(isinstance(value, str) and len(value) <= limit, f"{name}: expected a string of at most {limit} characters")
    return value


def _peer_list(value, name: str) -> tuple[str, ...]:
    _check(isinstance(value, list) and len(value) <= 10_000, f"{name}: expected a list of peer ids")
    ids = tuple(_peer_id(item, f"{name}[]") for item in value)
    _check(len(set(ids)) == len(ids), f"{name}: duplicate peer ids")
    return ids


# Per field name: how to validate it. Messages below use only these names, so each rule lives in one place.
_FIELD_RULES = {
    "peer": _peer_id,
    "controller": _peer_id,
    "term": lambda v, n: _bounded(_count(v, n), n, MAX_TERM),
    "round": _count,
    "attempt": lambda v, n: _count(v, n, 1),
    "vote": lambda v, n: _number(v, n, 0.0, 1.0),
    "samples": _count,
    "accuracy": lambda v, n: _number(v, n, 0.0, 1.0),
    "loss": lambda v, n: _number(v, n, 0.0),
    "duration_s": lambda v, n: _number(v, n, 0.0),
    "bytes": _count,
    "run_started": lambda v, n: _number(v, n, 0.0),
    "status": lambda v, n: (_check(v in ("online", "offline"), f"{n}: expected online or offline"), v)[1],
    "reason": _text,
    "phase": _text,
    "trainers": _peer_list,
    "members": _peer_list,
    "pid": _count,
    "train_samples": _count,
    "test_samples": _count,
}


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str]
    TOPIC: ClassVar[str]          # topic under the prefix
    CARRIES_WEIGHTS: ClassVar[bool] = False

    def header(self) -> dict:
        body = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "weights"}
        for key, value in body.items():
            if isinstance(value, tuple):
                body[key] = list(value)
        return {"v": PROTOCOL_VERSION, "type": self.TYPE, **body}


@dataclass(frozen=True)
class Init(Message):
    """A peer announces itself (on start, after every reconnect, and to every newcomer): its train and test sample
    counts bound what it may later declare in a solution or an evaluation."""
    TYPE = "init"; TOPIC = "init"
    peer: str
    term: int
    round: int
    pid: int
    train_samples: int
    test_samples: int


@dataclass(frozen=True)
class Presence(Message):
    """Retained on presence/<peer>; the broker publishes the offline one as the peer's Last Will."""
    TYPE = "presence"; TOPIC = "presence"
    peer: str
    status: str


@dataclass(frozen=True)
class Vote(Message):
    """A ballot for `term`. The best (round, vote, peer) among the votes a peer has seen is its candidate;
    `round` is the voter's latest global model, so a peer that missed an aggregation cannot win."""
    TYPE = "vote"; TOPIC = "election"
    term: int
    peer: str
    vote: float
    round: int
    reason: str


@dataclass(frozen=True)
class Claim(Message):
    """`peer` believes it won `term`. The first claim of a term that the broker delivers decides it for everyone."""
    TYPE = "claim"; TOPIC = "election"
    term: int
    peer: str
    vote: float
    round: int
    reason: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Heartbeat(Message):
    TYPE = "heartbeat"; TOPIC = "heartbeat"
    term: int
    controller: str
    round: int
    phase: str


@dataclass(frozen=True)
class Training(Message):
    """Controller to trainers: fit these global weights (the model of round-1) and send back a solution."""
    TYPE = "training"; TOPIC = "training"; CARRIES_WEIGHTS = True
    term: int
    controller: str
    round: int
    attempt: int
    trainers: tuple[str, ...]
    weights: list


@dataclass(frozen=True)
class Solution(Message):
    TYPE = "solution"; TOPIC = "solution"; CARRIES_WEIGHTS = True
    term: int
    round: int
    attempt: int
    peer: str
    samples: int
    loss: float
    weights: list


@dataclass(frozen=True)
class Aggregation(Message):
    """The new global model (retained, so a peer that joins late starts from it)."""
    TYPE = "aggregation"; TOPIC = "aggregation"; CARRIES_WEIGHTS = True
    term: int
    controller: str
    round: int
    trainers: tuple[str, ...]
    weights: list


@dataclass(frozen=True)
class Evaluation(Message):
    TYPE = "evaluation"; TOPIC = "evaluation"
    term: int
    round: int
    peer: str
    accuracy: float
    loss: float
    samples: int


@dataclass(frozen=True)
class Metrics(Message):
    """The round's global metric (sample-weighted mean of the evaluations); the round is finished."""
    TYPE = "metrics"; TOPIC = "metrics"
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
    TYPE = "finish"; TOPIC = "finish"
    term: int
    controller: str
    round: int
    reason: str
    accuracy: float


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Init, Presence, Vote, Claim, Heartbeat, Training, Solution, Aggregation, Evaluation,
                              Metrics, Finish)
}


class Topics:
    """Full topic names under a prefix."""

    def __init__(self, prefix: str = "sd"):
        self.prefix = prefix

    def of(self, message: Message | type[Message]) -> str:
        if message.TOPIC == "presence":
            return self.presence(message.peer)
        return f"{self.prefix}/{message.TOPIC}"

    def presence(self, peer: str) -> str:
        return f"{self.prefix}/presence/{peer}"

    @property
    def subscription(self) -> str:
        return f"{self.prefix}/#"

    def short(self, topic: str) -> str | None:
        """The topic's name under the prefix ('presence' for presence/<id>), or None if it is not ours."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            return None
        rest = topic[len(head):]
        return "presence" if rest.startswith("presence/") else rest


# --- encode / decode --------------------------------------------------------------------------------------------------

def encode(message: Message) -> bytes:
    header = json.dumps(message.header(), separators=(",", ":")).encode()
    if not message.CARRIES_WEIGHTS:
        return header
    weights = WeightCodec.encode(message.weights)
    return _FRAME_HEAD.pack(FRAME_MAGIC, PROTOCOL_VERSION, len(header)) + header + weights


def encoded_size(message: Message) -> int:
    """len(encode(message)) without serialising the weights: what a message costs on the wire, for the round's byte
    count, at the price of its small JSON header."""
    header = len(json.dumps(message.header(), separators=(",", ":")).encode())
    if not message.CARRIES_WEIGHTS:
        return header
    return _FRAME_HEAD.size + header + WeightCodec.size(message.weights)


def decode(short_topic: str, payload: bytes) -> Message:
    """Parse and validate one payload received on `short_topic` (the topic under the prefix)."""
    weights = None
    if payload[:4] == FRAME_MAGIC:
        if len(payload) < _FRAME_HEAD.size:
            raise ProtocolError("frame: truncated header")
        _, version, header_len = _FRAME_HEAD.unpack_from(payload)
        _check(version == PROTOCOL_VERSION, f"frame: version {version} is not {PROTOCOL_VERSION}")
        _check(header_len <= MAX_CONTROL_BYTES, "frame: header too large")
        start = _FRAME_HEAD.size
        _check(start + header_len <= len(payload), "frame: truncated JSON header")
        raw_header = payload[start:start + header_len]
        weights = WeightCodec.decode(memoryview(payload)[start + header_len:])
    else:
        _check(len(payload) <= MAX_CONTROL_BYTES, f"control message of {len(payload)} bytes is too large")
        raw_header = payload
    try:
        body = json.loads(bytes(raw_header).decode("utf-8"))
    except (ValueError, RecursionError) as err:   # bad UTF-8 or JSON, a 5000-digit number, "[[[[..." nesting
        raise ProtocolError(f"not valid JSON: {str(err)[:200]}") from None
    _check(isinstance(body, dict), "expected a JSON object")
    version, kind = body.get("v"), body.get("type")
    _check(type(version) is int and version == PROTOCOL_VERSION,
           f"protocol version {str(version)[:20]} is not {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(kind) if isinstance(kind, str) else None
    _check(cls is not None, f"unknown message type {str(kind)[:40]!r}")
    _check(cls.TOPIC == short_topic, f"a {cls.TYPE} message does not belong on topic {short_topic!r}")
    _check(cls.CARRIES_WEIGHTS == (weights is not None),
           f"a {cls.TYPE} message {'needs' if cls.CARRIES_WEIGHTS else 'cannot carry'} weights")
    values = {}
    for f in fields(cls):
        if f.name == "weights":
            values["weights"] = weights
            continue
        _check(f.name in body, f"{cls.TYPE}: missing field {f.name!r}")
        values[f.name] = _FIELD_RULES[f.name](body[f.name], f"{cls.TYPE}.{f.name}")
    extra = set(body) - {f.name for f in fields(cls) if f.name != "weights"} - {"v", "type"}
    _check(not extra, f"{cls.TYPE}: unexpected fields {sorted(extra)}")
    return cls(**values)

