"""The controller role without a broker or TensorFlow: a fake learner, the messages it sends captured, the time
given. Covers a whole round, quorum and retry, the resume rules after a failover, waiting with too few peers,
and, as a property, that no solution of another term, round or attempt (or from a peer not chosen) is ever
averaged into the global model."""
from __future__ import annotations

import logging
import random

import numpy as np
from hypothesis import given, settings, strategies as st

from peer.config import Settings
from peer.controller import Controller
from peer.protocol import Aggregation, Evaluation, Finish, Heartbeat, Metrics, Solution, Training
from peer.records import RunRecords
from peer.rounds import ModelStore, RoundSummary, fedavg
from tests.netutil import read_csv

PEERS = {"c", "p1", "p2", "p3", "p4"}


class FakeLearner:
    def __init__(self):
        self.saved = []

    def initial_weights(self):
        return [np.zeros((2, 2), np.float32), np.zeros(3, np.float32)]

    def save(self, weights, path):
        self.saved.append((weights, path))


def weights(value: float):
    return [np.full((2, 2), value, np.float32), np.full(3, value, np.float32)]


def make(tmp_path, store=None, live=None, **overrides) -> tuple[Controller, list]:
    options = dict(peer_id="c", trainers=3, min_solutions=2, max_rounds=3, target_accuracy=0.99,
                   round_deadline=10.0, run_dir=tmp_path)
    options.update(overrides)
    sent = []

    def send(message, retain=False, expiry=None):
        sent.append(message)
        return 100

    controller = Controller(Settings(**options), term=1, reason="start", live=set(live or PEERS),
                            store=store or ModelStore(), records=RunRecords(tmp_path, "c"), learner=FakeLearner(),
                            send=send, log=logging.getLogger("test"), rng=random.Random(0))
    return controller, sent


def of(sent, kind):
    return [m for m in sent if isinstance(m, kind)]


def evaluate_all(controller, sent, round_, now, accuracy=0.5):
    for peer in sorted(controller.evaluations.expected):
        controller.on_message(Evaluation(controller.term, round_, peer, accuracy, 1.0, 100), 50, now)


def test_a_fresh_controller_publishes_round_0_then_runs_rounds_to_the_limit(tmp_path):
    c, sent = make(tmp_path)
    c.take_office(tuple(sorted(PEERS)), now=0)
    [agg0] = of(sent, Aggregation)
    assert agg0.round == 0 and c.phase == "evaluating"
    evaluate_all(c, sent, 0, 1)
    for round_ in (1, 2, 3):
        training = of(sent, Training)[-1]
        assert training.round == round_ and "c" not in training.trainers and len(training.trainers) == 3
        for i, peer in enumerate(training.trainers):
            c.on_message(Solution(1, round_, 1, peer, 10 * (i + 1), 0.1, weights(i + 1)), 500, 2)
        assert of(sent, Aggregation)[-1].round == round_
        evaluate_all(c, sent, round_, 3, accuracy=0.5 + round_ / 10)
    [finish] = of(sent, Finish)
    assert finish.reason == "max-rounds" and finish.round == 3 and c.finished
    rows = read_csv(tmp_path / "rounds.csv")
    assert [r["round"] for r in rows] == ["1", "2", "3"]
    # (1*10 + 2*20 + 3*30) / 60 = 2.333...: FedAvg weighted by samples
    assert np.allclose(of(sent, Aggregation)[1].weights[0], 140 / 60)
    assert [m.round for m in of(sent, Metrics)] == [0, 1, 2, 3]
    assert read_csv(tmp_path / "elections.csv")[0]["reason"] == "start"


def test_target_accuracy_stops_early(tmp_path):
    c, sent = make(tmp_path, target_accuracy=0.6, max_rounds=10)
    c.take_office(tuple(PEERS), 0)
    evaluate_all(c, sent, 0, 0, accuracy=0.7)           # round 0 never stops the run, whatever its accuracy
    training = of(sent, Training)[-1]
    for peer in training.trainers:
        c.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 1, 1)
    evaluate_all(c, sent, 1, 2, accuracy=0.65)
    assert of(sent, Finish)[0].reason == "target-accuracy"


def test_the_deadline_closes_with_a_quorum_or_repeats_the_round_with_new_trainers(tmp_path):
    c, sent = make(tmp_path, round_deadline=5.0)
    c.take_office(tuple(PEERS), 0)
    evaluate_all(c, sent, 0, 0)
    first = of(sent, Training)[-1]
    c.on_message(Solution(1, 1, 1, first.trainers[0], 10, 0.1, weights(1)), 1, 1)
    c.tick(5.5)                                           # 1 of 3 < quorum 2: repeat
    retry = of(sent, Training)[-1]
    assert (retry.round, retry.attempt) == (1, 2)
    late = Solution(1, 1, 1, first.trainers[1], 10, 0.1, weights(9))  # attempt 1: stale now
    c.on_message(late, 1, 6)
    for peer in retry.trainers[:2]:
        c.on_message(Solution(1, 1, 2, peer, 10, 0.1, weights(2)), 1, 7)
    c.tick(11.0)                                          # deadline of attempt 2 with 2 of 3: close
    agg = of(sent, Aggregation)[-1]
    assert agg.round == 1 and np.allclose(agg.weights[0], 2) and len(agg.trainers) == 2


