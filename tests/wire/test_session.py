"""The wire session: the replay guard, the Inbox (publications in, messages out) and the Outbox (messages in, frames
out), with real envelopes and chunks and no broker."""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.wire.chunks import Pending
from peer.wire.envelope import Seal, Stamp, Stamper, sealed_size
from peer.wire.errors import Refused
from peer.wire.messages import Aggregation, Heartbeat, Init, Solution, encode
from peer.wire.session import MAX_AGE_S, Delivered, Inbox, OffClock, Outbox, ReplayGuard
from peer.wire.topics import Topics

# --- the replay guard ---------------------------------------------------------------------------------------------------


def stamp(incarnation=100, seq=1, sent_at=1000.0):
    return Stamp(incarnation, seq, sent_at)


def test_a_copy_of_a_message_already_seen_is_refused_and_a_later_one_taken():
    guard = ReplayGuard("me")
    assert guard.check("heartbeat", "c", stamp(seq=5), False, 1000.0) is None
    assert "a copy of c's message 5" in guard.check("heartbeat", "c", stamp(seq=5), False, 1000.0).reason
    assert guard.check("training", "c", stamp(seq=6), False, 1000.0) is None
    assert guard.check("training", "c", stamp(seq=6), False, 1000.0) is not None  # whatever the kind


def test_messages_out_of_order_are_fresh_within_the_window_once():
    # The broker hands a newcomer one sender's retained claim, heartbeat and model chunks in any order.
    guard = ReplayGuard("me")
    top = ReplayGuard.WINDOW + 100
    assert guard.check("aggregation", "c", stamp(seq=top), True, 1000.0) is None
    assert guard.check("aggregation", "c", stamp(seq=top - 3), True, 1000.0) is None  # earlier, unseen
    assert guard.check("aggregation", "c", stamp(seq=top - 3), True, 1000.0) is not None  # seen now
    assert guard.check("heartbeat", "c", stamp(seq=100), False, 1000.0) is not None  # behind the window
    for seq in range(top + 1, top + 3 * ReplayGuard.WINDOW, 7):  # memory stays bounded
        assert guard.check("heartbeat", "c", stamp(seq=seq), False, 1000.0) is None
    assert len(guard.seen[("c", 100)][1]) <= 2 * ReplayGuard.WINDOW + 1


def test_each_life_of_a_sender_is_judged_on_its_own():
    # A restarted peer and its predecessor (or, until one exits, two processes with one id) do not silence each
    # other; a copy within either life is still a copy.
    guard = ReplayGuard("me")
    assert guard.check("init", "c", stamp(incarnation=200, seq=7), False, 1000.0) is None
    assert guard.check("heartbeat", "c", stamp(incarnation=100, seq=3), False, 1000.0) is None
    assert guard.check("heartbeat", "c", stamp(incarnation=100, seq=3), False, 1000.0) is not None
    assert guard.check("init", "c", stamp(incarnation=200, seq=7), False, 1000.0) is not None
    for life in range(300, 306):  # only the last few lives are remembered
        guard.check("init", "c", stamp(incarnation=life, seq=1), False, 1000.0)
    assert len(guard.lives["c"]) == ReplayGuard.LIVES_KEPT == len([k for k in guard.seen if k[0] == "c"])


def test_a_live_message_sent_long_ago_is_refused_a_retained_one_is_history():
    guard = ReplayGuard("me")
    old = stamp(sent_at=1000.0 - MAX_AGE_S - 1)
    refused = guard.check("training", "c", old, False, 1000.0)
    assert refused.level == "warning" and "ago by its clock" in refused.reason
    assert guard.check("heartbeat", "c", old, True, 1000.0) is None
    assert guard.check("finish", "p2", stamp(sent_at=1000.0 + MAX_AGE_S - 1), False, 1000.0) is None


def test_a_last_will_signed_at_connect_time_is_taken_out_of_order():
    guard = ReplayGuard("me")
    assert guard.check("heartbeat", "c", stamp(seq=50), False, 1000.0) is None
    assert guard.check("presence", "c", stamp(seq=1, sent_at=0.0), False, 1000.0) is None
    assert guard.check("heartbeat", "c", stamp(seq=51), False, 1000.0) is None


def test_our_own_messages_are_not_the_guards_to_judge():
    guard = ReplayGuard("me")
    assert guard.check("init", "me", stamp(seq=1), False, 1000.0) is None
    assert guard.check("init", "me", stamp(seq=1), False, 1000.0) is None


