"""The wire protocol: topics, message types, encoding, decoding that validates, and the envelope that seals it.

Both roles import this module and nothing else builds a payload. See docs/PROTOCOL.md for the reader's version.

A message's body: control messages are UTF-8 JSON objects with a "type" field. Messages that carry a model
(training, solution, aggregation) are a binary frame: a small fixed header, the same JSON object, then the weights in
`WeightCodec`'s format. Decoding never trusts the sender: every field is type- and range-checked, and anything off
raises `ProtocolError` (the peer logs it in one line and drops the message). Encoding refuses the same things, so a
peer never sends what its peers would drop.

On the wire every body travels in an envelope (`Seal`): a fixed head with the sender's incarnation, sequence number
and clock, the body, and, when the federation has a secret, an HMAC-SHA256 over the topic and all of that. Every
message is published on `<prefix>/<run_id>/<kind>/<sender>` (`Topics`), and the MAC covers the topic, so a payload
cannot be moved to another kind, run or sender.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import math
import secrets
import struct
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import ClassVar

import numpy as np

from .chunks import CHUNK_HEAD_SIZE
from .ids import PEER_ID_PATTERN, TOPIC_PREFIX_PATTERN, valid_peer_id, valid_run_id

PROTOCOL_VERSION = 2                  # 2: per-tensor dtype (float16 on the wire), weightless training orders
MAX_CONTROL_BYTES = 64 * 1024
MAX_TENSORS = 256
MAX_TENSOR_DIMS = 8
MAX_WEIGHT_BYTES = 1024 * 1024 * 1024  # the largest model a peer takes (1 GiB); beyond MAX_MESSAGE_BYTES in chunks
MAX_MESSAGE_BYTES = 16 * 1024 * 1024  # the brokers' message_size_limit (broker/*.conf): a larger payload is chunked
MIN_CHUNKED_MESSAGE_BYTES = 65536     # the smallest broker limit a peer works with (a chunk must hold some data)
MAX_TERM = 2**31 - 1                  # the highest term: encode and decode refuse more
_MAX_COUNT = 2**53 - 1                # the largest integer a JSON reader in any language reads exactly


class ProtocolError(ValueError):
    """A payload that does not follow the protocol."""


# --- weights ----------------------------------------------------------------------------------------------------------

class WeightCodec:
    """A list of tensors as bytes, little-endian throughout:

        u32 tensor_count
        per tensor: u8 dtype (1 = float32, 2 = float16), u8 ndim, ndim x u32 dims, prod(dims) values (C order)

    No pickle and no JSON lists of floats: a decoder can check every length before reading. Decoding always gives
    float32 arrays. float16 (`--wire-dtype float16`) halves the bytes; a tensor with a value beyond float16's range
    travels as float32, so nothing is lost to overflow. `digest` names a model by its float32 values.
    """

    @staticmethod
    def encode(tensors: list[np.ndarray], wire_dtype: str = "float32") -> bytes:
        """Any tensors, unchecked (tests build bad payloads with it); `encode(message)` checks them first."""
        # not ascontiguousarray: it turns a scalar into shape (1,)
        return b"".join(WeightCodec._parts([np.asarray(t, dtype="<f4") for t in tensors], wire_dtype))

    @staticmethod
    def parts(tensors: list[np.ndarray], wire_dtype: str = "float32") -> list:
        """`encode(tensors)` as a list of bytes-like parts to write one after the other, without joining them."""
        return WeightCodec._parts([np.asarray(t, dtype="<f4") for t in tensors], wire_dtype)

    @staticmethod
    def _on_wire(array: np.ndarray, wire_dtype: str) -> np.ndarray:
        """The array as it travels: float16 if asked and every value fits, else float32."""
        if wire_dtype == "float16":
            with np.errstate(over="ignore"):
                half = array.astype("<f2")
            if np.isfinite(half).all():
                return half
        return array

    @staticmethod
    def _parts(arrays: list[np.ndarray], wire_dtype: str = "float32") -> list:
        """The encoding in pieces, for one b"".join or for chunks: values are views of C-ordered data, not copies
        (float16 values are a converted copy, half the size)."""
        parts = [struct.pack("<I", len(arrays))]
        for array in arrays:
            wire = WeightCodec._on_wire(array, wire_dtype)
            parts.append(struct.pack(f"<BB{wire.ndim}I", _DTYPE_CODES[wire.dtype.str], wire.ndim, *wire.shape))
            parts.append(memoryview(np.ascontiguousarray(wire).reshape(-1)).cast("B"))
        return parts

    @staticmethod
    def quantized(tensors: list[np.ndarray], wire_dtype: str) -> list[np.ndarray]:
        """The float32 tensors a receiver decodes from `encode(tensors, wire_dtype)`: a controller holds exactly the
        model its peers hold, so the digests its orders name match theirs."""
        if wire_dtype == "float32":
            return tensors
        return [WeightCodec._on_wire(np.asarray(t, "<f4"), wire_dtype).astype(np.float32) for t in tensors]

    @staticmethod
    def checked(tensors) -> list[np.ndarray]:
        """The tensors as little-endian float32 arrays, or ProtocolError for anything `decode` would refuse: more than
        MAX_TENSORS tensors or MAX_TENSOR_DIMS dimensions, more than MAX_WEIGHT_BYTES in all, NaN or infinity
        (also a float64 value too large for float32)."""
        try:
            with np.errstate(over="ignore"):   # a float64 beyond float32 becomes infinity, refused below
                arrays = [np.asarray(tensor, dtype="<f4") for tensor in tensors]
        except (TypeError, ValueError) as err:   # not a list of tensors, ragged lists, strings
            raise ProtocolError(f"weights: not a list of float tensors ({str(err)[:100]})") from None
        _check(len(arrays) <= MAX_TENSORS, f"weights: {len(arrays)} tensors exceeds the limit of {MAX_TENSORS}")
        for index, array in enumerate(arrays):
            _check(array.ndim <= MAX_TENSOR_DIMS,
                   f"weights: tensor {index}: {array.ndim} dimensions exceeds {MAX_TENSOR_DIMS}")
            _check(all(dim < 2**32 for dim in array.shape), f"weights: tensor {index}: a dimension exceeds 2^32 - 1")
        size = WeightCodec.size(arrays)
        _check(size <= MAX_WEIGHT_BYTES, f"weights: {size} bytes exceeds the {MAX_WEIGHT_BYTES}-byte limit")
        for index, array in enumerate(arrays):
            _check(bool(np.isfinite(array).all()), f"weights: tensor {index}: contains NaN or infinity")
        return arrays

    @staticmethod
    def size(tensors: list[np.ndarray], wire_dtype: str = "float32") -> int:
        """len(encode(tensors, wire_dtype)), without encoding them."""
        total = 4
        for t in tensors:
            width = 4
            if wire_dtype == "float16" and np.size(t) and float(np.max(np.abs(t))) <= _FLOAT16_MAX:
                width = 2
            total += 2 + 4 * np.ndim(t) + width * int(np.size(t))
        return total

    @staticmethod
    def digest(tensors: list[np.ndarray]) -> str:
        """A model's name by content: SHA-256 over its shapes and float32 values (DIGEST_HEX hex digits). Computed
        over the arrays in place, without encoding them."""
        sha = hashlib.sha256()
        for part in WeightCodec._parts([np.asarray(t, dtype="<f4") for t in tensors]):
            sha.update(part)
        return sha.hexdigest()[:DIGEST_HEX]

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
            if offset + 2 > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated header")
            code, ndim = view[offset], view[offset + 1]
            dtype = _DTYPES.get(code)
            if dtype is None:
                raise ProtocolError(f"weights: tensor {index}: unknown dtype code {code}")
            if ndim > MAX_TENSOR_DIMS:
                raise ProtocolError(f"weights: tensor {index}: {ndim} dimensions exceeds {MAX_TENSOR_DIMS}")
            offset += 2
            if offset + 4 * ndim > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated shape")
            shape = struct.unpack_from(f"<{ndim}I", view, offset)
            offset += 4 * ndim
            size = math.prod(shape) * np.dtype(dtype).itemsize
            if offset + size > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated values ({len(view) - offset} of {size} bytes)")
            # float32 values are used in place (no copy of a large model); float16 ones are widened
            array = np.frombuffer(view[offset:offset + size], dtype=dtype).reshape(shape).astype(np.float32,
                                                                                               copy=False)
            if not np.isfinite(array).all():
                raise ProtocolError(f"weights: tensor {index}: contains NaN or infinity")
            tensors.append(array)
            offset += size
        if offset != len(view):
            raise ProtocolError(f"weights: {len(view) - offset} trailing bytes")
        return tensors


WIRE_DTYPES = ("float32", "float16")
_DTYPES = {1: "<f4", 2: "<f2"}                      # the dtype byte of each tensor
_DTYPE_CODES = {"<f4": 1, "<f2": 2}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
DIGEST_HEX = 32                                     # 128 bits: a model's name in a training order
FINGERPRINT_HEX = 16                                # a model architecture's name (peer.models.fingerprint)


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


def _count(value, name: str, low: int = 0, high: int = _MAX_COUNT) -> int:
    _check(isinstance(value, int) and not isinstance(value, bool) and low <= value <= high,
           f"{name}: expected an integer from {low} to {high}")
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


def _hex(length: int):
    def rule(value, name: str) -> str:
        _check(isinstance(value, str) and len(value) == length and all(c in "0123456789abcdef" for c in value),
               f"{name}: expected {length} lowercase hex digits")
        return value
    return rule


def _peer_list(value, name: str) -> tuple[str, ...]:
    _check(isinstance(value, list) and len(value) <= 10_000, f"{name}: expected a list of peer ids")
    ids = tuple(_peer_id(item, f"{name}[]") for item in value)
    _check(len(set(ids)) == len(ids), f"{name}: duplicate peer ids")
    return ids


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
    "status": lambda v, n: (_check(v in ("online", "offline"), f"{n}: expected online or offline"), v)[1],
    "reason": _text,
    "phase": _text,
    "trainers": _peer_list,
    "members": _peer_list,
    "evaluators": _peer_list,
    "pid": _count,
    "train_samples": _count,
    "test_samples": _count,
    "reply": lambda v, n: (_check(type(v) is bool, f"{n}: expected true or false"), v)[1],
    "model": _hex(FINGERPRINT_HEX),
    "digest": _hex(DIGEST_HEX),
}


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str]
    TOPIC: ClassVar[str]          # the topic's kind level: <prefix>/<run_id>/<TOPIC>/<sender>
    SENDER: ClassVar[str]         # the field that names the peer sending it
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
    TYPE = "init"; TOPIC = "init"; SENDER = "peer"
    peer: str
    term: int
    round: int
    pid: int
    train_samples: int
    test_samples: int
    reply: bool            # an answer to another peer's init (answers are not answered)
    model: str


@dataclass(frozen=True)
class Presence(Message):
    """Retained on presence/<peer>; the broker publishes the offline one as the peer's Last Will."""
    TYPE = "presence"; TOPIC = "presence"; SENDER = "peer"
    peer: str
    status: str