def test_a_solution_whose_tensors_do_not_fit_the_model_is_refused_not_fatal(tmp_path):
    c, sent = make(tmp_path)
    c.take_office(tuple(PEERS), 0)
    evaluate_all(c, sent, 0, 0)
    training = of(sent, Training)[-1]
    c.on_message(Solution(1, 1, 1, training.trainers[0], 10, 0.1, [np.zeros((3, 3), np.float32)]), 1, 1)
    assert c.solutions.received == {}
    for peer in training.trainers:
        c.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 1, 2)
    assert of(sent, Aggregation)[-1].round == 1


def test_a_lost_trainer_closes_the_round_without_waiting_for_the_deadline(tmp_path):
    c, sent = make(tmp_path)
    c.take_office(tuple(PEERS), 0)
    evaluate_all(c, sent, 0, 0)
    training = of(sent, Training)[-1]
    for peer in training.trainers[:2]:
        c.on_message(Solution(1, 1, 1, peer, 10, 0.1, weights(1)), 1, 1)
    c.live.discard(training.trainers[2])
    c.peer_down(training.trainers[2], 1.5)
    assert of(sent, Aggregation)[-1].round == 1


def test_a_new_controller_evaluates_a_round_whose_metrics_were_lost_then_trains_the_next(tmp_path):
    store = ModelStore()
    store.offer(0, 1, weights(0))
    store.finish_round(RoundSummary(0, 1, 0.1, 2.3, 0), run_started=1.0)
    store.offer(1, 1, weights(1), ("p1", "p2"))          # aggregated by the dead controller, no metrics seen
    c, sent = make(tmp_path, store=store)
    c.term = 2
    c.take_office(tuple(PEERS), 0)
    [agg] = of(sent, Aggregation)
    assert agg.round == 1 and agg.term == 2 and of(sent, Training) == []
    evaluate_all(c, sent, 1, 1)
    assert of(sent, Metrics)[-1].round == 1 and of(sent, Training)[-1].round == 2
    assert read_csv(tmp_path / "rounds.csv")[0]["trainers"] == "p1;p2"


def test_a_new_controller_after_finished_metrics_trains_the_next_round_at_once(tmp_path):
    store = ModelStore()
    store.offer(2, 1, weights(2))
    store.finish_round(RoundSummary(2, 1, 0.5, 1.0, 10), run_started=1.0)
    c, sent = make(tmp_path, store=store)
    c.take_office(tuple(PEERS), 0)
    assert of(sent, Aggregation) == [] and of(sent, Training)[-1].round == 3


def test_a_new_controller_finishes_a_run_whose_last_round_was_already_done(tmp_path):
    store = ModelStore()
    store.offer(3, 1, weights(3))
    store.finish_round(RoundSummary(3, 1, 0.5, 1.0, 10), run_started=1.0)
    c, sent = make(tmp_path, store=store)
    c.take_office(tuple(PEERS), 0)
    assert of(sent, Finish)[0].round == 3 and of(sent, Training) == []


def test_too_few_peers_waits_once_and_resumes_when_one_returns(tmp_path, caplog):
    c, sent = make(tmp_path, live={"c", "p1"})
    c.take_office(("c", "p1"), 0)
    evaluate_all(c, sent, 0, 0)
    c.live.discard("p1")
    c.peer_down("p1", 1)                                  # the only trainer is gone: repeat, but nobody is left
    with caplog.at_level(logging.WARNING, logger="test"):
        for now in range(2, 30):
            c.tick(now)
    assert c.phase == "waiting-peers" and len(of(sent, Training)) == 1     # no order to nobody, no spinning
    assert sum("too few peers" in r.message for r in caplog.records) <= 1
    c.live.add("p2")
    c.peer_up("p2", 31)
    assert of(sent, Training)[-1].trainers == ("p2",)


def test_heartbeats_go_out_every_interval(tmp_path):
    c, sent = make(tmp_path, heartbeat=1.0)
    c.take_office(tuple(PEERS), 0)
    for now in (0.0, 0.5, 1.0, 1.2, 2.1):
        c.tick(now)
    assert len(of(sent, Heartbeat)) == 3


solution_events = st.lists(st.tuples(
    st.sampled_from([0, 1, 2]),                 # term (1 is the controller's)
    st.sampled_from([0, 1, 2]),                 # round (1 is current)
    st.sampled_from([1, 2]),                    # attempt (1 is current)
    st.sampled_from(sorted(PEERS - {"c"}) + ["intruder"]),
    st.integers(1, 50),                         # samples
    st.floats(-5, 5, allow_nan=False, width=32),
), max_size=25)


@settings(max_examples=200, deadline=None)
@given(events=solution_events)
def test_property_only_current_solutions_of_chosen_trainers_are_ever_averaged(tmp_path_factory, events):
    tmp_path = tmp_path_factory.mktemp("ctl")
    c, sent = make(tmp_path)
    c.take_office(tuple(PEERS), 0)
    evaluate_all(c, sent, 0, 0)
    chosen = of(sent, Training)[-1].trainers
    accepted = {}
    for term, round_, attempt, peer, samples, value in events:
        c.on_message(Solution(term, round_, attempt, peer, samples, 0.1, weights(value)), 1, 1)
        if (term, round_, attempt) == (1, 1, 1) and peer in chosen and peer not in accepted and len(accepted) < 3:
            accepted[peer] = (weights(value), samples)
    aggregations = [m for m in of(sent, Aggregation) if m.round == 1]
    if len(accepted) == len(chosen):
        [agg] = aggregations
        expected = fedavg([accepted[p] for p in sorted(accepted)])
        assert all(np.allclose(a, b, atol=1e-5) for a, b in zip(agg.weights, expected))
        assert set(agg.trainers) == set(accepted)
    else:
        assert aggregations == []
