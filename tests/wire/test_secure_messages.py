"""Secure aggregation on the wire: masked vectors travel as uint32 bit for bit and only in `masked` messages, the
rows of a roster, of shares and of reveals are checked, and the new kind is subscribed to as it should be."""

from __future__ import annotations

import base64
import dataclasses
import json
import struct

import numpy as np
import pytest

from peer.wire.errors import ProtocolError
from peer.wire.messages import (
    CIPHERTEXT_BYTES,
    FRAME_MAGIC,
    PROTOCOL_VERSION,
    Masked,
    Roster,
    Shares,
    Solution,
    decode,
    encode,
    encoded_size,
)
from peer.wire.topics import Topics
from peer.wire.weights import INTEGERS, WeightCodec

EVERY_PATTERN = np.array([0, 1, 0x7FC00000, 0x7F800000, 0xFF800000, 0x80000000, 2**32 - 1], np.uint32)


def masked(weights) -> Masked:
    return Masked(term=2, round=3, attempt=1, peer="peer-1", samples=600, loss=0.25, weights=weights)


def frame(header: dict, weights: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sBxxxI", FRAME_MAGIC, PROTOCOL_VERSION, len(head)) + head + weights


def test_a_masked_vector_travels_bit_for_bit_even_its_nan_patterns():
    message = masked([EVERY_PATTERN])
    payload = encode(message, "float16")  # the wire dtype of the models does not touch it
    assert len(payload) == encoded_size(message, "float16")
    got = decode("solution", payload, "peer-1")
    assert got.weights[0].dtype == np.uint32 and np.array_equal(got.weights[0], EVERY_PATTERN)


def test_a_masked_message_carries_uint32_only_and_a_solution_never_does():
    with pytest.raises(ProtocolError, match="must be uint32"):
        encode(masked([np.zeros(3, np.float32)]))
    with pytest.raises(ProtocolError, match="must be uint32"):
        encode(masked([np.zeros(3, np.int64)]))
    floats = WeightCodec.encode([np.zeros(3, np.float32)])
    with pytest.raises(ProtocolError, match="uint32 tensors only"):
        decode("solution", frame(masked([]).header(), floats))
    integers = WeightCodec.encode([EVERY_PATTERN], INTEGERS)
    solution = Solution(term=2, round=3, attempt=1, peer="peer-1", samples=5, loss=0.0, weights=[])
    with pytest.raises(ProtocolError, match="float tensors only"):
        decode("solution", frame(solution.header(), integers))


def test_a_ciphertext_is_80_bytes_of_base64():
    good = base64.b64encode(bytes(CIPHERTEXT_BYTES)).decode()
    message = Shares(term=1, round=1, attempt=1, peer="peer-2", ciphertexts=(("peer-1", good), ("peer-3", good)))
    assert decode("shares", encode(message), "peer-2") == message
    short = base64.b64encode(bytes(CIPHERTEXT_BYTES - 3)).decode() + "AAAA"  # the right length, the wrong bytes
    assert len(short) == len(good)
    with pytest.raises(ProtocolError, match="shares.ciphertexts"):
        encode(dataclasses.replace(message, ciphertexts=(("peer-1", short[:-4] + "A==="),)))


def test_roster_rows_are_one_per_peer_in_order():
    row = ("peer-1", "01" * 32, "02" * 32, "03" * 32)
    roster = Roster(term=1, controller="c", round=1, attempt=1, threshold=2, clip=8.0, weight_bound=10, keys=(row,))
    assert decode("training", encode(roster), "c").keys == (row,)
    with pytest.raises(ProtocolError, match="in order of peer id"):
        encode(dataclasses.replace(roster, keys=(("peer-2",) + row[1:], row)))


def test_shares_are_a_kind_every_peer_hears_but_not_from_itself():
    topics = Topics("sd", "r")
    follower = dict(topics.subscriptions())
    assert follower["sd/r/shares/#"] is True  # no_local
    assert "sd/r/shares/#" not in dict(topics.subscriptions(controller=True))
    # keys, masked vectors and reveals go where solutions go: to the controller alone
    assert "sd/r/solution/#" in dict(topics.subscriptions(controller=True))