@dataclass(frozen=True)
class Vote(Message):
    """A ballot for `term`. The best (round, vote, peer) among the votes a peer has seen is its candidate;
    `round` is the voter's latest global model, so a peer that missed an aggregation cannot win."""
    TYPE = "vote"; TOPIC = "election"; SENDER = "peer"
    term: int
    peer: str
    vote: float
    round: int
    reason: str


@dataclass(frozen=True)
class Claim(Message):
    """`peer` believes it won `term`. The first claim of a term that the broker delivers decides it for everyone."""
    TYPE = "claim"; TOPIC = "election"; SENDER = "peer"
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
    TYPE = "heartbeat"; TOPIC = "heartbeat"; SENDER = "controller"
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
    TYPE = "training"; TOPIC = "training"; SENDER = "controller"; CARRIES_WEIGHTS = True
    term: int
    controller: str
    round: int
    attempt: int
    trainers: tuple[str, ...]
    digest: str
    weights: list = field(default_factory=list)


@dataclass(frozen=True)
class Solution(Message):
    TYPE = "solution"; TOPIC = "solution"; SENDER = "peer"; CARRIES_WEIGHTS = True
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
    TYPE = "aggregation"; TOPIC = "aggregation"; SENDER = "controller"; CARRIES_WEIGHTS = True
    term: int
    controller: str
    round: int
    trainers: tuple[str, ...]
    weights: list
    evaluators: tuple[str, ...] = ()


