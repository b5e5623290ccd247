"""The controller as a pure machine: inputs and the time go in, actions come out. No broker, no TensorFlow, no files.

Covers every action of a round in order, quorum and retry, the deadline, the resume rules after a failover, waiting
with too few peers, the finish, and, as a property, that no solution of another term, round or attempt (or from a
peer not chosen) is ever averaged into the global model."""

from __future__ import annotations

import random

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.learning.aggregation import Aggregator
from peer.roles.actions import (
    AdoptModel,
    Exit,
    FinishRound,
    Log,
    Print,
    Publish,
    RecordElection,
    RecordRound,
    RecordRun,
    SaveModel,
)
from peer.roles.controller import FINISH_EXPIRY_S, Controller, Phase, RoundRules
from peer.roles.rounds import GlobalModel, ModelStore, RoundSummary
from peer.wire.envelope import ENVELOPE_OVERHEAD_OPEN, Seal, Stamper
from peer.wire.messages import Aggregation, Evaluation, Finish, Heartbeat, Metrics, Solution, Training, encode
from peer.wire.session import Outbox
from peer.wire.topics import Topics

PEERS = {"c", "p1", "p2", "p3", "p4"}
WALL = 1_000_000.0  # wall clock = now + WALL
WIRE = Outbox(Topics(), Seal(None), Stamper(1, lambda: WALL))  # what a message costs on the wire, unsealed


def weights(value: float):
    return [np.full((2, 2), value, np.float32), np.full(3, value, np.float32)]


class Run:
    """A controller and everything it has decided so far (each input's actions appended, in order)."""

    def __init__(self, memory=None, live=None, term=1, announced=None, **overrides):
        options = dict(trainers=3, min_solutions=2, max_rounds=3, target_accuracy=0.99, round_deadline=10.0)
        options.update(overrides)
        memory = memory or ModelStore()
        self.c = Controller(
            "c",
            RoundRules(**options),
            term=term,
            wire_cost=WIRE.cost,
            reason="start",
            members=tuple(sorted(live or PEERS)),
            live=set(live or PEERS),
            memory=memory,
            rng=random.Random(0),
            wall_offset=WALL,
            initial_weights=weights(0) if memory.latest is None else None,
            announced=announced,
        )
        self.actions: list = []

    def __getattr__(self, name):
        method = getattr(self.c, name)

        def call(*args, **kwargs):
            out = method(*args, **kwargs)
            self.actions += out
            return out

        return call

    def sent(self, kind):
        return [a.message for a in self.actions if isinstance(a, Publish) and isinstance(a.message, kind)]

    def of(self, kind):
        return [a for a in self.actions if isinstance(a, kind)]

    def logs(self, text):
        return [a for a in self.of(Log) if text in a.text]

    def evaluate_all(self, round_, now, accuracy=0.5):
        for peer in sorted(self.c.evaluations.expected):
            self.on_message(Evaluation(self.c.term, round_, peer, accuracy, 1.0, 100), 50, now)


def test_a_fresh_controller_publishes_round_0_then_runs_rounds_to_the_limit():
    r = Run()
    r.take_office(now=0)
    [election] = r.of(RecordElection)
    assert (election.term, election.controller, election.reason) == (1, "c", "start")
    [agg0] = r.sent(Aggregation)
    assert agg0.round == 0 and r.c.phase is Phase.EVALUATING
    assert r.of(AdoptModel)[0].model.round == 0  # the node's store learns the initial model
    r.evaluate_all(0, 1)
    for round_ in (1, 2, 3):
        training = r.sent(Training)[-1]
        assert training.round == round_ and "c" not in training.trainers and len(training.trainers) == 3
        for i, peer in enumerate(training.trainers):
            r.on_message(Solution(1, round_, 1, peer, 10 * (i + 1), 0.1, weights(i + 1)), 500, 2)
        assert r.sent(Aggregation)[-1].round == round_
        r.evaluate_all(round_, 3, accuracy=0.5 + round_ / 10)
    [finish] = r.sent(Finish)
    assert finish.reason == "max-rounds" and finish.round == 3 and r.c.finished
    assert [row.row["round"] for row in r.of(RecordRound)] == [1, 2, 3]
    # (1*10 + 2*20 + 3*30) / 60 = 2.333...: FedAvg weighted by samples
    assert np.allclose(r.sent(Aggregation)[1].weights[0], 140 / 60)
    assert [m.round for m in r.sent(Metrics)] == [0, 1, 2, 3]
    assert [f.summary.round for f in r.of(FinishRound)] == [0, 1, 2, 3]


