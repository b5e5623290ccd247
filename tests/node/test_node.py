"""The node (the event loop that carries the machines' actions out) with a fake transport and a fake learner: no
broker, no TensorFlow, no threads. The fake transport loops every publication back to the peer, as a broker does to
a subscriber of `sd/#`; the other peers' messages are handed in by the test.

A whole round as controller and as follower, a failover, refused messages, the finish."""

from __future__ import annotations

import json
import logging
import random
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from peer.config import Settings
from peer.node.loop import Peer
from peer.node.transport import Inbound
from peer.roles.actions import JobDone, StartJob
from peer.roles.election import Role
from peer.wire.envelope import Seal, Stamper
from peer.wire.errors import ProtocolError
from peer.wire.messages import (
    Aggregation,
    Claim,
    Evaluation,
    Finish,
    Heartbeat,
    Init,
    Metrics,
    Presence,
    Solution,
    Training,
    Vote,
    decode,
    encode,
)
from peer.wire.session import CHUNK_TIMEOUT_S
from peer.wire.topics import Topics
from peer.wire.weights import WeightCodec
from tests.netutil import fresh_stamper, read_csv

TOPICS = Topics("sd", "default")
OPEN = Seal(None)
STAMPERS: dict[str, Stamper] = {}  # one process life per other peer the tests speak for


def sealed(message, seal=OPEN, topic=None, stamper=None):
    """The payload `message`'s sender would publish (open mode unless a seal with a secret is given)."""
    stamper = stamper or STAMPERS.setdefault(message.sender, fresh_stamper())
    return seal.seal(topic or TOPICS.of(message), encode(message), stamper.next())


def weights(value: float):
    return [np.full((2, 2), value, np.float32), np.full(3, value, np.float32)]


def digest(tensors) -> str:
    return WeightCodec.digest(tensors)


FP = "0" * 16  # the fake learner's model fingerprint


class FakeTransport:
    """Loops a publication back to the peer when its subscriptions take it, as the broker does (no_local: not)."""

    def __init__(self):
        self.published: list[tuple[str, bytes, bool]] = []
        self.connected = True
        self.events = None  # the peer's queue, for the loop-back
        self.subscriptions = dict(TOPICS.subscriptions())
        self.fetches: list[str] = []

    def start(self, will_topic, will_payload, will_expiry=None):
        pass

    def subscribe(self, pairs):
        self.subscriptions.update(pairs)

    def unsubscribe(self, topics):
        for topic in topics:
            self.subscriptions.pop(topic, None)

    def fetch_retained(self, topic):
        self.fetches.append(topic)

    def publish_paced(self, messages, retain=False, expiry=None):
        for topic, payload in messages:
            self.publish(topic, payload, retain, expiry)

    def publish(self, topic, payload, retain=False, expiry=None):
        self.published.append((topic, payload, retain))
        located = TOPICS.locate(topic)
        no_local = self.subscriptions.get(f"sd/default/{located[0]}/#") if located else None
        if no_local is False:
            self.events.put(Inbound(topic, payload, False))

    def close(self, last=(), timeout=5.0):
        self.closed_with = list(last)

    def messages(self, kind, seal=OPEN):
        found = []
        for topic, payload, _ in self.published:
            parsed = TOPICS.parse(topic)
            if parsed and parsed[0] == kind.TOPIC and payload:
                message = decode(parsed[0], seal.open(topic, payload)[0], sender=parsed[1])
                if isinstance(message, kind):
                    found.append(message)
        return found


class FakeRunner:
    def __init__(self):
        self.jobs: list[StartJob] = []

    def submit(self, job):
        self.jobs.append(job)

    def stop(self, timeout=30.0):
        pass


class FakeLearner:
    def __init__(self):
        self.saved = []

    def initial_weights(self):
        return weights(0)

    def sample_counts(self):
        return (500, 100)

    def count_bound(self):
        return (500, 100)  # the most any shard of the run holds

    def fingerprint(self):
        return FP

    def model_description(self):
        return "the fake model"

    def save(self, weights_, path):
        path.write_bytes(b"a model")  # where it is told (a temporary file, renamed once written whole)
        self.saved.append(path)