@dataclass(frozen=True)
class Evaluation(Message):
    TYPE = "evaluation"; TOPIC = "evaluation"; SENDER = "peer"
    term: int
    round: int
    peer: str
    accuracy: float
    loss: float
    samples: int


@dataclass(frozen=True)
class Metrics(Message):
    """The round's global metric (sample-weighted mean of the evaluations); the round is finished."""
    TYPE = "metrics"; TOPIC = "metrics"; SENDER = "controller"
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
    TYPE = "finish"; TOPIC = "finish"; SENDER = "controller"
    term: int
    controller: str
    round: int
    reason: str
    accuracy: float


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls for cls in (Init, Presence, Vote, Claim, Heartbeat, Training, Solution, Aggregation, Evaluation,
                              Metrics, Finish)
}


_KINDS = frozenset(cls.TOPIC for cls in MESSAGE_TYPES.values())   # the kind level of every topic
_TO_CONTROLLER = frozenset({"solution", "evaluation"})           # kinds only the controller subscribes to
_NO_ECHO = frozenset({"training", "aggregation"})                # kinds a peer need not hear from itself


class Topics:
    """Topic names of one run: every message is published on `<prefix>/<run_id>/<kind>/<sender>`, where kind is its
    class's TOPIC and sender the id of the peer publishing it (`Message.sender`). A broker ACL can then let each peer
    publish only topics that name itself, and a receiver holds every message to the sender its topic names.

    A message too large for one broker message travels in chunks (`peer.chunks`), chunk i on `<topic>/<i>`: each
    chunk of a retained model keeps its own retained slot."""

    def __init__(self, prefix: str = "sd", run_id: str = "default"):
        if not isinstance(prefix, str) or TOPIC_PREFIX_PATTERN.fullmatch(prefix) is None:
            raise ValueError(f"topic prefix {prefix!r}: use letters, digits, '.', '_', '-' and '/' between levels")
        if not valid_run_id(run_id):
            raise ValueError(f"run id {run_id!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        self.prefix, self.run_id = prefix, run_id
        self._head = f"{prefix}/{run_id}/"

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r}, {self.run_id!r})"

    def topic(self, kind: str, sender: str) -> str:
        """The topic `sender` publishes messages of `kind` (a TOPIC: election, heartbeat, ...) on."""
        if kind not in _KINDS:
            raise ValueError(f"unknown message kind {kind!r} (one of {', '.join(sorted(_KINDS))})")
        if not valid_peer_id(sender):
            raise ValueError(f"sender {sender!r} is not a valid peer id")
        return self._head + kind + "/" + sender

    def of(self, message: Message) -> str:
        """The topic `message` is published on."""
        if isinstance(message, type) or not isinstance(message, Message):
            raise TypeError(f"Topics.of needs a message, not {message!r}; for a kind use topic(kind, sender)")
        return self.topic(message.TOPIC, message.sender)

    def presence(self, peer: str) -> str:
        return self.topic("presence", peer)

    @staticmethod
    def chunk(topic: str, index: int) -> str:
        """The topic of chunk `index` of a message published on `topic`."""
        return f"{topic}/{index}"

    @property
    def subscription(self) -> str:
        """Everything of this run, and nothing of another run under the same prefix (observers use it)."""
        return f"{self.prefix}/{self.run_id}/#"

    def subscriptions(self, controller: bool = False) -> list[tuple[str, bool]]:
        """(filter, no_local) of what a peer subscribes to: every kind but solutions and evaluations, which only the
        controller of a term subscribes to (`controller=True` gives those two), so each reaches one peer. A peer
        does not get its own orders and models back (no_local): that would be one more model copy per round."""
        if controller:
            return [(f"{self._head}{kind}/#", False) for kind in _TO_CONTROLLER]
        return [(f"{self._head}{kind}/#", kind in _NO_ECHO) for kind in sorted(_KINDS - _TO_CONTROLLER)]

    def aggregations(self) -> str:
        """The filter whose retained messages are every controller's latest model (subscribed again to fetch them)."""
        return f"{self._head}aggregation/#"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(kind, sender) of a topic of this prefix and run; None for any other topic: another prefix or run, more
        or fewer levels, an unknown kind, a sender that is not a valid peer id. A chunk's topic is not one (`locate`)."""
        located = self.locate(topic)
        if located is None or located[2] is not None:
            return None
        return located[:2]

    def locate(self, topic: str) -> tuple[str, str, int | None] | None:
        """(kind, sender, chunk index or None) of a message's or a chunk's topic of this run; else None."""
        if not isinstance(topic, str) or not topic.startswith(self._head):
            return None
        kind, slash, rest = topic[len(self._head):].partition("/")
        sender, slash2, index = rest.partition("/")
        if not slash or kind not in _KINDS or not valid_peer_id(sender):   # a peer id has no "/"
            return None
        if not slash2:
            return kind, sender, None
        if not (index.isascii() and index.isdigit() and len(index) <= 6) or (index != "0" and index[0] == "0"):
            return None
        return kind, sender, int(index)


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
    _check(wire_dtype in WIRE_DTYPES, f"wire dtype {wire_dtype!r} is not one of {', '.join(WIRE_DTYPES)}")
    header = message.header()
    for name, value in header.items():
        if name not in ("v", "type"):
            _FIELD_RULES[name](value, f"{message.TYPE}.{name}")
    raw = _json(header)
    _check(len(raw) <= MAX_CONTROL_BYTES,
           f"{message.TYPE}: a JSON header of {len(raw)} bytes exceeds the {MAX_CONTROL_BYTES}-byte limit")
    if not message.CARRIES_WEIGHTS:
        return [raw]
    arrays = WeightCodec.checked(message.weights)
    return [_FRAME_HEAD.pack(FRAME_MAGIC, PROTOCOL_VERSION, len(raw)), raw, *WeightCodec._parts(arrays, wire_dtype)]