def test_every_action_of_a_round_in_order():
    r = Run()
    r.take_office(0)
    r.evaluate_all(0, 1)
    training = r.sent(Training)[-1]
    for peer in training.trainers[:2]:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 500, 2)
    closing = r.on_message(Solution(1, 1, 1, training.trainers[2], 10, 0.1, weights(1.5)), 500, 3)
    kinds = [type(a).__name__ if not isinstance(a, Publish) else type(a.message).__name__ for a in closing]
    # solution noted, model adopted, FedAvg, a heartbeat saying the model is coming (Election.expect_model), publish
    assert kinds == ["Log", "AdoptModel", "Log", "Heartbeat", "Aggregation"]
    heartbeat = closing[3].message
    assert (heartbeat.round, heartbeat.phase) == (1, "evaluating")
    agg = closing[4]
    assert agg.retain and np.allclose(agg.message.weights[0], 3.5 / 3)
    assert closing[1].model == GlobalModel(1, 1, agg.message.weights, tuple(sorted(training.trainers)), "c")
    evaluations = sorted(r.c.evaluations.expected)
    for peer in evaluations[:-1]:
        assert r.on_message(Evaluation(1, 1, peer, 0.6, 1.0, 100), 50, 4) == []
    closing = r.on_message(Evaluation(1, 1, evaluations[-1], 0.6, 1.0, 100), 50, 5)
    kinds = [type(a).__name__ if not isinstance(a, Publish) else type(a.message).__name__ for a in closing]
    # The row is recorded before the metrics go out: killed between the two, the round is evaluated again.
    assert kinds == ["RecordRound", "Metrics", "FinishRound", "SaveCheckpoint", "Log", "Training", "Log"]
    checkpoint = closing[3]
    assert checkpoint.model.round == 1 and [s.round for s in checkpoint.rounds] == [0, 1]
    row = closing[0].row
    assert row["round"] == 1 and row["trainers"] == tuple(sorted(training.trainers))
    assert row["started_at"] == WALL + 1 and row["finished_at"] == WALL + 5 and row["duration_s"] == 4
    # bytes: the order, three solutions, the aggregation and four evaluations (each of ours in its envelope)
    assert row["bytes_sent"] == (
        len(encode(training)) + 3 * 500 + len(encode(agg.message)) + 4 * 50 + 2 * ENVELOPE_OVERHEAD_OPEN
    )
    assert closing[1].message.run_started == WALL


def test_target_accuracy_stops_early_with_every_finishing_action():
    r = Run(target_accuracy=0.6, max_rounds=10)
    r.take_office(0)
    r.evaluate_all(0, 0, accuracy=0.7)  # round 0 never stops the run, whatever its accuracy
    training = r.sent(Training)[-1]
    for peer in training.trainers:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 1, 1)
    r.evaluate_all(1, 2, accuracy=0.65)
    assert r.sent(Finish)[0].reason == "target-accuracy"
    tail = r.actions[-6:]
    assert [type(a) for a in tail] == [SaveModel, RecordRun, Publish, Log, Print, Exit]
    assert tail[2].retain and tail[2].expiry == FINISH_EXPIRY_S and tail[5].code == 0
    outcome = tail[1].summary["outcome"]
    assert outcome["initial_accuracy"] == 0.7 and outcome["final_accuracy"] == 0.65 and outcome["rounds"] == 1
    assert "run summary" in tail[4].text and "target-accuracy" in tail[4].text
    assert r.tick(100) == []  # a finished controller is silent


