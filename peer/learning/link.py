"""The link between a peer and its learning service (`peer.learning.service`): requests and replies over a local stream
socket, each one frame.

A frame, little-endian: magic b"SDLK", u32 header length, u64 weights length, the header (a UTF-8 JSON object), then
the weights in the wire's format (`peer.wire.weights.WeightCodec`), or nothing. No pickle: both ends are processes of
one user on one machine, and still neither trusts the other's bytes further than the codec checks them.
"""

from __future__ import annotations

import json
import socket
import struct

import numpy as np

from peer.wire.weights import WeightCodec

MAGIC = b"SDLK"
_HEAD = struct.Struct("<4sIQ")
MAX_HEADER_BYTES = 1 << 20


class LinkError(ConnectionError):
    """The other end is gone, or sent what is not a frame."""


def send(sock: socket.socket, header: dict, weights: list[np.ndarray] | None = None) -> None:
    """One frame; the weights' values are written from the arrays in place."""
    raw = json.dumps(header, separators=(",", ":")).encode()
    parts = WeightCodec.parts(weights) if weights is not None else []
    size = sum(memoryview(part).nbytes for part in parts)
    try:
        sock.sendall(_HEAD.pack(MAGIC, len(raw), size) + raw)
        for part in parts:
            sock.sendall(part)
    except OSError as err:
        raise LinkError(f"the other end is gone ({err})") from None


def _read(sock: socket.socket, count: int) -> bytearray:
    data = bytearray(count)
    view = memoryview(data)
    got = 0
    while got < count:
        try:
            n = sock.recv_into(view[got:], count - got)
        except OSError as err:
            raise LinkError(f"the other end is gone ({err})") from None
        if n == 0:
            raise LinkError("the other end closed the link")
        got += n
    return data


def receive(sock: socket.socket) -> tuple[dict, list[np.ndarray] | None]:
    """One frame: its header and its weights (None if it carried none)."""
    magic, header_len, weights_len = _HEAD.unpack(bytes(_read(sock, _HEAD.size)))
    if magic != MAGIC or header_len > MAX_HEADER_BYTES:
        raise LinkError("not a frame of the learning link")
    try:
        header = json.loads(bytes(_read(sock, header_len)))
    except ValueError as err:
        raise LinkError(f"a frame's header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise LinkError("a frame's header is not a JSON object")
    if not weights_len:
        return header, None
    try:
        return header, WeightCodec.decode(memoryview(_read(sock, weights_len)))
    except ValueError as err:
        raise LinkError(f"a frame's weights do not decode ({err})") from None
