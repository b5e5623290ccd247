"""The messages of the protocol: their types, the rules every field is checked by, encoding, and decoding that
validates.

A message's body: control messages are UTF-8 JSON objects with a "type" field. Messages that carry a model
(training, solution, aggregation) are a binary frame: a small fixed header, the same JSON object, then the weights in
`WeightCodec`'s format. Decoding never trusts the sender: every field is type- and range-checked, and anything off
raises `ProtocolError` (the peer logs it in one line and drops the message). Encoding refuses the same things, so a
peer never sends what its peers would drop. See docs/PROTOCOL.md for the reader's version.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from dataclasses import dataclass, field, fields
from typing import ClassVar

import numpy as np

from peer.wire.errors import ProtocolError, require
from peer.wire.ids import PEER_ID_PATTERN
from peer.wire.weights import DIGEST_HEX, FINGERPRINT_HEX, INTEGERS, WIRE_DTYPES, WeightCodec

PROTOCOL_VERSION = 2  # 2: per-tensor dtype (float16 on the wire), weightless training orders
MAX_CONTROL_BYTES = 64 * 1024
MAX_TERM = 2**31 - 1  # the highest term: encode and decode refuse more
_MAX_COUNT = 2**53 - 1  # the largest integer a JSON reader in any language reads exactly
MAX_SECURE_TRAINERS = 200  # secure aggregation: a roster of this many rows still fits a JSON message
KEY_HEX = 64  # secure aggregation: a 32-byte key, commitment or share in hex
CIPHERTEXT_BYTES = 80  # secure aggregation: a trainer's two shares for one member, encrypted (peer.learning.secagg)


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


def _rows(width: int, cells, limit: int = MAX_SECURE_TRAINERS):
    """A list of at most `limit` rows [peer id, cell, ...] (`width` values each), one per peer, in order of peer id;
    `cells` validates the other values of a row. As a tuple of tuples."""

    def rule(value, name: str) -> tuple:
        require(isinstance(value, (list, tuple)) and len(value) <= limit, f"{name}: expected at most {limit} rows")
        rows = []
        for row in value:
            require(isinstance(row, (list, tuple)) and len(row) == width, f"{name}: a row is {width} values")
            rows.append((_peer_id(row[0], f"{name}[]"), *(cells(cell, f"{name}[]") for cell in row[1:])))
        peers = [row[0] for row in rows]
        require(peers == sorted(set(peers)), f"{name}: one row per peer, in order of peer id")
        return tuple(rows)

    return rule


_PLAN_KEY = re.compile(r"[a-z][a-z0-9_]{0,39}")
MAX_PLAN_ENTRIES = 32


def _plan(value, name: str) -> dict:
    """How the run trains, for people and pages (the controller's settings that shape the model): a flat object of at
    most MAX_PLAN_ENTRIES entries, lowercase keys, each value a short string, a finite number, a boolean or null."""
    require(isinstance(value, dict) and len(value) <= MAX_PLAN_ENTRIES, f"{name}: expected an object of settings")
    for key, item in value.items():
        require(isinstance(key, str) and _PLAN_KEY.fullmatch(key) is not None, f"{name}: bad key {str(key)[:40]!r}")
        if isinstance(item, (int, float)) and not isinstance(item, bool):
            _number(item, f"{name}.{key}")
        else:
            require(item is None or isinstance(item, bool) or isinstance(item, str), f"{name}.{key}: bad value")
            if isinstance(item, str):
                _text(item, f"{name}.{key}")
    return value


def _participation(value, name: str) -> dict:
    """Peer id -> a count >= 1 (the privacy ledger: how often each peer's update was released)."""
    require(isinstance(value, dict) and len(value) <= 10_000, f"{name}: expected an object of peer ids")
    for peer, count in value.items():
        _peer_id(peer, f"{name} key")
        _count(count, f"{name}.{peer}", 1)
    return value


def _optional_number(low: float):
    def rule(value, name: str) -> float | None:
        return None if value is None else _number(value, name, low)

    return rule


def _ciphertext(value, name: str) -> str:
    require(isinstance(value, str) and len(value) == 4 * ((CIPHERTEXT_BYTES + 2) // 3), f"{name}: not a ciphertext")
    try:
        raw = base64.b64decode(value, validate=True)
    except ValueError:
        raise ProtocolError(f"{name}: not base64") from None
    require(len(raw) == CIPHERTEXT_BYTES, f"{name}: a ciphertext is {CIPHERTEXT_BYTES} bytes")
    return value


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
    # secure aggregation (docs/PROTOCOL.md, Secure aggregation)
    "share_key": _hex(KEY_HEX),
    "mask_key": _hex(KEY_HEX),
    "seed_digest": _hex(KEY_HEX),
    "threshold": lambda v, n: _count(v, n, 2, MAX_SECURE_TRAINERS),
    "clip": lambda v, n: _number(v, n, 2.0**-20, 2.0**20),
    "weight_bound": lambda v, n: _count(v, n, 1),
    "keys": _rows(4, _hex(KEY_HEX)),
    "ciphertexts": _rows(2, _ciphertext),
    "shares": _rows(2, _hex(KEY_HEX)),
    "maskers": _peer_list,
    "survivors": _peer_list,
    "dropped": _peer_list,
    "plan": _plan,
    "epsilon": _optional_number(0.0),
    "optimizer": _text,
    "step": _count,
    "participation": _participation,
    "unattributed": _count,
}


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[str]
    TOPIC: ClassVar[str]  # the topic's kind level: <prefix>/<run_id>/<TOPIC>/<sender>
    SENDER: ClassVar[str]  # the field that names the peer sending it
    CARRIES_WEIGHTS: ClassVar[bool] = False
    INTEGER_WEIGHTS: ClassVar[bool] = False  # its weights are uint32 (a masked vector), not float
    WIRE_DTYPE: ClassVar[str | None] = None  # the dtype its weights always travel as; None: the peer's --wire-dtype

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
    plan: dict = field(default_factory=dict)  # how the run trains (peer.roles.controller.RoundRules.plan), for show


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
    epsilon: float | None = None  # the privacy spent after this round (DP runs), at the run's --dp-delta


@dataclass(frozen=True)
class ServerState(Message):
    """What the next controller needs to go on training as this one would: the server optimizer's state (its slots'
    tensors, always float32; `peer.learning.server_optimizers`) and the privacy ledger (`participation`: peer ->
    releases of its update; `unattributed`: releases that may have been anyone's), for the global model of `round`
    whose digest is `digest`. Retained on the controller's own topic, which only controllers subscribe to: it
    costs the peers nothing, and a new controller gets it from the broker as it takes office (docs/PROTOCOL.md)."""

    TYPE = "server-state"
    TOPIC = "server-state"
    SENDER = "controller"
    CARRIES_WEIGHTS = True
    WIRE_DTYPE = "float32"  # the moments are small numbers that float16 would flush to zero
    term: int
    controller: str
    round: int
    digest: str
    optimizer: str
    step: int
    participation: dict
    unattributed: int
    weights: list


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


# --- secure aggregation: one round attempt's exchange (docs/PROTOCOL.md, Secure aggregation) -----------------------
# Trainer to controller on the solution kind, controller to trainers on the training kind, trainer to trainers on
# the shares kind. Each is bound to (term, round, attempt); its values are checked again by peer.learning.secagg.


@dataclass(frozen=True)
class Keys(Message):
    """A chosen trainer's fresh public keys for this attempt and its commitment to its self-mask seed."""

    TYPE = "keys"
    TOPIC = "solution"
    SENDER = "peer"
    term: int
    round: int
    attempt: int
    peer: str
    share_key: str
    mask_key: str
    seed_digest: str


@dataclass(frozen=True)
class Roster(Message):
    """The controller fixes the attempt's trainers (U1: rows [peer, share_key, mask_key, seed_digest]), the
    threshold, the quantization clip and the weight bound (the sum of their announced sample counts)."""

    TYPE = "roster"
    TOPIC = "training"
    SENDER = "controller"
    term: int
    controller: str
    round: int
    attempt: int
    threshold: int
    clip: float
    weight_bound: int
    keys: tuple[tuple[str, str, str, str], ...]


@dataclass(frozen=True)
class Shares(Message):
    """A roster member's shares of its seed and mask key, encrypted to each other member: rows [recipient, base64]."""

    TYPE = "shares"
    TOPIC = "shares"
    SENDER = "peer"
    term: int
    round: int
    attempt: int
    peer: str
    ciphertexts: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Maskers(Message):
    """The controller names U2: the members whose shares went out, who now mask their updates."""

    TYPE = "maskers"
    TOPIC = "training"
    SENDER = "controller"
    term: int
    controller: str
    round: int
    attempt: int
    maskers: tuple[str, ...]


@dataclass(frozen=True)
class Masked(Message):
    """A masker's quantized, masked update: one uint32 tensor of the model's parameter count."""

    TYPE = "masked"
    TOPIC = "solution"
    SENDER = "peer"
    CARRIES_WEIGHTS = True
    INTEGER_WEIGHTS = True
    term: int
    round: int
    attempt: int
    peer: str
    samples: int
    loss: float
    weights: list


@dataclass(frozen=True)
class Unmask(Message):
    """The controller's one request to every survivor: the seed shares of `survivors`, the key shares of `dropped`."""

    TYPE = "unmask"
    TOPIC = "training"
    SENDER = "controller"
    term: int
    controller: str
    round: int
    attempt: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class Reveal(Message):
    """A survivor's answer: rows [owner, its share in hex] for the owners whose shares it holds."""

    TYPE = "reveal"
    TOPIC = "solution"
    SENDER = "peer"
    term: int
    round: int
    attempt: int
    peer: str
    shares: tuple[tuple[str, str], ...]


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Init,
        Presence,
        Vote,
        Claim,
        Heartbeat,
        Training,
        Solution,
        Aggregation,
        Evaluation,
        Metrics,
        ServerState,
        Finish,
        Keys,
        Roster,
        Shares,
        Maskers,
        Masked,
        Unmask,
        Reveal,
    )
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
    wire_dtype = message.WIRE_DTYPE or wire_dtype
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
    arrays = WeightCodec.checked(getattr(message, "weights"), integers=message.INTEGER_WEIGHTS)
    dtype = INTEGERS if message.INTEGER_WEIGHTS else wire_dtype
    return [_FRAME_HEAD.pack(FRAME_MAGIC, PROTOCOL_VERSION, len(raw)), raw, *WeightCodec.parts(arrays, dtype)]


def encoded_size(message: Message, wire_dtype: str = "float32") -> int:
    """len(encode(message)) without serialising the weights: what a message's body costs, for the round's byte
    count, at the price of its small JSON header. The envelope adds a fixed `Seal.overhead` (`sealed_size`)."""
    header = len(_json(message.header()))
    if not message.CARRIES_WEIGHTS:
        return header
    dtype = INTEGERS if message.INTEGER_WEIGHTS else (message.WIRE_DTYPE or wire_dtype)
    return _FRAME_HEAD.size + header + WeightCodec.size(getattr(message, "weights"), dtype)


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
        weights = WeightCodec.decode(weights_view)
        integers = [w.dtype == np.uint32 for w in weights]
        require(
            all(integers) if cls.INTEGER_WEIGHTS else not any(integers),
            f"a {cls.TYPE} message carries {'uint32' if cls.INTEGER_WEIGHTS else 'float'} tensors only",
        )
        values["weights"] = weights
    return cls(**values)