def test_the_deadline_closes_with_a_quorum_or_repeats_the_round_with_new_trainers():
    r = Run(round_deadline=5.0)
    r.take_office(0)
    r.evaluate_all(0, 0)
    first = r.sent(Training)[-1]
    r.on_message(Solution(1, 1, 1, first.trainers[0], 10, 0.1, weights(1)), 1, 1)
    r.tick(5.5)  # 1 of 3 < quorum 2: repeat
    retry = r.sent(Training)[-1]
    assert (retry.round, retry.attempt) == (1, 2)
    assert r.logs("choosing trainers again")[0].level == "warning"
    late = Solution(1, 1, 1, first.trainers[1], 10, 0.1, weights(9))  # attempt 1: stale now
    r.on_message(late, 1, 6)
    assert r.logs(f"ignored a solution from {first.trainers[1]}: it is for term 1 round 1 attempt 1")
    for peer in retry.trainers[:2]:
        r.on_message(Solution(1, 1, 2, peer, 10, 0.1, weights(2)), 1, 7)
    r.tick(11.0)  # deadline of attempt 2 with 2 of 3: close
    agg = r.sent(Aggregation)[-1]
    assert agg.round == 1 and np.allclose(agg.weights[0], 2) and len(agg.trainers) == 2
    assert r.logs("closed without")


def test_a_solution_whose_tensors_do_not_fit_the_model_is_refused_not_fatal():
    r = Run()
    r.take_office(0)
    r.evaluate_all(0, 0)
    training = r.sent(Training)[-1]
    r.on_message(Solution(1, 1, 1, training.trainers[0], 10, 0.1, [np.zeros((3, 3), np.float32)]), 1, 1)
    assert r.c.solutions.received == {} and r.logs("global model's shapes")
    for peer in training.trainers:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 1, 2)
    assert r.sent(Aggregation)[-1].round == 1


def test_a_lost_trainer_closes_the_round_without_waiting_for_the_deadline():
    r = Run()
    r.take_office(0)
    r.evaluate_all(0, 0)
    training = r.sent(Training)[-1]
    for peer in training.trainers[:2]:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 1, 1)
    r.peer_down(training.trainers[2], 1.5)
    assert r.sent(Aggregation)[-1].round == 1
    assert training.trainers[2] not in r.c.live


def test_a_new_controller_evaluates_a_round_whose_metrics_were_lost_then_trains_the_next():
    store = ModelStore()
    store.offer(0, 1, weights(0))
    store.finish_round(RoundSummary(0, 1, 0.1, 2.3, 0), run_started=1.0)
    store.offer(1, 1, weights(1), ("p1", "p2"))  # aggregated by the dead controller, no metrics seen
    r = Run(memory=store, term=2)
    r.take_office(0)
    [agg] = r.sent(Aggregation)
    assert agg.round == 1 and agg.term == 2 and r.sent(Training) == []
    r.evaluate_all(1, 1)
    assert r.sent(Metrics)[-1].round == 1 and r.sent(Training)[-1].round == 2
    [row] = r.of(RecordRound)
    assert row.row["trainers"] == ("p1", "p2") and row.row["duration_s"] == 0 and row.row["started_at"] is None
    assert r.sent(Metrics)[-1].run_started == 1.0  # the run's start is the first controller's
    assert store.latest.round == 1 and 1 not in store.finished  # the machine never writes the peer's store


def test_a_new_controller_after_finished_metrics_trains_the_next_round_at_once():
    store = ModelStore()
    store.offer(2, 1, weights(2))
    store.finish_round(RoundSummary(2, 1, 0.5, 1.0, 10), run_started=1.0)
    r = Run(memory=store)
    r.take_office(0)
    assert r.sent(Aggregation) == [] and r.sent(Training)[-1].round == 3
    assert r.logs("resuming after round 2")


def test_a_new_controller_finishes_a_run_whose_last_round_was_already_done():
    store = ModelStore()
    store.offer(3, 1, weights(3))
    store.finish_round(RoundSummary(3, 1, 0.5, 1.0, 10), run_started=1.0)
    r = Run(memory=store)
    r.take_office(0)
    assert r.sent(Finish)[0].round == 3 and r.sent(Training) == [] and r.of(Exit)