@settings(max_examples=500, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["c", "p2"]), st.integers(1, 3), st.integers(1, 6), st.booleans()), max_size=40
    )
)
def test_fuzz_the_guard_never_lets_a_message_through_twice(events):
    guard, passed = ReplayGuard("me"), set()
    for sender, incarnation, seq, retained in events:
        fresh = guard.check("heartbeat", sender, stamp(incarnation, seq), retained, 1000.0) is None
        # (all these seqs are within the window: each passes exactly once, in whatever order)
        assert fresh == ((sender, incarnation, seq) not in passed)
        passed.add((sender, incarnation, seq))


# --- the Inbox and the Outbox -------------------------------------------------------------------------------------------

SECRET = b"s" * 32
TOPICS = Topics("sd", "run-1")
NOW = 1_000_000.0


def sides(max_message_bytes=16 * 1024 * 1024, secret=SECRET, sender_clock=lambda: NOW):
    """An Outbox of "c" and an Inbox of "me" on one run, sharing the federation secret."""
    seal = Seal(secret)
    outbox = Outbox(TOPICS, seal, Stamper(7, sender_clock), "float32", max_message_bytes)
    return outbox, Inbox("me", TOPICS, seal)


def deliver(inbox, frames, now=NOW, retained=False):
    return [inbox.receive(f.topic, f.payload, retained, now) for f in frames]


def model(size):
    return [np.arange(size, dtype=np.float32)]


def test_a_message_goes_out_as_one_frame_and_comes_in_whole_with_what_it_cost():
    outbox, inbox = sides()
    message = Heartbeat(1, "c", 0, "training", "0" * 16)
    publication = outbox.frames(message, retain=True)
    frames = list(publication.frames)
    assert not publication.chunked and len(frames) == 1 and frames[0].retain
    [verdict] = deliver(inbox, frames)
    assert isinstance(verdict, Delivered) and verdict.message == message and verdict.stamp.incarnation == 7
    assert verdict.size == len(frames[0].payload) == outbox.cost(message) == sealed_size(len(encode(message)), True)


def test_a_model_larger_than_a_broker_message_travels_in_chunks_and_comes_back_once():
    outbox, inbox = sides(max_message_bytes=65536)
    message = Aggregation(1, "c", 1, ("p1",), model(60_000))
    publication = outbox.frames(message, retain=True)
    frames = list(publication.frames)
    assert publication.chunked and len(frames) == 4
    assert [f.topic for f in frames] == [TOPICS.chunk(TOPICS.of(message), i) for i in range(4)]
    verdicts = deliver(inbox, reversed(frames))  # any order
    assert [type(v) for v in verdicts] == [Pending, Pending, Pending, Delivered]
    assert np.array_equal(verdicts[-1].message.weights[0], message.weights[0])
    assert outbox.cost(message) == sum(len(f.payload) for f in frames)
    assert all(isinstance(v, Refused) for v in deliver(inbox, frames))  # copies


def test_a_smaller_model_on_a_retained_topic_clears_the_stale_chunks_of_the_last():
    outbox, _ = sides(max_message_bytes=65536)
    list(outbox.frames(Aggregation(1, "c", 1, (), model(60_000)), retain=True).frames)
    frames = list(outbox.frames(Aggregation(1, "c", 2, (), model(10)), retain=True).frames)
    topic = TOPICS.topic("aggregation", "c")
    assert [(f.topic, f.payload) for f in frames[1:]] == [(TOPICS.chunk(topic, i), b"") for i in range(4)]
    assert [f.topic for f in outbox.cleared(topic)] == [topic]


def test_only_models_may_be_chunked():
    outbox, inbox = sides(max_message_bytes=65536)
    init = Init("c", 0, 0, 1, 10, 10, False, "0" * 16)
    big = list(outbox.frames(Aggregation(1, "c", 1, (), model(60_000))).frames)
    init_topic = TOPICS.of(init)
    forged = [
        (
            TOPICS.chunk(init_topic, i),
            Seal(SECRET).seal(
                TOPICS.chunk(init_topic, i), inbox.seal.open(f.topic, f.payload)[0].tobytes(), Stamp(8, i + 1, NOW)
            ),
        )
        for i, f in enumerate(big)
    ]
    verdicts = [inbox.receive(topic, payload, False, NOW) for topic, payload in forged]
    assert all(isinstance(v, Refused) and "never chunked" in v.reason for v in verdicts)
    assert inbox.reassembler.buffered_bytes == 0


@pytest.mark.parametrize(
    "topic, payload, why",
    [
        ("other/run-1/heartbeat/c", b"x", "not a topic of this run"),
        ("sd/run-2/heartbeat/c", b"x", "not a topic of this run"),
        ("sd/run-1/heartbeat/c", b"", "empty payload"),
        ("sd/run-1/heartbeat/c", b"SDEN" + bytes(40), "malformed"),
    ],
)
def test_what_is_not_a_message_of_this_run_is_refused_in_one_line(topic, payload, why):
    _, inbox = sides()
    verdict = inbox.receive(topic, payload, False, NOW)
    assert isinstance(verdict, Refused) and why in verdict.reason


