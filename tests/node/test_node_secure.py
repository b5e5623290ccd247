"""A follower with --secure-aggregation through the node (fake transport and learner, as tests/node/test_node.py):
on an order it sends fresh keys, on the roster its encrypted shares, after its fit and the maskers its masked update
(never a plain solution), on the unmask request its shares; another trainer's forged shares are refused in one
line, and a peer that trains nothing takes shares without a word."""

from __future__ import annotations

import base64
import logging
import random

import numpy as np
import pytest

from peer.learning.secagg.masking import Advertisement, Trainer
from peer.learning.secagg.masking import Roster as CoreRoster
from peer.learning.secagg.shamir import share_from_bytes
from peer.roles.actions import JobDone
from peer.roles.secure import attempt_context
from peer.wire.messages import Keys, Masked, Maskers, Reveal, Roster, Shares, Solution, Training, Unmask
from tests.node.test_node import Clock, Lines, deliver, digest, follow, make_peer, weights


@pytest.fixture
def lines():
    handler, log = Lines(), logging.getLogger("peer")
    level, log.level = log.level, logging.DEBUG
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def row(advert):
    return (advert.peer, advert.share_key.hex(), advert.mask_key.hex(), advert.seed_digest.hex())


def advertisement(row_):
    peer, *keys = row_
    return Advertisement(peer, *(bytes.fromhex(k) for k in keys))


def test_a_secure_trainer_answers_each_step_and_never_sends_a_solution(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path, secure_aggregation=True, trainers=2)
    clock = Clock(peer)
    follow(peer, clock)
    order = Training(1, "c", 1, 1, ("p1", "p2"), digest(weights(0)))
    deliver(peer, order, clock.now)
    [keys] = transport.messages(Keys)
    [fit] = runner.jobs
    assert (keys.peer, keys.round, keys.attempt) == ("p1", 1, 1)

    other = Trainer("p2", attempt_context(1, 1, 1, order.digest), random.Random(5).randbytes)
    ours = ("p1", keys.share_key, keys.mask_key, keys.seed_digest)
    roster = Roster(1, "c", 1, 1, 2, 8.0, 1000, (ours, row(other.advertisement)))
    deliver(peer, roster, clock.now)
    [shares] = transport.messages(Shares)
    assert [recipient for recipient, _ in shares.ciphertexts] == ["p2"]

    # p2's own shares for p1, made by the real thing; and a forged copy of them, refused
    core = CoreRoster.of(other.context, 2, [advertisement(r) for r in roster.keys])
    for_p1 = other.share(core)["p1"]
    forged = bytearray(for_p1)
    forged[0] ^= 1
    deliver(peer, Shares(1, 1, 1, "p2", (("p1", base64.b64encode(bytes(forged)).decode()),)), clock.now)
    assert lines.having("refused the shares of p2")
    deliver(peer, Shares(1, 1, 1, "p2", (("p1", base64.b64encode(for_p1).decode()),)), clock.now)

    deliver(peer, Maskers(1, "c", 1, 1, ("p1", "p2")), clock.now)
    assert transport.messages(Masked) == []  # not before its fit is done
    fitted = weights(0.25)
    peer.handle(JobDone(fit, (fitted, 500, 0.5), None, 0.1), clock.now)
    [masked] = transport.messages(Masked)
    assert masked.weights[0].dtype == np.uint32 and masked.weights[0].shape == (7,)
    assert masked.samples == 500
    assert transport.messages(Solution) == []

    deliver(peer, Unmask(1, "c", 1, 1, ("p1", "p2"), ()), clock.now)
    [reveal] = transport.messages(Reveal)
    assert [owner for owner, _ in reveal.shares] == ["p1", "p2"]
    assert all(share_from_bytes(bytes.fromhex(value)) >= 0 for _, value in reveal.shares)
    # asked again with another split: refused, nothing more sent
    deliver(peer, Unmask(1, "c", 1, 1, ("p1",), ("p2",)), clock.now)
    assert len(transport.messages(Reveal)) == 1 and lines.having("refused the unmask")


def test_a_peer_that_trains_nothing_takes_shares_without_a_word(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path, secure_aggregation=True, trainers=2)
    clock = Clock(peer)
    follow(peer, clock)
    before = len(lines.lines)
    deliver(peer, Shares(1, 1, 1, "p2", (("p3", "A" * 107 + "="),)), clock.now)
    assert transport.messages(Keys) == [] and runner.jobs == []
    assert not [line for line in lines.lines[before:] if line[0] in ("WARNING", "ERROR")]