def test_too_few_peers_waits_once_and_resumes_when_one_returns():
    r = Run(live={"c", "p1"})
    r.take_office(0)
    r.evaluate_all(0, 0)
    r.peer_down("p1", 1)  # the only trainer is gone: repeat, but nobody is left
    for now in range(2, 30):
        r.tick(now)
    assert r.c.phase is Phase.WAITING_PEERS and len(r.sent(Training)) == 1  # no order to nobody, no spinning
    assert len(r.logs("too few peers")) == 1
    r.peer_up("p2", 31)
    assert r.sent(Training)[-1].trainers == ("p2",)
    assert r.logs("p2 joined")


def test_a_newcomer_gets_a_heartbeat_at_once_and_heartbeats_go_out_every_interval():
    r = Run(heartbeat=1.0)
    r.take_office(0)
    for now in (0.0, 0.5, 1.0, 1.2, 2.1):
        r.tick(now)
    assert len(r.sent(Heartbeat)) == 3
    assert all(h.phase == "evaluating" for h in r.sent(Heartbeat))
    r.peer_up("p9", 2.2)
    r.tick(2.2)
    assert len(r.sent(Heartbeat)) == 4


def test_a_controller_without_a_model_or_initial_weights_is_a_programming_error():
    try:
        Controller("c", RoundRules(), 1, "start", ("c",), {"c"}, ModelStore(), random.Random(0))
    except ValueError as err:
        assert "initial weights" in str(err)
    else:
        raise AssertionError("expected ValueError")


solution_events = st.lists(
    st.tuples(
        st.sampled_from([0, 1, 2]),  # term (1 is the controller's)
        st.sampled_from([0, 1, 2]),  # round (1 is current)
        st.sampled_from([1, 2]),  # attempt (1 is current)
        st.sampled_from(sorted(PEERS - {"c"}) + ["intruder"]),
        st.integers(1, 50),  # samples
        st.floats(-5, 5, allow_nan=False, width=32),
    ),
    max_size=25,
)


@settings(max_examples=200, deadline=None)
@given(events=solution_events)
def test_property_only_current_solutions_of_chosen_trainers_are_ever_averaged(events):
    r = Run()
    r.take_office(0)
    r.evaluate_all(0, 0)
    chosen = r.sent(Training)[-1].trainers
    accepted = {}
    for term, round_, attempt, peer, samples, value in events:
        r.on_message(Solution(term, round_, attempt, peer, samples, 0.1, weights(value)), 1, 1)
        if (term, round_, attempt) == (1, 1, 1) and peer in chosen and peer not in accepted and len(accepted) < 3:
            accepted[peer] = (weights(value), samples)
    aggregations = [m for m in r.sent(Aggregation) if m.round == 1]
    if len(accepted) == len(chosen):
        [agg] = aggregations
        # What the aggregation makes of exactly those solutions (it clips a step far larger than the others': FedAvg
        # of the raw weights was expected here once, and failed whenever the values differed widely).
        contributions = [(p, *accepted[p]) for p in sorted(accepted)]
        expected = Aggregator("fedavg").aggregate(weights(0), contributions).weights
        assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(agg.weights, expected))
        assert set(agg.trainers) == set(accepted)
    else:
        assert aggregations == []


# --- trust: what a lying, diverging or absent peer cannot do ---------------------------------------------------------

ANNOUNCED = {p: (500, 100) for p in PEERS}


def test_a_poisoned_solution_is_clipped_and_its_trainer_chosen_last():
    r = Run(announced=ANNOUNCED, max_rounds=5)
    r.take_office(0)
    r.evaluate_all(0, 0)
    training = r.sent(Training)[-1]
    liar = training.trainers[0]
    for peer in training.trainers:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1e30 if peer == liar else 0.1)), 1, 1)
    agg = r.sent(Aggregation)[-1]
    assert agg.round == 1 and all(np.isfinite(w).all() and np.abs(w).max() < 1 for w in agg.weights)
    assert liar in r.c.suspects and r.logs("clipped")
    r.evaluate_all(1, 2)
    assert liar not in r.sent(Training)[-1].trainers  # 4 candidates, 3 chosen: the suspect is left out