class Lines(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines: list[tuple[str, str]] = []

    def emit(self, record):
        self.lines.append((record.levelname, record.getMessage()))

    def having(self, text):
        return [line for line in self.lines if text in line[1]]


@pytest.fixture
def lines():
    handler, log = Lines(), logging.getLogger("peer")
    level, log.level = log.level, logging.DEBUG
    log.addHandler(handler)
    yield handler
    log.removeHandler(handler)
    log.setLevel(level)


def make_peer(tmp_path, me="p1", **overrides) -> tuple[Peer, FakeTransport, FakeRunner, FakeLearner]:
    options = dict(
        peer_id=me,
        min_peers=2,
        trainers=1,
        min_solutions=1,
        max_rounds=1,
        target_accuracy=0.99,
        heartbeat=0.5,
        election_window=0.5,
        round_deadline=10.0,
        run_dir=tmp_path,
    )
    options.update(overrides)
    transport, runner, learner = FakeTransport(), FakeRunner(), FakeLearner()
    peer = Peer(Settings(**options), learner, rng=random.Random(1), transport=transport, runner=runner)
    transport.events = peer.events
    return peer, transport, runner, learner


class Clock:
    """The peer's clocks, simulated: its monotonic `now`, and its wall clock going along from the real time."""

    def __init__(self, peer: Peer):
        self.now = peer.election.started_at
        peer._last_tick = self.now
        offset = time.time() - self.now
        peer.wall_clock = lambda: self.now + offset

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def pump(peer: Peer, now: float) -> None:
    """Handle every queued event (loop-backs included), then tick once, as the loop does."""
    while not peer.events.empty():
        peer.handle(peer.events.get(), now)
    peer.tick(now)
    while not peer.events.empty():
        peer.handle(peer.events.get(), now)
    peer._write_status()


def deliver(
    peer: Peer,
    message,
    now: float,
    retained: bool = False,
    topic: str | None = None,
    seal: Seal = OPEN,
    stamper: Stamper | None = None,
) -> None:
    topic = topic or TOPICS.of(message)
    peer.handle(Inbound(topic, sealed(message, seal, topic, stamper), retained), now)
    pump(peer, now)


def listen(peer: Peer, clock: Clock) -> None:
    """Let a newly started peer's join grace pass (it moves to no term before: it is still hearing who is here);
    what comes next is heard just as it ends."""
    while clock.now + 0.1 - peer.election.started_at < peer.election.timings.join_grace:
        pump(peer, clock.advance(0.1))
    clock.now = peer.election.started_at + peer.election.timings.join_grace


def run_until(peer: Peer, clock: Clock, done, seconds: float = 10.0, step: float = 0.1) -> None:
    for _ in range(int(seconds / step)):
        pump(peer, clock.advance(step))
        if done():
            return
    raise AssertionError("condition not reached")


def follow(peer, clock, controller="c", term=1):
    """Make `peer` a follower of `controller` in `term`: once it has listened for its join grace, the controller's
    heartbeat tells who leads (the only other peer is a majority of the others)."""
    deliver(peer, Presence(controller, "online"), clock.now)
    listen(peer, clock)
    deliver(peer, Heartbeat(term, controller, 0, "evaluating", FP), clock.now)
    assert (peer.election.term, peer.election.controller) == (term, controller)
    if peer.store.latest is None:  # it holds the run's initial model, as if it had come as the round-0 aggregation
        peer.store.offer(0, term, weights(0))


# --- as follower --------------------------------------------------------------------------------------------------------


def test_a_follower_evaluates_trains_and_remembers_a_whole_round(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    assert lines.having("term 1: controller is c")
    deliver(peer, Aggregation(1, "c", 0, (), weights(0)), clock.now)
    [evaluate] = runner.jobs
    assert (evaluate.kind, evaluate.round) == ("evaluate", 0) and peer.store.latest.round == 0
    peer.handle(JobDone(evaluate, (0.25, 2.0, 100), None, 0.1), clock.now)
    [evaluation] = transport.messages(Evaluation)
    assert (evaluation.round, evaluation.accuracy, evaluation.peer) == (0, 0.25, "p1")
    assert read_csv(tmp_path / "peers" / "p1" / "evaluations.csv")[0]["accuracy"] == "0.250000"
    deliver(peer, Metrics(1, "c", 0, 0.25, 2.0, 100, (), 0.0, 10, 123.0), clock.now)
    assert peer.store.finished[0].accuracy == 0.25 and peer.store.run_started == 123.0

    deliver(peer, Training(1, "c", 1, 1, ("p2",), digest(weights(0))), clock.now)
    assert len(runner.jobs) == 1  # not chosen: nothing to do
    deliver(peer, Training(1, "c", 1, 1, ("p1",), digest(weights(0))), clock.now)
    fit = runner.jobs[-1]
    assert (fit.kind, fit.round, fit.attempt) == ("fit", 1, 1)
    assert lines.having("round 1: chosen to train (attempt 1)")
    peer.handle(JobDone(fit, (weights(3), 500, 0.5), None, 1.0), clock.now)
    [solution] = transport.messages(Solution)
    assert (solution.round, solution.samples, solution.peer) == (1, 500, "p1")
    np.testing.assert_array_equal(solution.weights[0], weights(3)[0])

    deliver(peer, Heartbeat(1, "c", 1, "evaluating", FP), clock.now)
    deliver(peer, Aggregation(1, "c", 1, ("p1",), weights(3)), clock.now)
    assert peer.store.latest.round == 1 and peer.election.round == 1 and runner.jobs[-1].kind == "evaluate"
    status = json.loads((tmp_path / "peers" / "p1" / "status.json").read_text())
    assert (status["role"], status["term"], status["round"], status["phase"], status["controller"]) == (
        "follower",
        1,
        1,
        "evaluating",
        "c",
    )


def test_a_follower_exits_on_the_finish_of_its_run(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    deliver(peer, Finish(1, "c", 1, "max-rounds", 0.8), clock.now)
    assert peer.exit_code == 0 and lines.having("finish received from c (max-rounds) after round 1")


def test_a_peer_started_for_a_run_that_is_over_exits_0_saying_so(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    deliver(peer, Finish(4, "old", 7, "max-rounds", 0.9), clock.now, retained=True)
    assert peer.exit_code == 0
    assert lines.having("this run is over: old ended it (max-rounds) after round 7")


def test_a_late_joiner_holds_the_retained_model_of_its_controller_without_evaluating_it(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    deliver(peer, Aggregation(1, "c", 4, ("p2",), weights(4)), clock.now, retained=True)
    deliver(peer, Aggregation(1, "x", 99, ("p2",), weights(9)), clock.now, retained=True)  # a member's planted one
    assert peer.store.latest is None  # whose it is, it does not know yet
    follow(peer, clock)  # c leads
    assert peer.store.latest.round == 4 and runner.jobs == []
    assert peer.election.round == 4  # its vote will say it holds round 4
    assert lines.having("holding the global model of round 4 (retained by the broker)")


# --- as controller -------------------------------------------------------------------------------------------------------


def test_a_lone_pair_elects_this_peer_and_it_runs_a_whole_round_to_the_finish(tmp_path, lines):
    peer, transport, runner, learner = make_peer(tmp_path, me="c")
    clock = Clock(peer)
    deliver(peer, Presence("p1", "online"), clock.now)
    # After the join grace it votes; p1 votes lower; the window passes; it claims; its claim comes back first.
    run_until(peer, clock, lambda: transport.messages(Vote))
    deliver(peer, Vote(1, "p1", 0.0, 0, "start"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    [claim] = [(t, r) for t, p, r in transport.published if TOPICS.parse(t)[0] == "election" and b'"claim"' in p]
    assert claim == ("sd/default/election/c", True)  # retained: a peer joining later learns the decision
    assert read_csv(tmp_path / "elections.csv")[0]["controller"] == "c"
    [agg0] = transport.messages(Aggregation)
    assert agg0.round == 0 and peer.store.latest.round == 0
    # Its own aggregation does not come back (no_local): nothing is adopted or evaluated twice.
    assert not lines.having("ignored a aggregation naming this peer") and runner.jobs == []
    deliver(peer, Evaluation(1, 0, "p1", 0.2, 2.0, 100), clock.now)
    [training] = transport.messages(Training)
    assert training.trainers == ("p1",) and peer.store.finished[0].accuracy == 0.2
    deliver(peer, Solution(1, 1, 1, "p1", 500, 0.4, weights(2)), clock.now)
    assert transport.messages(Aggregation)[-1].round == 1 and peer.store.latest.round == 1
    deliver(peer, Evaluation(1, 1, "p1", 0.6, 1.0, 100), clock.now)
    [finish] = transport.messages(Finish)
    assert (finish.round, finish.reason, finish.accuracy) == (1, "max-rounds", 0.6)
    assert peer.exit_code == 0 and len(learner.saved) == 1 and (tmp_path / "model.keras").read_bytes() == b"a model"
    assert [f.name for f in tmp_path.iterdir() if f.name.startswith(".model")] == []  # no temporary file left
    assert json.loads((tmp_path / "run.json").read_text())["outcome"]["final_accuracy"] == 0.6
    assert [r["round"] for r in read_csv(tmp_path / "rounds.csv")] == ["1"]
    # Leaving, a finished controller says (signed) that it leaves, clears its presence, and its retained leader and
    # model: the retained finish alone stays, for peers (re)started for this run.
    last = peer._last_words()
    assert [(t, bool(p), r) for t, p, r in last] == [
        ("sd/default/presence/c", True, False),
        ("sd/default/presence/c", False, True),
        ("sd/default/election/c", False, True),
        ("sd/default/heartbeat/c", False, True),
        ("sd/default/aggregation/c", False, True),
    ]
    assert decode("presence", OPEN.open(last[0][0], last[0][1])[0]).status == "offline"


def test_failover_the_controller_is_lost_and_this_peer_resumes_from_the_model_it_holds(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path, max_rounds=5)
    clock = Clock(peer)
    follow(peer, clock)
    deliver(peer, Presence("p2", "online"), clock.now)
    deliver(peer, Aggregation(1, "c", 2, ("p2",), weights(2)), clock.now)
    deliver(peer, Metrics(1, "c", 2, 0.7, 1.0, 100, ("p2",), 1.0, 10, 50.0), clock.now)
    # The controller's Last Will: a new term; this peer votes; p2 votes lower; this peer claims and takes office.
    deliver(peer, Presence("c", "offline"), clock.now)
    [vote] = transport.messages(Vote)
    assert vote.term == 2 and vote.reason == "controller-lost" and vote.round == 2
    deliver(peer, Vote(2, "p2", 0.0, 2, "controller-lost"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    assert lines.having("controller of term 2 (controller-lost)")
    [training] = transport.messages(Training)
    assert (training.term, training.round, training.trainers) == (2, 3, ("p2",))  # round 2 was finished: go on
    assert training.digest == digest(weights(2))
    assert "c" not in peer.controller.live


def test_a_peer_alone_in_a_term_that_came_to_nothing_goes_back_to_the_controller_the_others_follow(tmp_path, lines):
    """A broker restart, as a CI run had it: every Will comes, all vote for term 2; the others hear their controller
    again first and go back to it, while their votes, queued during the restart, put this peer alone in term 2. The
    controller's messages are of a term older than this peer's: stale, but the election must hear them, or this peer
    calls elections nobody joins until the run ends without it."""
    peer, transport, runner, _ = make_peer(tmp_path, max_rounds=5)
    clock = Clock(peer)
    follow(peer, clock)
    for other in ("p2", "p3", "p4"):
        deliver(peer, Presence(other, "online"), clock.now)
    deliver(peer, Presence("c", "offline"), clock.now)
    assert transport.messages(Vote)[-1].term == 2
    deliver(peer, Vote(2, "p2", 0.999, 0, "controller-lost"), clock.now)
    deliver(peer, Vote(2, "p3", 0.5, 0, "controller-lost"), clock.now)
    assert peer.election.term == 2 and peer.election.controller is None  # three of four live: it entered term 2
    deliver(peer, Init("c", 1, 0, 5, 10, 10, False, FP), clock.now)
    for other in ("p2", "p3", "p4"):
        deliver(peer, Init(other, 1, 0, 5, 10, 10, True, FP), clock.now)  # they answer: they stand in term 1
    deliver(peer, Heartbeat(1, "c", 0, "training", FP), clock.now)
    assert (peer.election.term, peer.election.controller, peer.election.role) == (1, "c", Role.FOLLOWER)
    assert lines.having("back to it from a term that came to nothing")
    deliver(peer, Training(1, "c", 1, 1, ("p1",), digest(weights(0))), clock.now)
    assert runner.jobs, "it trains for the controller of term 1 again"


def test_a_controller_hears_its_members_answer_a_later_term_and_follows_it(tmp_path, lines):
    """The split brain a broker restart left (the others elected p2 in term 2 while this controller was away):
    solutions and evaluations of term 2 reach it on the topics it reads; once most members are heard in term 2 it
    steps down and follows p2."""
    peer, transport, runner, _ = make_peer(tmp_path, me="c", min_peers=4, max_rounds=5)
    clock = Clock(peer)
    for other in ("p1", "p2", "p3"):
        deliver(peer, Presence(other, "online"), clock.now)
    listen(peer, clock)
    run_until(peer, clock, lambda: transport.messages(Vote))
    for other in ("p1", "p2", "p3"):
        deliver(peer, Vote(1, other, 0.0, 0, "start"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    deliver(peer, Claim(2, "p2", 0.9, 0, "controller-lost", ("p1", "p2", "p3")), clock.now)
    assert peer.controller is not None  # one claim moves nobody
    deliver(peer, Evaluation(2, 1, "p1", 0.5, 1.0, 10), clock.now)
    deliver(peer, Solution(2, 1, 1, "p3", 10, 0.1, weights(1)), clock.now)
    assert peer.controller is None and (peer.election.term, peer.election.controller) == (2, "p2")
    assert lines.having("stepping down as controller of term 1")


def test_a_controller_steps_down_when_a_higher_term_is_claimed(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path, me="c")
    clock = Clock(peer)
    deliver(peer, Presence("p1", "online"), clock.now)
    run_until(peer, clock, lambda: transport.messages(Vote))
    deliver(peer, Vote(1, "p1", 0.0, 0, "start"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    # The only other member claims a later term: it alone is a majority of the others.
    deliver(peer, Claim(5, "p1", 0.9, 0, "controller-silent", ("c", "p1")), clock.now)
    assert peer.controller is None and peer.election.controller == "p1"
    assert lines.having("stepping down as controller of term 1")
    assert transport.messages(Init)[-1].term == 5  # it says it is here, as a peer now


# --- refused --------------------------------------------------------------------------------------------------------------


def test_refused_messages_are_logged_and_change_nothing(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock, term=3)
    before = len(transport.published)
    # a presence forged on another peer's topic
    deliver(peer, Presence("c", "offline"), clock.now, topic="sd/default/presence/p9")
    assert peer.election.controller == "c"
    assert lines.having("claims to be c but was published as p9")[0][0] == "WARNING"
    # a controller message of a stale term
    deliver(peer, Training(2, "c", 1, 1, ("p1",), digest(weights(0))), clock.now)
    # a solution, when this peer is no controller
    deliver(peer, Solution(3, 1, 1, "p2", 10, 0.1, weights(0)), clock.now)
    # a malformed payload
    peer.handle(Inbound("sd/default/training/c", b"\x00garbage", False), clock.now)
    # an empty payload (a cleared retained slot: anyone can send one) and a topic of another run
    peer.handle(Inbound("sd/default/presence/c", b"", True), clock.now)
    peer.handle(Inbound("sd/other-run/finish/c", sealed(Finish(3, "c", 1, "max-rounds", 0.5)), False), clock.now)
    assert runner.jobs == [] and len(transport.published) == before
    assert peer.election.controller == "c" and peer.exit_code is None
    assert lines.having("stale term 2") and lines.having("not the controller of that term")
    assert lines.having("dropped a malformed message on sd/default/training/c")


def test_a_job_of_a_term_that_is_over_is_not_wanted_and_its_solution_is_dropped(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    deliver(peer, Training(1, "c", 1, 1, ("p1",), digest(weights(0))), clock.now)
    fit = runner.jobs[-1]
    assert peer._job_wanted(fit)
    # A new term began meanwhile: c2 claimed it, and c (the only other member) says it stands in it.
    deliver(peer, Presence("c2", "online"), clock.now)
    deliver(peer, Claim(2, "c2", 0.9, 0, "controller-silent", ("c", "c2")), clock.now)
    deliver(peer, Init("c", 2, 0, 5, 10, 10, False, FP), clock.now)
    assert peer.election.controller == "c2" and not peer._job_wanted(fit)
    peer.handle(JobDone(fit, (weights(1), 10, 0.1), None, 1.0), clock.now)
    assert transport.messages(Solution) == [] and lines.having("term 1 is over; solution dropped")


def test_a_queued_fit_for_an_attempt_ordered_again_is_not_wanted(tmp_path):
    # Fits slower than the round's deadline: the controller orders the round again, and ignores the first attempt's
    # solution; a fit of it still queued would only make the next attempt's solution late too.
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    deliver(peer, Training(1, "c", 1, 1, ("p1",), digest(weights(0))), clock.now)
    first = runner.jobs[-1]
    deliver(peer, Training(1, "c", 1, 2, ("p1",), digest(weights(0))), clock.now)
    second = runner.jobs[-1]
    assert (first.attempt, second.attempt) == (1, 2)
    assert not peer._job_wanted(first) and peer._job_wanted(second)


# --- trust and robustness ---------------------------------------------------------------------------------------------


def test_every_announcement_is_answered_once_per_burst_and_no_answer_is(tmp_path):
    peer, transport, runner, _ = make_peer(tmp_path, min_peers=5)
    clock = Clock(peer)

    def mine():
        return [m for m in transport.messages(Init) if m.peer == "p1"]

    deliver(peer, Init("p7", 0, 0, 111, 400, 90, False, FP), clock.now)  # a newcomer, or a peer back on the broker
    deliver(peer, Init("p6", 0, 0, 112, 400, 90, False, FP), clock.now)  # another, in the same burst
    deliver(peer, Init("p8", 0, 0, 222, 400, 90, True, FP), clock.now)  # an answer to someone: not answered
    assert mine() == []  # not at once: within a heartbeat or so
    run_until(peer, clock, lambda: mine(), seconds=2 * peer.settings.heartbeat)
    for _ in range(20):
        pump(peer, clock.advance(0.1))
    assert len(mine()) == 1  # one answer for the burst
    deliver(peer, Init("p7", 0, 0, 111, 400, 90, False, FP), clock.now)  # announcing again (it reconnected)
    for _ in range(20):
        pump(peer, clock.advance(0.1))
    assert len(mine()) == 2 and all(m.reply for m in mine())
    assert (mine()[0].train_samples, mine()[0].test_samples) == (500, 100)
    assert peer.announced["p7"] == (400, 90) and {"p6", "p7", "p8"} <= peer.election.live


def test_the_controller_answers_a_newcomer_at_once(tmp_path):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    deliver(peer, Presence("p2", "online"), clock.now)
    run_until(peer, clock, lambda: transport.messages(Vote), seconds=10)
    deliver(peer, Vote(1, "p2", 0.0, 0, "start"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None, seconds=10)
    assert [m for m in transport.messages(Init) if m.reply] == []
    deliver(peer, Init("p7", 0, 0, 111, 400, 90, False, FP), clock.now)  # no time passes
    assert len([m for m in transport.messages(Init) if m.peer == "p1" and m.reply]) == 1


def test_after_a_reconnect_a_peer_not_heard_from_is_counted_gone(tmp_path, lines):
    from peer.node.transport import Connected

    peer, transport, runner, _ = make_peer(tmp_path, max_rounds=5)
    clock = Clock(peer)
    follow(peer, clock)
    for other in ("p2", "p3"):
        deliver(peer, Presence(other, "online"), clock.now)
    peer.handle(Connected("b:1883"), clock.now)  # the broker restarted: no Last Will survived it
    deliver(peer, Init("p2", 1, 0, 5, 10, 10, False, FP), clock.now)  # p2 and the controller come back; p3 died
    run_until(peer, clock, lambda: "p3" not in peer.election.live, seconds=3.5, step=0.25)
    assert "p2" in peer.election.live and lines.having("p3 was not heard from since this peer reconnected")
    assert "c" in peer.election.live or peer.election.campaign == 2  # c: heard, or silent (then a campaign)


def test_with_too_few_peers_the_peer_gives_up_after_the_wait_timeout(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path, min_peers=3, wait_timeout=2.0)
    clock = Clock(peer)
    run_until(peer, clock, lambda: peer.exit_code is not None, seconds=5)
    assert peer.exit_code == 4 and lines.having("giving up: only 1 of 3 peers came within 2s")


def test_a_failing_disk_is_logged_once_and_the_run_goes_on(tmp_path, lines, monkeypatch):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(peer.records, "evaluation", full)
    for round_ in (0, 1):
        deliver(peer, Aggregation(1, "c", round_, (), weights(round_)), clock.now)
        peer.handle(JobDone(runner.jobs[-1], (0.5, 1.0, 10), None, 0.1), clock.now)
    assert [m.round for m in transport.messages(Evaluation)] == [0, 1]  # reported all the same
    errors = lines.having("could not write evaluations.csv")
    assert len(errors) == 1 and "No space left" in errors[0][1] and errors[0][0] == "ERROR"


def test_malformed_messages_are_logged_at_most_once_per_quiet_period(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    for _ in range(50):
        peer.handle(Inbound("sd/default/heartbeat/x", b"{not json", False), clock.now)
    assert len(lines.having("dropped a malformed message")) == 1
    peer.quota.last = {k: v - 11 for k, v in peer.quota.last.items()}  # the quiet period has passed
    peer.handle(Inbound("sd/default/heartbeat/x", b"{not json", False), clock.now)
    assert lines.having("(49 more like it in the last 10s)")


def test_after_a_reconnect_a_follower_sends_its_answers_again(tmp_path):
    from peer.node.transport import Connected

    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    deliver(peer, Training(1, "c", 1, 1, ("p1",), digest(weights(0))), clock.now)
    peer.handle(JobDone(runner.jobs[-1], (weights(1), 500, 0.5), None, 1.0), clock.now)
    peer.handle(Connected("b:1883"), clock.now)
    assert len(transport.messages(Solution)) == 2


# --- the envelope: signed, fresh, one process per id -------------------------------------------------------------------


def test_with_a_secret_unsigned_and_wrongly_signed_messages_are_ignored(tmp_path, lines):
    secret = b"federation-secret-0123456789"
    peer, transport, runner, _ = make_peer(tmp_path, secret=secret)
    clock = Clock(peer)
    ours, theirs = Seal(secret), Seal(b"another-secret-0123456789")
    deliver(peer, Finish(9, "x", 1, "max-rounds", 1.0), clock.now)  # unsigned
    deliver(peer, Heartbeat(9, "x", 1, "training", FP), clock.now, seal=theirs)  # signed with another secret
    assert peer.exit_code is None and peer.election.term == 0
    assert lines.having("not sealed with the federation secret") and lines.having("bad signature")
    deliver(peer, Init("c", 0, 0, 7, 10, 10, False, FP), clock.now, seal=ours)
    listen(peer, clock)
    deliver(peer, Heartbeat(1, "c", 0, "training", FP), clock.now, seal=ours)
    assert peer.election.controller == "c"
    pump(peer, clock.advance(2 * peer.settings.heartbeat))  # its answer to c's init is due
    [answer] = transport.messages(Init, seal=ours)  # what it sends is signed
    assert answer.peer == "p1"
    with pytest.raises(ProtocolError, match="this peer has none"):  # a peer without the secret refuses it
        OPEN.open(*transport.published[0][:2])


def test_a_copy_or_a_stale_replay_of_a_live_message_is_not_acted_on_twice(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    order = Training(1, "c", 1, 1, ("p1",), digest(weights(0)))
    payload = sealed(order)
    peer.handle(Inbound(TOPICS.of(order), payload, False), clock.now)
    peer.handle(Inbound(TOPICS.of(order), payload, False), clock.now)  # a QoS 1 duplicate, or a replay
    assert len(runner.jobs) == 1 and lines.having("ignored a copy of c's message")
    # A capture of c's from 600 s ago, which this peer never saw (an older number of c's life than the latest it has):
    # a replay, refused; c's clock is not suspected, and c still leads.
    live = STAMPERS["c"]
    captured = Stamper(live.incarnation, lambda: time.time() - 600)
    captured.seq = live.seq  # the next number, which this peer will never see but in the replay
    live.seq += 2  # (c has sent on meanwhile)
    deliver(peer, Heartbeat(1, "c", 0, "training", FP), clock.now)
    deliver(peer, Training(1, "c", 1, 2, ("p1",), digest(weights(0))), clock.now, stamper=captured)
    assert len(runner.jobs) == 1 and lines.having("s ago by its clock: a replay")
    assert peer.skewed == set() and peer.election.controller == "c" and peer.election.role.value == "follower"


def test_of_two_processes_with_one_peer_id_the_later_one_exits_with_a_clear_error(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    earlier = fresh_stamper(incarnation=peer.stamper.incarnation - 1000)
    later = fresh_stamper(incarnation=peer.stamper.incarnation + 1000)
    deliver(peer, Init("p1", 0, 0, 4242, 10, 10, False, FP), clock.now, stamper=later)
    assert peer.exit_code is None and lines.having("started later and will exit")
    assert transport.messages(Init)[-1].pid != 4242  # it answered: "I was here first"
    deliver(peer, Init("p1", 0, 0, 4141, 10, 10, False, FP), clock.now, stamper=earlier)
    assert peer.exit_code == 5 and lines.having("already runs as peer p1; this one exits")


def test_its_own_echo_never_looks_like_a_second_process(tmp_path):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    peer.handle(__import__("peer.node.transport", fromlist=["Connected"]).Connected("b:1883"), clock.now)
    pump(peer, clock.now)  # its init comes back from the broker
    assert peer.exit_code is None


# --- fuzz: random sequences of real and forged messages -----------------------------------------------------------------


SECRET = b"the-federation-secret-0123"
REAL_SCRIPT = [
    Heartbeat(1, "c", 0, "evaluating", FP),
    Aggregation(1, "c", 0, (), weights(0)),
    Training(1, "c", 1, 1, ("p1",), digest(weights(0))),
    Aggregation(1, "c", 1, ("p1",), weights(1)),
    Metrics(1, "c", 1, 0.5, 1.0, 10, ("p1",), 1.0, 10, 5.0),
    Training(1, "c", 2, 1, ("p1",), digest(weights(1))),
    Aggregation(1, "c", 2, ("p1",), weights(2)),
]
FORGERIES = st.sampled_from(["unsigned", "other-secret", "moved", "replay", "stale", "impostor"])


def forged_payload(kind: str, message, real_payloads: list[tuple[str, bytes]], stamper: Stamper):
    ours = Seal(SECRET)
    if kind == "replay" and real_payloads:
        return real_payloads[-1]
    if kind == "moved" and real_payloads:  # a real payload on another sender's topic
        topic, payload = real_payloads[-1]
        return topic.rsplit("/", 1)[0] + "/p2", payload
    forged = {
        "stale": Training(0, "c", 9, 1, ("p1",), digest(weights(9))),
        "impostor": Aggregation(1, "c", 9, (), weights(9)),
    }.get(kind, Finish(1, "c", 9, "max-rounds", 1.0))
    topic = TOPICS.of(forged)
    seal = {"unsigned": OPEN, "other-secret": Seal(b"x" * 32), "stale": ours}.get(kind, Seal(b"y" * 32))
    return topic, seal.seal(topic, encode(forged), stamper.next())


@hsettings(max_examples=60, deadline=None)
@given(forgeries=st.lists(st.tuples(st.integers(0, len(REAL_SCRIPT)), FORGERIES), max_size=12))
def test_fuzz_forged_messages_among_real_ones_change_nothing(tmp_path_factory, forgeries):
    def run(with_forgeries: bool):
        peer, transport, runner, _ = make_peer(tmp_path_factory.mktemp("fuzz"), secret=SECRET, max_rounds=5)
        clock, real, attacker = Clock(peer), fresh_stamper(), fresh_stamper()
        seen: list[tuple[str, bytes]] = []
        deliver(peer, Presence("c", "online"), clock.now, seal=Seal(SECRET), stamper=real)
        listen(peer, clock)
        for index, message in enumerate([*REAL_SCRIPT, None]):
            for at, kind in forgeries if with_forgeries else ():
                if at == index:
                    topic, payload = forged_payload(kind, message, seen, attacker)
                    peer.handle(Inbound(topic, payload, False), clock.now)
                    pump(peer, clock.now)
            if message is not None:
                topic = TOPICS.of(message)
                payload = Seal(SECRET).seal(topic, encode(message), real.next())
                seen.append((topic, payload))
                peer.handle(Inbound(topic, payload, False), clock.now)
                pump(peer, clock.now)
        latest = peer.store.latest
        return (
            [(j.kind, j.term, j.round, j.attempt) for j in runner.jobs],
            peer.exit_code,
            (latest.round, latest.term),
            sorted(peer.store.finished),
            peer.election.term,
        )

    assert run(True) == run(False)


# --- fewest bytes: weightless orders, models fetched when missing, chunks, other models ---------------------------------


def test_an_order_for_a_model_this_peer_lacks_fetches_the_retained_one_then_trains(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)  # it holds round 0 = weights(0)
    deliver(peer, Training(1, "c", 2, 1, ("p1",), digest(weights(1))), clock.now)  # trains from round 1: missing
    assert runner.jobs == [] and transport.fetches == [TOPICS.aggregations()]
    deliver(peer, Training(1, "c", 2, 1, ("p1",), digest(weights(1))), clock.now)  # the order again: no new fetch
    assert transport.fetches == [TOPICS.aggregations()]
    deliver(peer, Aggregation(1, "c", 1, ("p2",), weights(1)), clock.now, retained=True)  # the broker sends it
    [fit] = runner.jobs
    assert (fit.kind, fit.round) == ("fit", 2) and np.array_equal(fit.weights[0], weights(1)[0])
    assert lines.having("lacks the model the order names")


def test_the_controller_alone_subscribes_to_solutions_and_evaluations(tmp_path):
    peer, transport, _, _ = make_peer(tmp_path, me="c")
    clock = Clock(peer)
    answers = {topic for topic, _ in TOPICS.subscriptions(controller=True)}
    assert not answers & set(transport.subscriptions)
    deliver(peer, Presence("p1", "online"), clock.now)
    run_until(peer, clock, lambda: transport.messages(Vote))
    deliver(peer, Vote(1, "p1", 0.0, 0, "start"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    assert answers <= set(transport.subscriptions)
    deliver(peer, Vote(2, "p1", 0.5, 0, "controller-silent"), clock.now)  # the only other calls a new term: it joins
    assert peer.controller is None and not answers & set(transport.subscriptions)


def big_weights(value: float):
    return [np.full((300, 300), value, np.float32), np.full(7, value, np.float32)]  # 360 KB


def big_receiver(tmp_path, **settings):
    peer, transport, runner, learner = make_peer(tmp_path / "receiver", **settings)
    peer.follower.shapes = tuple(w.shape for w in big_weights(0))  # its model is the big one
    return peer, transport, runner, learner


def chunked(tmp_path, message, retain=True, **settings):
    """What the sender of `message` publishes for it with a 64 KiB broker limit: (topic, payload) per chunk."""
    sender, transport, _, _ = make_peer(tmp_path / "sender", me=message.sender, max_message_bytes=65536, **settings)
    sender.send(message, retain=retain)
    return [(topic, payload) for topic, payload, _ in transport.published]


def test_a_model_larger_than_a_broker_message_travels_in_chunks_in_any_order(tmp_path, lines):
    model = Aggregation(1, "c", 1, ("p2",), big_weights(0.5))
    pieces = chunked(tmp_path, model)
    assert len(pieces) == 6 and [t for t, _ in pieces] == [f"sd/default/aggregation/c/{i}" for i in range(6)]
    assert all(len(payload) <= 65536 for _, payload in pieces)
    peer, transport, runner, _ = big_receiver(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    for topic, payload in [*reversed(pieces[1:]), pieces[0], pieces[2]]:  # retained: any order, and a duplicate
        peer.handle(Inbound(topic, payload, True), clock.now)
    pump(peer, clock.now)
    assert peer.store.latest.round == 1 and np.array_equal(peer.store.latest.weights[0], big_weights(0.5)[0])
    assert peer.inbox.reassembler.buffered_bytes == 0


def test_a_corrupted_or_lost_chunk_is_logged_and_never_adopted(tmp_path, lines):
    pieces = chunked(tmp_path, Aggregation(1, "c", 1, ("p2",), big_weights(0.5)))
    peer, transport, runner, _ = big_receiver(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    topic, payload = pieces[3]
    damaged = bytearray(payload)
    damaged[-5] ^= 0xFF  # a data byte (open mode: no MAC, the digest catches it)
    for t, p in [*pieces[:3], (topic, bytes(damaged)), *pieces[4:]]:
        peer.handle(Inbound(t, p, False), clock.now)
    pump(peer, clock.now)
    assert peer.store.latest.round == 0 and lines.having("digest")
    again = chunked(tmp_path / "again", Aggregation(1, "c", 1, ("p2",), big_weights(0.5)))
    for t, p in again[:-1]:  # the same model sent again, its last chunk lost
        peer.handle(Inbound(t, p, False), clock.now)
    pump(peer, clock.now)
    run_until(peer, clock, lambda: lines.having("missing"), seconds=CHUNK_TIMEOUT_S + 5, step=1.0)
    assert peer.store.latest.round == 0 and peer.inbox.reassembler.buffered_bytes == 0 and peer.exit_code is None


def test_with_a_secret_every_chunk_is_signed_and_a_forged_one_refused(tmp_path, lines):
    secret = b"federation-secret-0123456789"
    pieces = chunked(tmp_path, Aggregation(1, "c", 1, ("p2",), big_weights(0.5)), secret=secret)
    peer, transport, runner, _ = big_receiver(tmp_path, secret=secret)
    clock = Clock(peer)
    deliver(peer, Presence("c", "online"), clock.now, seal=Seal(secret))
    listen(peer, clock)
    deliver(peer, Heartbeat(1, "c", 0, "evaluating", FP), clock.now, seal=Seal(secret))
    topic, payload = pieces[2]
    peer.handle(Inbound(topic, payload[:-40] + bytes(8) + payload[-32:], False), clock.now)  # forged data
    peer.handle(Inbound(pieces[1][0], pieces[2][1], False), clock.now)  # chunk 2 moved to chunk 1's topic
    assert lines.having("bad signature")
    for t, p in pieces:
        peer.handle(Inbound(t, p, False), clock.now)
    pump(peer, clock.now)
    assert peer.store.latest.round == 1


def test_a_peer_of_another_model_is_not_counted_and_a_run_of_another_model_sends_this_peer_away(tmp_path, lines):
    peer, transport, _, _ = make_peer(tmp_path, min_peers=3)
    clock = Clock(peer)
    deliver(peer, Presence("p2", "online"), clock.now)
    deliver(peer, Init("p2", 0, 0, 5, 10, 10, False, "f" * 16), clock.now)
    assert "p2" in peer.misfits and "p2" not in peer.election.live
    assert len(lines.having("p2 runs another model")) == 1
    deliver(peer, Init("p2", 0, 0, 5, 10, 10, False, "f" * 16), clock.now)  # said once
    assert len(lines.having("p2 runs another model")) == 1
    # A heartbeat naming that model is nobody's word but its sender's: ignored, until the run is known to be theirs.
    deliver(peer, Heartbeat(1, "c", 0, "training", "f" * 16), clock.now)
    assert peer.exit_code is None
    # c announces the same other model, in term 1, and so does p2 (answering): this peer is the odd one out. Both
    # stand in term 1, it catches up, follows c, and c's heartbeat tells it the run is not for its model.
    deliver(peer, Init("c", 1, 0, 6, 10, 10, False, "f" * 16), clock.now)
    deliver(peer, Init("p2", 1, 0, 5, 10, 10, True, "f" * 16), clock.now)
    listen(peer, clock)
    deliver(peer, Heartbeat(1, "c", 0, "training", "f" * 16), clock.now)
    assert peer.exit_code == 3
    [(level, text)] = lines.having("is not this peer's")
    assert level == "ERROR" and "--model" in text


# --- a lying member (issue 19): what the node does with it -------------------------------------------------------------


def test_the_client_id_cannot_be_derived_from_anything_on_the_wire(tmp_path):
    # At 672ce7a it was the peer id and the incarnation's low 24 bits, which every envelope's head carries in clear:
    # an outsider computed the controller's id and took its session over, every 2 s.
    from peer.node.loop import client_id

    peer = Peer(Settings(peer_id="p1", run_dir=tmp_path), FakeLearner(), runner=FakeRunner())
    mine = peer.transport.client._client_id.decode()
    incarnation = peer.stamper.incarnation
    for derived in (f"{incarnation & 0xFFFFFF:06x}", f"{incarnation:x}", f"{incarnation & 0xFFFFFFFF:08x}"):
        assert derived not in mine
    assert mine.startswith("p1-") and len(mine) == len("p1-") + 16
    assert len({client_id("p1") for _ in range(50)}) == 50  # drawn for each connection, never computed


def test_a_peer_whose_clock_is_off_is_told_so_once_and_not_counted(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path, min_peers=3)
    clock = Clock(peer)
    ahead = fresh_stamper(clock=lambda: time.time() + 300)  # a peer whose clock is 300 s ahead
    deliver(peer, Presence("p9", "online"), clock.now, stamper=ahead)  # (presence is exempt: its will is old)
    assert "p9" in peer.election.live
    deliver(peer, Init("p9", 0, 0, 7, 10, 10, False, FP), clock.now, stamper=ahead)
    assert "p9" not in peer.election.live and peer.skewed == {"p9"}
    [(level, text)] = lines.having("p9's clock is")
    assert level == "WARNING" and "300s ahead of this peer's" in text and "not counted" in text
    deliver(peer, Presence("p9", "online"), clock.now, stamper=ahead)  # it is still not counted
    deliver(peer, Vote(1, "p9", 0.9, 0, "start"), clock.now, stamper=ahead)
    assert "p9" not in peer.election.live and len(lines.having("p9's clock is")) == 1
    # Its clock fixed (a new life, in time): it counts again.
    deliver(peer, Init("p9", 0, 0, 8, 10, 10, False, FP), clock.now)
    assert "p9" in peer.election.live and peer.skewed == set()


def test_a_peer_whose_own_clock_is_off_hears_it_from_every_peer_and_never_elects_itself(tmp_path, lines):
    # At 672ce7a presence counted it live; it refused everyone, elected itself, and elections.csv showed two
    # controllers for term 1.
    peer, transport, runner, _ = make_peer(tmp_path, min_peers=3)
    clock = Clock(peer)
    behind = {p: fresh_stamper(clock=lambda: time.time() - 300) for p in ("p2", "p3")}  # (ours is 300 s ahead)
    for p, stamper in behind.items():
        deliver(peer, Presence(p, "online"), clock.now, stamper=stamper)
        deliver(peer, Init(p, 0, 0, 7, 10, 10, False, FP), clock.now, stamper=stamper)
    for _ in range(16):  # 8 s: past its join grace, time enough to elect itself if it thought it could
        pump(peer, clock.advance(0.5))
    assert peer.election.live == {"p1"} and peer.election.role.value == "waiting" and peer.controller is None
    assert len(lines.having("clock is 300s behind this peer's")) == 2
    [(level, text)] = lines.having("this peer's clock is about 300s ahead of the others'")
    assert level == "ERROR" and "2 of the 2 peers it hears" in text and "NTP" in text
    assert not (tmp_path / "elections.csv").exists()


def test_a_freshly_restarted_peer_does_not_evaluate_a_replayed_older_model(tmp_path, lines):
    # At 672ce7a it took a 10 s old replay of an aggregation (its replay guard knows no numbers yet) and evaluated an
    # old round again.
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    stamper = STAMPERS.setdefault("c", fresh_stamper())
    old_round = sealed(
        Aggregation(1, "c", 1, ("p2",), weights(1)), stamper=Stamper(stamper.incarnation, lambda: time.time() - 10)
    )
    follow(peer, clock)
    deliver(peer, Aggregation(1, "c", 2, ("p2",), weights(2)), clock.now, retained=True)  # the model it starts from
    peer.handle(Inbound(TOPICS.of(Aggregation(1, "c", 1, (), [])), old_round, False), clock.now)  # the replay
    pump(peer, clock.now)
    assert runner.jobs == [] and peer.store.latest.round == 2 and lines.having("a late copy, or a replay")


def test_a_forged_finish_in_the_controller_s_name_is_noticed_refused_and_a_believed_one_ends_the_run(tmp_path, lines):
    # At 672ce7a (local mode, no logins) the controller did not notice, waited --wait-timeout and exited 4.
    peer, transport, runner, _ = make_peer(tmp_path, me="c", max_rounds=5)
    clock = Clock(peer)
    deliver(peer, Presence("p1", "online"), clock.now)
    run_until(peer, clock, lambda: transport.messages(Vote))
    deliver(peer, Vote(1, "p1", 0.0, 0, "start"), clock.now)
    run_until(peer, clock, lambda: peer.controller is not None)
    forger = fresh_stamper()  # another process, signing with the federation secret, in c's name
    deliver(peer, Finish(1, "c", 1, "max-rounds", 0.99), clock.now, stamper=forger)
    [(level, text)] = lines.having("a finish in this peer's name that it did not send")
    assert level == "ERROR" and "per-peer broker logins" in text and peer.exit_code is None
    deliver(peer, Finish(1, "c", 1, "no-solutions", 0.1), clock.now, stamper=forger)
    assert peer.exit_code == 4 and transport.messages(Finish)[-1].reason == "forged-finish"


def test_a_flood_of_evicted_chunks_is_logged_once_per_quiet_period(tmp_path, lines):
    from tests.wire.test_chunks import opener

    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    follow(peer, clock)
    topic = TOPICS.chunk(TOPICS.topic("aggregation", "c"), 0)
    stamper = STAMPERS["c"]
    for message_id in range(1, 30):  # the controller's own topic, a new 1 GiB message each time
        payload = OPEN.seal(topic, opener(message_id, data=65536), stamper.next())
        peer.handle(Inbound(topic, payload, False), clock.now)
    evictions = lines.having("evicted with")
    assert len(evictions) == 1 and peer.inbox.reassembler.held_bytes == 2 * 65536


def test_a_retained_presence_counts_only_until_the_peer_fails_to_answer(tmp_path, lines):
    peer, transport, runner, _ = make_peer(tmp_path, min_peers=5)
    clock = Clock(peer)
    peer.handle(__import__("peer.node.transport", fromlist=["Connected"]).Connected("b:1883"), clock.now)
    for p in ("p2", "p3"):
        deliver(peer, Presence(p, "online"), clock.now, retained=True)
    deliver(peer, Init("p2", 0, 0, 7, 10, 10, True, FP), clock.now)  # p2 answers; p3 (its clock off, say) never
    run_until(peer, clock, lambda: "p3" not in peer.election.live, seconds=4 * peer.settings.heartbeat * 3)
    assert "p2" in peer.election.live


def test_a_model_heard_before_following_its_controller_is_taken_when_it_follows(tmp_path, lines):
    """A newcomer in its join grace hears the controller's heartbeat and then its live model of round 3 (it follows
    nobody yet: the model is refused); when its grace is over it follows that controller, and takes the model it
    heard, instead of waiting for a copy the broker kept (which its replay guard would refuse as a copy)."""
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    deliver(peer, Presence("c", "online"), clock.now)
    deliver(peer, Heartbeat(1, "c", 3, "evaluating", FP), clock.now)
    deliver(peer, Aggregation(1, "c", 3, ("p2",), weights(3)), clock.now)
    assert peer.store.latest is None and peer.election.controller is None  # still listening
    listen(peer, clock)
    deliver(peer, Heartbeat(1, "c", 3, "evaluating", FP), clock.now)
    assert (peer.election.term, peer.election.controller) == (1, "c")
    assert peer.store.latest is not None and peer.store.latest.round == 3
    assert runner.jobs[-1].kind == "evaluate" and runner.jobs[-1].round == 3
    assert lines.having("round 3: taking the model c sent before this peer followed it")


def test_a_model_of_another_controller_heard_before_following_is_not_taken(tmp_path, lines):
    """The model kept is taken only from the controller this peer then follows, in that term."""
    peer, transport, runner, _ = make_peer(tmp_path)
    clock = Clock(peer)
    deliver(peer, Presence("c", "online"), clock.now)
    deliver(peer, Aggregation(1, "x", 3, ("p2",), weights(9)), clock.now)  # a member acting as a controller
    listen(peer, clock)
    deliver(peer, Claim(1, "c", 0.9, 0, "start", ("c", "p1")), clock.now)  # the term's first claim: c leads
    assert (peer.election.term, peer.election.controller) == (1, "c")
    assert peer.store.latest is None and not lines.having("taking the model")