def test_a_message_signed_with_another_secret_or_moved_to_another_topic_is_refused():
    outbox, _ = sides(secret=b"o" * 32)
    _, inbox = sides()
    [frame] = outbox.frames(Heartbeat(1, "c", 0, "training", "0" * 16)).frames
    assert "bad signature" in inbox.receive(frame.topic, frame.payload, False, NOW).reason
    outbox, inbox = sides()
    [frame] = outbox.frames(Heartbeat(1, "c", 0, "training", "0" * 16)).frames
    moved = frame.topic.replace("/c", "/d")
    assert isinstance(inbox.receive(moved, frame.payload, False, NOW), Refused)


def test_an_old_capture_is_a_replay_and_a_copy_is_refused():
    outbox, inbox = sides(sender_clock=lambda: NOW - MAX_AGE_S - 1)
    [frame] = outbox.frames(Heartbeat(1, "c", 0, "training", "0" * 16)).frames
    assert "ago" in inbox.receive(frame.topic, frame.payload, False, NOW).reason
    assert isinstance(inbox.receive(frame.topic, frame.payload, True, NOW), Delivered)  # retained: history
    assert "copy" in inbox.receive(frame.topic, frame.payload, True, NOW).reason


def test_chunked_messages_that_stop_coming_expire_in_one_line_each():
    outbox, inbox = sides(max_message_bytes=65536)
    frames = list(outbox.frames(Solution(1, 1, 1, "c", 10, 0.5, model(60_000))).frames)
    deliver(inbox, frames[:2])
    assert inbox.expire(NOW + 30) == []
    [expired] = inbox.expire(NOW + 61)
    assert "2 of 4 chunks missing" in expired.reason and expired.level == "warning"


def test_a_solution_and_its_weights_survive_the_round_trip_in_float16():
    seal = Seal(SECRET)
    outbox = Outbox(TOPICS, seal, Stamper(7, time.time), "float16")
    inbox = Inbox("me", TOPICS, seal)
    message = Solution(1, 1, 1, "c", 10, 0.5, [np.array([0.5, 1.0, -2.0], np.float32)])
    [frame] = outbox.frames(message).frames
    verdict = inbox.receive(frame.topic, frame.payload, False, time.time())
    assert np.array_equal(verdict.message.weights[0], message.weights[0])
    assert verdict.size == outbox.cost(message) < sealed_size(len(encode(message)), True)


# --- entitlement before content: chunks only from those who send models, a wrong clock told from a replay ---------------


def test_chunks_of_a_sender_the_node_does_not_entitle_are_refused_before_they_cost_anything():
    outbox, _ = sides(max_message_bytes=65536)
    asked = []

    def gate(kind, sender, retained):
        asked.append((kind, sender, retained))
        return None if sender == "ctl" else Refused(f"not the controller: {sender}", "warning")

    inbox = Inbox("me", TOPICS, Seal(SECRET), may_chunk=gate)
    frames = list(outbox.frames(Aggregation(1, "c", 1, (), model(60_000))).frames)
    verdicts = deliver(inbox, frames)
    assert all(isinstance(v, Refused) and "not the controller: c" in v.reason for v in verdicts)
    assert inbox.reassembler.buffered_bytes == 0 and asked[0] == ("aggregation", "c", False)


def test_a_message_of_a_sender_whose_clock_is_off_is_told_from_a_replay():
    guard = ReplayGuard("me")
    assert guard.check("heartbeat", "c", stamp(seq=5), False, 1000.0) is None
    ahead = guard.check("heartbeat", "c", stamp(seq=6, sent_at=1300.0), False, 1000.0)  # its newest: its clock
    assert isinstance(ahead, OffClock) and ahead.sender == "c" and ahead.offset == 300.0 and ahead.kind == "clock"
    replayed = guard.check("heartbeat", "c", stamp(seq=4, sent_at=800.0), False, 1000.0)  # older than the latest
    assert isinstance(replayed, Refused) and not isinstance(replayed, OffClock)
    earlier_life = guard.check("init", "c", stamp(incarnation=50, seq=9, sent_at=700.0), False, 1000.0)
    assert not isinstance(earlier_life, OffClock)  # a capture of an earlier life says nothing of c's clock now
    stranger = guard.check("init", "s", stamp(incarnation=1, seq=1, sent_at=1300.0), False, 1000.0)
    assert isinstance(stranger, OffClock)  # the first word of a peer never heard: its clock (or ours) is off