def test_a_refused_aggregate_repeats_the_round_with_other_trainers():
    r = Run(announced=ANNOUNCED, trainers=1, min_solutions=1)
    r.take_office(0)
    r.evaluate_all(0, 0)
    [first] = r.sent(Training)[-1].trainers
    r.on_message(Solution(1, 1, 1, first, 10, 0.1, weights(1e30)), 1, 1)  # alone: nothing to clip it against
    retry = r.sent(Training)[-1]
    assert (retry.round, retry.attempt) == (1, 2) and retry.trainers != (first,)
    assert r.logs("aggregation refused") and r.sent(Aggregation)[-1].round == 0
    r.on_message(Solution(1, 1, 2, retry.trainers[0], 10, 0.1, weights(0.2)), 1, 2)
    assert r.sent(Aggregation)[-1].round == 1


def test_declared_sample_counts_are_bounded_by_what_each_peer_announced():
    r = Run(announced={p: (10, 100) for p in PEERS})
    r.take_office(0)
    r.evaluate_all(0, 0)
    training = r.sent(Training)[-1]
    big, *rest = training.trainers
    r.on_message(Solution(1, 1, 1, big, 2**53 - 1, 0.1, weights(0.25)), 1, 1)
    for peer in rest:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(0.1)), 1, 1)
    assert np.allclose(r.sent(Aggregation)[-1].weights[0], 0.15)  # an equal third, not all of it
    # evaluations: a non-member is not heard; a member's weight is what it announced
    r.on_message(Evaluation(1, 1, "intruder", 1.0, 0.0, 2**53 - 1), 1, 2)
    for peer in sorted(r.c.evaluations.expected):
        r.on_message(Evaluation(1, 1, peer, 1.0 if peer == big else 0.0, 1.0, 2**53 - 1 if peer == big else 100), 1, 2)
    assert r.sent(Metrics)[-1].accuracy == 0.25  # 100 of 400 samples, not ~1.0


def test_a_model_nobody_evaluates_is_published_a_bounded_number_of_times_then_the_run_gives_up():
    r = Run(round_deadline=1.0)
    r.take_office(0)
    for now in range(1, 10):
        r.tick(now)
    assert len(r.sent(Aggregation)) == 4  # the first and MAX_REPUBLISH (3) more
    [finish] = r.sent(Finish)
    assert finish.reason == "no-evaluations" and r.actions[-1] == Exit(4) and r.c.finished
    assert r.logs("giving up the run")[0].level == "error"
    assert r.of(RecordRun)[0].summary["outcome"]["final_accuracy"] is None


def test_a_controller_waiting_for_peers_gives_up_after_the_wait_timeout():
    r = Run(live={"c", "p1"}, wait_timeout=30.0)
    r.take_office(0)
    r.evaluate_all(0, 0)
    r.peer_down("p1", 1)
    r.tick(30.0)
    assert not r.c.finished
    r.tick(31.5)
    assert r.sent(Finish)[0].reason == "too-few-peers" and r.actions[-1] == Exit(4)


def test_after_a_reconnect_the_current_order_goes_out_again():
    r = Run()
    r.take_office(0)
    assert [a.message.round for a in r.reconnected(1) if isinstance(a, Publish)] == [0]  # evaluating: the model
    r.evaluate_all(0, 1)
    order = r.sent(Training)[-1]
    again = [a.message for a in r.reconnected(2) if isinstance(a, Publish)]
    # the model again, retained (a restarted broker lost it, and a trainer lacking it fetches it), then the same
    # order: trainers answer it from their cache
    assert [type(m).__name__ for m in again] == ["Aggregation", "Training"] and again[1] == order
    assert again[0].round == 0 and again[1].digest == GlobalModel(0, 1, again[0].weights).digest


def test_a_waited_for_peer_that_comes_back_gets_the_order_again_at_most_once_a_heartbeat():
    r = Run(heartbeat=1.0)
    r.take_office(0)
    r.evaluate_all(0, 1)
    order = r.sent(Training)[-1]
    r.peer_up("p9", 1.5, samples=(10, 10), returned=True)  # a newcomer the round does not wait for: nothing
    r.peer_up(order.trainers[0], 1.55, samples=(10, 10))  # an answer to another's init: it did not come back
    r.tick(1.6)
    assert r.sent(Training) == [order]
    for peer in order.trainers:  # all of them come back (the broker restarted)
        r.peer_up(peer, 1.7, samples=(10, 10), returned=True)
    r.tick(1.8)
    assert r.sent(Training) == [order, order]  # once, not three times
    r.peer_up(order.trainers[0], 2.0, samples=(10, 10), returned=True)
    r.tick(2.1)
    assert len(r.sent(Training)) == 2  # not before a heartbeat has passed
    r.tick(2.9)
    assert len(r.sent(Training)) == 3 and r.logs("a peer it waits for is back")


