"""The recorder (python -m graphs.record): the run's records from the wire, as a peer trusts it. The transcript alone
(messages in, rows out), then on a real broker: sealed messages as peers publish them, the recorder's files read
back with the peers' own readers."""

from __future__ import annotations

import json
import queue
import threading

import pytest

from graphs.record import Transcript, listeners, record
from peer.node.transport import Connected, MqttTransport
from peer.records.run_dir import read_elections, read_evaluations, read_rounds
from peer.wire.envelope import Seal, Stamp
from peer.wire.messages import Claim, Evaluation, Finish, Metrics, Training
from peer.wire.session import Inbox, Outbox
from peer.wire.topics import Topics
from scripts.localnet import Broker, find_mosquitto
from tests.netutil import fresh_stamper

SECRET = b"federation-secret-0123456789abcdef"
T0 = 1_790_000_000.0


def stamp(at: float) -> Stamp:
    return Stamp(1, int(at), at)


def messages():
    return [
        (Claim(1, "peer-2", 0.9, 0, "start", ("peer-1", "peer-2", "peer-3")), T0),
        (Claim(1, "peer-3", 0.8, 0, "start", ("peer-1", "peer-2", "peer-3")), T0 + 0.1),  # too late: peer-2 won
        (Metrics(1, "peer-2", 0, 0.1, 2.3, 300, (), 0.5, 0, T0), T0 + 1),  # round 0: the initial model, no round
        (Training(1, "peer-2", 1, 1, ("peer-1", "peer-3"), "0" * 32), T0 + 2),
        (Training(1, "peer-2", 1, 2, ("peer-1", "peer-3"), "0" * 32), T0 + 2.5),  # re-sent: the first order counts
        (Evaluation(1, 1, "peer-1", 0.5, 1.5, 100), T0 + 4),
        (Evaluation(1, 1, "peer-1", 0.5, 1.5, 100), T0 + 4.2),  # a copy
        (Evaluation(1, 1, "peer-3", 0.7, 1.1, 200), T0 + 4.5),
        (Metrics(1, "peer-2", 1, 0.6333, 1.2333, 300, ("peer-1", "peer-3"), 2.75, 12345, T0), T0 + 5),
        (Metrics(1, "peer-2", 1, 0.6333, 1.2333, 300, ("peer-1", "peer-3"), 2.75, 12345, T0), T0 + 5.1),  # again
        (Finish(1, "peer-2", 1, "max-rounds", 0.6333), T0 + 6),
    ]


def test_the_transcript_turns_messages_into_the_rows_the_peers_record():
    transcript = Transcript()
    rows = [row for message, at in messages() for row in transcript.take(message, stamp(at))]
    assert [kind for kind, _ in rows] == ["election", "evaluation", "evaluation", "round", "run"]
    assert rows[0][1] == {
        "term": 1, "controller": "peer-2", "reason": "start", "members": ["peer-1", "peer-2", "peer-3"], "at": T0
    }  # fmt: skip
    assert rows[1][1] == {
        "peer": "peer-1", "round": 1, "term": 1, "accuracy": 0.5, "loss": 1.5, "samples": 100, "at": T0 + 4
    }  # fmt: skip
    assert rows[3][1] == dict(
        round=1, term=1, controller="peer-2", trainers=["peer-1", "peer-3"], accuracy=0.6333, loss=1.2333,
        duration_s=2.75, bytes_sent=12345, finished_at=T0 + 5, started_at=T0 + 2,
    )  # fmt: skip
    assert rows[4][1]["outcome"] == {
        "reason": "max-rounds", "rounds": 1, "final_accuracy": 0.6333, "terms": 1, "controller": "peer-2",
        "finished_at": T0 + 6,
    }  # fmt: skip


@pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto broker")
def test_the_recorder_writes_the_run_it_hears_and_ignores_what_a_peer_would(tmp_path):
    topics = Topics("sd", "run-1")
    with Broker() as broker:
        events: queue.Queue = queue.Queue()
        listening = MqttTransport([("127.0.0.1", broker.port)], "recorder", [(topics.subscription, False)], events)
        listening.start(None)
        sender_events: queue.Queue = queue.Queue()
        sender = MqttTransport([("127.0.0.1", broker.port)], "sender", [], sender_events)
        sender.start(None)
        try:
            assert isinstance(events.get(timeout=30), Connected)
            assert isinstance(sender_events.get(timeout=30), Connected)
            done: list[int] = []
            thread = threading.Thread(
                target=lambda: done.append(record(events, Inbox("", topics, Seal(SECRET)), tmp_path / "rec", 60))
            )
            thread.start()
            outboxes = {}  # one process (incarnation) per sender, as peers are
            for message, _ in messages():
                outbox = outboxes.setdefault(message.sender, Outbox(topics, Seal(SECRET), fresh_stamper()))
                for frame in outbox.frames(message).frames:
                    sender.publish(frame.topic, frame.payload).wait_for_publish(30)
            forged = Outbox(topics, Seal(b"x" * 32), fresh_stamper())  # another secret: no peer would take it
            for frame in forged.frames(Metrics(1, "peer-2", 2, 0.99, 0.1, 300, ("peer-1",), 1.0, 1, T0)).frames:
                sender.publish(frame.topic, frame.payload).wait_for_publish(30)
            thread.join(90)
        finally:
            listening.close()
            sender.close()
    assert done == [5]
    rounds = read_rounds(tmp_path / "rec")
    assert [(r.round, r.term, r.controller, r.trainers, r.accuracy, r.bytes_sent) for r in rounds] == [
        (1, 1, "peer-2", ["peer-1", "peer-3"], 0.6333, 12345)
    ]
    assert [(e.term, e.controller, e.reason) for e in read_elections(tmp_path / "rec")] == [(1, "peer-2", "start")]
    assert [(e.round, e.accuracy, e.samples) for e in read_evaluations(tmp_path / "rec", "peer-3")] == [(1, 0.7, 200)]
    assert json.loads((tmp_path / "rec" / "run.json").read_text())["outcome"]["reason"] == "max-rounds"


def test_on_every_broker_the_recorder_misses_nothing_that_crossed_no_bridge_and_records_copies_once(tmp_path):
    """Two brokers not bridged at all (as two bridged ones are while their bridge forms again after a broker's loss):
    each message reaches one of them only. On every broker the recorder hears both; a message published on both (a
    copy, as a bridge delivers) is recorded once. On the first broker alone it misses half the run."""
    topics = Topics("sd", "run-1")
    with Broker() as first, Broker() as second:
        ports = (first.port, second.port)
        sender_events: queue.Queue = queue.Queue()
        senders = [MqttTransport([("127.0.0.1", p)], f"sender-{p}", [], sender_events) for p in ports]
        events: queue.Queue = queue.Queue()
        every = listeners([("127.0.0.1", p) for p in ports], True, topics.subscription, events)
        lone_events: queue.Queue = queue.Queue()
        [lone] = listeners([("127.0.0.1", p) for p in ports], False, topics.subscription, lone_events)
        try:
            for transport in [*senders, *every, lone]:
                transport.start(None)
            for got in (sender_events, sender_events, events, events, lone_events):
                assert isinstance(got.get(timeout=30), Connected)
            done: dict[str, int] = {}
            threads = [
                threading.Thread(target=lambda: done.setdefault("every", record(events, Inbox("", topics, Seal(SECRET)), tmp_path / "every", 60))),
                threading.Thread(target=lambda: done.setdefault("lone", record(lone_events, Inbox("", topics, Seal(SECRET)), tmp_path / "lone", 60))),
            ]  # fmt: skip
            for thread in threads:
                thread.start()
            outboxes = {}
            for k, (message, _) in enumerate(messages()):
                outbox = outboxes.setdefault(message.sender, Outbox(topics, Seal(SECRET), fresh_stamper()))
                on = senders if isinstance(message, (Claim, Finish)) else [senders[k % 2]]
                for frame in outbox.frames(message).frames:
                    for sender in on:  # claims and the finish on both: the copy is dropped
                        sender.publish(frame.topic, frame.payload).wait_for_publish(30)
            for thread in threads:
                thread.join(90)
        finally:
            for transport in [*senders, *every, lone]:
                transport.close()
    assert done["every"] == 5
    assert [(e.term, e.controller) for e in read_elections(tmp_path / "every")] == [(1, "peer-2")]
    assert [(r.round, r.accuracy) for r in read_rounds(tmp_path / "every")] == [(1, 0.6333)]
    assert [(e.round, e.samples) for e in read_evaluations(tmp_path / "every", "peer-1")] == [(1, 100)]
    assert [(e.round, e.samples) for e in read_evaluations(tmp_path / "every", "peer-3")] == [(1, 200)]
    assert done["lone"] < 5  # (the evaluation of peer-3 went by on the second broker only)
    assert read_evaluations(tmp_path / "lone", "peer-3") == []