def encoded_size(message: Message, wire_dtype: str = "float32") -> int:
    """len(encode(message)) without serialising the weights: what a message's body costs, for the round's byte
    count, at the price of its small JSON header. The envelope adds a fixed `Seal.overhead` (`sealed_size`)."""
    header = len(_json(message.header()))
    if not message.CARRIES_WEIGHTS:
        return header
    return _FRAME_HEAD.size + header + WeightCodec.size(message.weights, wire_dtype)


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
        _check(version == PROTOCOL_VERSION, f"frame: version {version} is not {PROTOCOL_VERSION}")
        _check(header_len <= MAX_CONTROL_BYTES, "frame: header too large")
        start = _FRAME_HEAD.size
        _check(start + header_len <= len(view), "frame: truncated JSON header")
        raw_header = view[start:start + header_len]
        weights_view = view[start + header_len:]
    else:
        _check(len(view) <= MAX_CONTROL_BYTES, f"control message of {len(view)} bytes is too large")
        raw_header = view
    try:
        header = json.loads(raw_header.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as err:   # bad UTF-8 or JSON, a 5000-digit number, "[[[[..." nesting
        raise ProtocolError(f"not valid JSON: {str(err)[:200]}") from None
    _check(isinstance(header, dict), "expected a JSON object")
    version, type_ = header.get("v"), header.get("type")
    _check(type(version) is int and version == PROTOCOL_VERSION,
           f"protocol version {str(version)[:20]} is not {PROTOCOL_VERSION}")
    cls = MESSAGE_TYPES.get(type_) if isinstance(type_, str) else None
    _check(cls is not None, f"unknown message type {str(type_)[:40]!r}")
    _check(cls.TOPIC == kind, f"a {cls.TYPE} message does not belong on topic {str(kind)[:80]!r}")
    _check(cls.CARRIES_WEIGHTS == (weights_view is not None),
           f"a {cls.TYPE} message {'needs' if cls.CARRIES_WEIGHTS else 'cannot carry'} weights")
    values = {}
    for f in fields(cls):
        if f.name == "weights":
            continue
        _check(f.name in header, f"{cls.TYPE}: missing field {f.name!r}")
        values[f.name] = _FIELD_RULES[f.name](header[f.name], f"{cls.TYPE}.{f.name}")
    extra = set(header) - {f.name for f in fields(cls) if f.name != "weights"} - {"v", "type"}
    _check(not extra, f"{cls.TYPE}: unexpected fields {sorted(extra)}")
    claimed = values[cls.SENDER]
    _check(sender is None or claimed == sender,
           f"a {cls.TYPE} claims to be {claimed} but was published as {str(sender)[:80]}")
    if weights_view is not None:
        values["weights"] = WeightCodec.decode(weights_view)
    return cls(**values)


# --- the envelope -----------------------------------------------------------------------------------------------------

# Every payload on the wire: a fixed head, the body (`encode(message)`), and with a federation secret a MAC.
#   magic, envelope version, flags, reserved u16, incarnation u64, seq u64, sent_at f64 (little-endian, 32 bytes)
ENVELOPE_MAGIC = b"SDEN"
ENVELOPE_VERSION = 1
_ENVELOPE_HEAD = struct.Struct("<4sBBHQQd")
FLAG_MAC = 0x01                      # bit 0 of flags: a MAC follows the body; the other bits are reserved (zero)
MAC_BYTES = 32                       # HMAC-SHA256
ENVELOPE_OVERHEAD_OPEN = _ENVELOPE_HEAD.size               # 32
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
        if not isinstance(self.sent_at, (int, float)) or isinstance(self.sent_at, bool) \
                or not math.isfinite(self.sent_at):
            raise ValueError(f"stamp sent_at: expected a finite number, not {self.sent_at!r}")


def new_incarnation(now_ns: int | None = None) -> int:
    """A process's incarnation: microseconds of wall time (from `now_ns`, default now) shifted left 12 bits, plus 12
    random bits. A life started a microsecond or more later has a larger one (unless the wall clock went back); two
    processes started in the same microsecond differ with probability 4095/4096. Fits a u64 until the year 2112."""
    micros = (time.time_ns() if now_ns is None else now_ns) // 1000
    return ((micros << 12) | secrets.randbits(12)) & _U64


class Stamper:
    """The stamps of one process: one incarnation, seq 1, 2, 3, ... and sent_at from `clock` (wall time)."""

    def __init__(self, incarnation: int | None = None, clock=time.time):
        self.incarnation = new_incarnation() if incarnation is None else incarnation
        self.clock = clock
        self.seq = 0                  # the last one handed out

    def next(self) -> Stamp:
        self.seq += 1
        return Stamp(self.incarnation, self.seq, float(self.clock()))


def _topic_bytes(topic) -> bytes | None:
    """The topic as the MAC covers it, or None if it cannot be a topic (not a str, no UTF-8, a NUL character)."""
    if not isinstance(topic, str) or "\x00" in topic:
        return None
    try:
        return topic.encode("utf-8")
    except UnicodeEncodeError:   # a lone surrogate
        return None


def read_secret_file(path) -> bytes:
    """The federation secret in the file at `path`, trailing CR and LF bytes stripped. ValueError naming the file if
    it cannot be read, is empty, or holds fewer than MIN_SECRET_BYTES bytes."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"secret file {path}: cannot read it ({err.strerror or err})") from None
    secret = data.rstrip(b"\r\n")
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"secret file {path}: the secret has {len(secret)} bytes; it needs at least "
                         f"{MIN_SECRET_BYTES} (e.g. `openssl rand -hex 32 > {path}`)")
    return secret


class Seal:
    """Seals message bodies into envelopes and opens them, with the federation secret or, with None, in open mode.

    The MAC key is derived from the secret (HMAC-SHA256(secret, "sdfl federation key v1")); the secret itself is
    not kept. A Seal with a secret opens only payloads sealed with the same secret for the same topic; a Seal
    without one opens only unsealed payloads. Opening raises ProtocolError and nothing else for any payload."""

    def __init__(self, secret: bytes | None):
        if secret is None:
            self._key = None
            return
        if not isinstance(secret, (bytes, bytearray, memoryview)):
            raise TypeError(f"the federation secret must be bytes, not {type(secret).__name__}")
        secret = bytes(secret)
        if len(secret) < MIN_SECRET_BYTES:
            raise ValueError(f"the federation secret has {len(secret)} bytes; it needs at least {MIN_SECRET_BYTES}")
        self._key = hmac.new(secret, _KEY_LABEL, hashlib.sha256).digest()

    @classmethod
    def from_file(cls, path) -> "Seal":
        """A Seal with the secret in the file at `path` (see `read_secret_file`)."""
        return cls(read_secret_file(path))

    def __repr__(self) -> str:   # never the key
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
        head = _ENVELOPE_HEAD.pack(ENVELOPE_MAGIC, ENVELOPE_VERSION, flags, 0, stamp.incarnation, stamp.seq,
                                   float(stamp.sent_at))
        if not self.sealed:
            return b"".join((head, body))
        return b"".join((head, body, self._mac(topic_bytes, head, body)))

    def open(self, topic: str, payload: bytes | memoryview) -> tuple[memoryview, Stamp]:
        """The body (a memoryview into `payload`, not a copy) and the stamp of a payload received on `topic`.
        ProtocolError if it is not a well-formed envelope, or not sealed the way this Seal demands, or its MAC does
        not match this secret and this topic."""
        view = memoryview(payload).cast("B")
        head_size = _ENVELOPE_HEAD.size
        _check(len(view) >= head_size, f"envelope: truncated ({len(view)} bytes, the head alone is {head_size})")
        magic, version, flags, reserved, incarnation, seq, sent_at = _ENVELOPE_HEAD.unpack_from(view)
        _check(magic == ENVELOPE_MAGIC, f"envelope: no {ENVELOPE_MAGIC.decode()} magic (a peer of an older version, "
                                        "or not a peer)")
        _check(version == ENVELOPE_VERSION, f"envelope: version {version} is not {ENVELOPE_VERSION}")
        _check(flags & ~FLAG_MAC == 0, f"envelope: unknown flags 0x{flags:02x}")
        _check(reserved == 0, "envelope: reserved bits are set")
        _check(math.isfinite(sent_at), "envelope: sent_at is not finite")
        stamp = Stamp(incarnation, seq, sent_at)
        has_mac = bool(flags & FLAG_MAC)
        if not self.sealed:
            _check(not has_mac, "sealed with a federation secret; this peer has none: pass --secret-file")
            return view[head_size:], stamp
        _check(has_mac, "not sealed with the federation secret")
        end = len(view) - MAC_BYTES
        _check(end >= head_size, f"envelope: truncated ({len(view)} bytes, no room for the MAC)")
        topic_bytes = _topic_bytes(topic)
        _check(topic_bytes is not None, "envelope: the topic is not a UTF-8 string without NUL")
        _check(hmac.compare_digest(self._mac(topic_bytes, view[:end]), view[end:]), "bad signature")
        return view[head_size:end], stamp