def test_a_returning_evaluator_gets_no_model_published_to_everyone_again():
    r = Run(heartbeat=1.0)
    r.take_office(0)
    models = len(r.sent(Aggregation))
    for peer in sorted(PEERS - {"c"}):  # every evaluator comes back while the model waits for evaluations
        r.peer_up(peer, 0.5, samples=(10, 10), returned=True)
    r.tick(1.0)
    r.tick(2.0)
    assert len(r.sent(Aggregation)) == models  # they evaluate the retained model (Follower.on_retained_model)


def test_orders_carry_no_weights_once_the_controller_has_published_the_model_itself():
    r = Run()
    r.take_office(0)
    r.evaluate_all(0, 1)
    [order] = r.sent(Training)
    assert order.weights == [] and order.digest == r.c.model.digest == GlobalModel(0, 1, weights(0)).digest


def test_a_controller_resuming_from_another_controllers_model_sends_it_with_its_first_orders():
    # A failover after the metrics: the model is the old controller's, retained on the old controller's topic only,
    # and a trainer may no longer hold it (it moved on to an aggregation that was never finished).
    memory = ModelStore()
    memory.offer(2, 1, weights(2))
    memory.finish_round(RoundSummary(2, 1, 0.5, 1.0, 10), 5.0)
    r = Run(memory=memory, term=2, max_rounds=5)
    r.take_office(0)
    [order] = r.sent(Training)
    assert order.round == 3 and order.digest == GlobalModel(2, 1, weights(2)).digest
    assert np.array_equal(order.weights[0], weights(2)[0])
    for peer in order.trainers:
        r.on_message(Solution(2, 3, 1, peer, 10, 0.1, weights(3)), 500, 2)
    r.evaluate_all(3, 3)
    assert r.sent(Training)[-1].round == 4 and r.sent(Training)[-1].weights == []  # its own model now


def test_a_round_that_never_gets_its_solutions_gives_the_run_up_after_a_bounded_number_of_attempts():
    # e.g. the only trainer cannot get the model it is told to train: retrying forever would hang the run.
    from peer.roles.controller import MAX_ATTEMPTS

    r = Run(round_deadline=1.0, live={"c", "p1"})
    r.take_office(0)
    r.evaluate_all(0, 0.5)
    for now in range(1, 3 * MAX_ATTEMPTS):
        r.tick(now)
    assert len(r.sent(Training)) == MAX_ATTEMPTS
    [finish] = r.sent(Finish)
    assert finish.reason == "no-solutions" and r.actions[-1] == Exit(4) and r.c.finished


def test_named_evaluators_evaluate_each_round_and_every_peer_the_last_one():
    others = {f"p{i}" for i in range(1, 9)}
    r = Run(live=others | {"c"}, evaluators=3, max_rounds=2)
    r.take_office(now=0)
    [agg0] = r.sent(Aggregation)
    assert len(agg0.evaluators) == 3 and set(agg0.evaluators) <= others
    assert r.c.evaluations.expected == set(agg0.evaluators)  # it waits for the named ones only
    r.evaluate_all(0, 1)
    assert r.sent(Metrics)[-1].samples == 300  # the metric: theirs, sample-weighted
    for round_ in (1, 2):
        training = r.sent(Training)[-1]
        for peer in training.trainers:
            r.on_message(Solution(1, round_, 1, peer, 10, 0.1, weights(round_)), 500, 2)
        agg = r.sent(Aggregation)[-1]
        assert agg.round == round_
        assert (len(agg.evaluators) == 3) if round_ < 2 else (agg.evaluators == ())  # the last: every peer
        r.evaluate_all(round_, 3)
    assert r.c.finished and r.sent(Metrics)[-1].samples == 800
    # a peer not named sends an evaluation anyway: ignored, not counted
    r2 = Run(live=others | {"c"}, evaluators=3)
    r2.take_office(now=0)
    outsider = sorted(others - set(r2.c.evaluations.expected))[0]
    r2.on_message(Evaluation(1, 0, outsider, 1.0, 0.0, 100), 50, 1)
    assert outsider not in r2.c.evaluations.received


def test_a_sample_that_reaches_the_target_is_evaluated_by_everyone_before_the_finish():
    others = {f"p{i}" for i in range(1, 9)}
    r = Run(live=others | {"c"}, evaluators=3, max_rounds=5, target_accuracy=0.8)
    r.take_office(now=0)
    r.evaluate_all(0, 1, accuracy=0.1)
    for peer in r.sent(Training)[-1].trainers:
        r.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 500, 2)
    r.evaluate_all(1, 3, accuracy=0.9)  # the sample says: target reached
    again = r.sent(Aggregation)[-1]
    assert again.round == 1 and again.evaluators == () and not r.c.finished and r.of(RecordRound) == []
    r.evaluate_all(1, 4, accuracy=0.85)  # everyone agrees
    [row] = r.of(RecordRound)
    assert r.c.finished and row.row["accuracy"] == 0.85 and r.sent(Finish)[-1].accuracy == 0.85


# --- a lying member: counts nobody certifies alone, a stop nobody decides alone, no-shows --------------------------------


def solve(r, round_, now, samples=None, values=None, peers=None):
    """Every chosen trainer (or `peers`) sends its solution: weights(values[peer]) with samples[peer] samples."""
    for peer in peers if peers is not None else r.c.solutions.trainers:
        value = (values or {}).get(peer, float(round_))
        count = (samples or {}).get(peer, 500)
        r.on_message(Solution(r.c.term, round_, r.c.attempt, peer, count, 0.1, weights(value)), 50, now)


def test_declared_counts_are_capped_by_what_the_run_s_shards_hold():
    # Issue 19: an init announcing 10^12 samples made its evaluation (and solution) outweigh everyone's.
    announced = {p: (500, 100) for p in PEERS - {"c"}} | {"p4": (10**12, 10**12)}
    r = Run(announced=announced, count_bound=(500, 100), trainers=4, min_solutions=4, target_accuracy=0.9)
    r.take_office(now=0)
    assert r.logs("p4 announced 1000000000000 train and 1000000000000 test samples")
    for peer in ("p1", "p2", "p3"):
        r.on_message(Evaluation(1, 0, peer, 0.1, 1.0, 100), 50, 1)
    r.on_message(Evaluation(1, 0, "p4", 1.0, 0.0, 10**12), 50, 1)
    assert r.c.history[0].accuracy == (3 * 0.1 + 1.0) / 4  # one voice in four, not all of them
    # Its solution, with the same count, weighs as much as anyone's (FedAvg of 1, 1, 1 and 2: 1.25), not all (2).
    solve(r, 1, 2, samples={"p4": 10**12}, values={"p1": 1.0, "p2": 1.0, "p3": 1.0, "p4": 2.0})
    assert np.allclose(r.c.model.weights[0], 1.25)


def test_without_the_run_s_shard_sizes_a_count_is_bounded_by_the_others():
    # Shards from --data-dir: nobody can compute them, so no member declares more than twice the others' median.
    announced = {"p1": (400, 100), "p2": (500, 120), "p3": (600, 140), "p4": (10**12, 10**12)}
    r = Run(announced=announced, count_bound=None)
    assert r.c._cap("p4") == 1000 and r.c._cap("p4", test=True) == 240
    assert r.c._cap("p1") == 400  # an honest count stays as it is


def test_one_member_cannot_end_the_run_at_the_target_accuracy():
    # Issue 19: an init announcing 10^12 test samples, then evaluations of accuracy 1.0, stopped the run after round 1.
    announced = {p: (500, 100) for p in PEERS - {"c"}} | {"p4": (10**12, 10**12)}
    r = Run(announced=announced, count_bound=(500, 100), max_rounds=5, target_accuracy=0.55)
    r.take_office(now=0)
    r.evaluate_all(0, 1, accuracy=0.1)
    for round_ in (1, 2):
        solve(r, round_, 2 + round_)
        for peer in ("p1", "p2", "p3"):
            r.on_message(Evaluation(1, round_, peer, 0.45, 1.0, 100), 50, 3 + round_)
        r.on_message(Evaluation(1, round_, "p4", 1.0, 0.0, 10**12), 50, 3 + round_)
    assert r.of(Exit) == [] and not r.c.finished
    assert r.logs("round 1: the weighted accuracy") and r.logs("the median peer's (0.4500) does not")
    # When the honest peers themselves reach it, the run stops as asked.
    solve(r, 3, 10)
    for peer in ("p1", "p2", "p3"):
        r.on_message(Evaluation(1, 3, peer, 0.7, 1.0, 100), 50, 11)
    r.on_message(Evaluation(1, 3, "p4", 1.0, 0.0, 100), 50, 11)
    assert r.sent(Finish)[-1].reason == "target-accuracy" and r.sent(Finish)[-1].round == 3


def test_a_no_show_costs_one_deadline_once_is_chosen_last_and_then_leaves_the_quorum():
    # Issue 19: a member that takes every order and never answers made every round wait the deadline twice, and was
    # chosen again every round.
    r = Run(trainers=3, min_solutions=2, max_rounds=10, round_deadline=10.0)
    r.take_office(now=0)
    r.evaluate_all(0, 1)
    first = r.c.solutions.trainers
    liar = first[0]
    solve(r, 1, 2, peers=[p for p in first if p != liar])
    assert r.c.phase is Phase.TRAINING  # it waits for the liar, until the deadline
    r.tick(now=12)  # the deadline: closed with the quorum
    assert r.c.phase is Phase.EVALUATING and r.logs(f"round 1: no solution from {liar} by the deadline (1 of 3")
    assert liar not in r.c.evaluations.expected  # not waited for again for its evaluation
    r.evaluate_all(1, 13)
    assert r.c.phase is Phase.TRAINING  # no second deadline: the round closed without it
    for round_ in range(2, 6):  # chosen last: three others can train, so it is not chosen
        assert liar not in r.c.solutions.trainers
        solve(r, round_, 10 * round_)
        r.evaluate_all(round_, 10 * round_ + 1)
    # With every peer needed as trainer, it is chosen (last), and after 3 misses in a row it leaves the quorum.
    r2 = Run(trainers=4, min_solutions=3, max_rounds=10, round_deadline=10.0)
    r2.take_office(now=0)
    r2.evaluate_all(0, 1)
    now = 1.0
    for round_ in (1, 2, 3):
        assert "p4" in r2.c.solutions.trainers
        solve(r2, round_, now, peers=[p for p in r2.c.solutions.trainers if p != "p4"])
        now += 11
        r2.tick(now)
        for peer in sorted(r2.c.evaluations.expected):
            r2.on_message(Evaluation(1, round_, peer, 0.5, 1.0, 100), 50, now)
    assert r2.logs("p4 missed 3 answers in a row: it leaves this term's quorum")
    assert "p4" not in r2.c.solutions.trainers  # round 4: out, while anyone else can train
    # It answers again (its evaluation of a model every peer may evaluate): back in.
    r2.on_message(Evaluation(1, 3, "p4", 0.5, 1.0, 100), 50, now)  # (late: refused, still out)
    r2.c.missed["p4"] = 3
    r2.c._answered("p4")
    assert "p4" not in r2.c.missed


def test_a_forged_finish_the_followers_believe_ends_the_run_at_once_one_they_refuse_changes_nothing():
    r = Run(max_rounds=5)
    r.take_office(now=0)
    r.evaluate_all(0, 1)
    assert r.forged_finish(Finish(1, "c", 1, "max-rounds", 0.9), now=2) == []  # round 1 of 5: followers refuse it
    assert not r.c.finished
    r.forged_finish(Finish(1, "c", 1, "no-solutions", 0.1), now=3)  # a give-up: nobody can check it
    assert r.c.finished and r.sent(Finish)[-1].reason == "forged-finish" and r.of(Exit)[-1].code == 4
