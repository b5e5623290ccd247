import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.learning.aggregation import fedavg
from peer.roles.rounds import (
    EvaluationCollector,
    GlobalModel,
    ModelStore,
    RoundOutcome,
    RoundSummary,
    SolutionCollector,
    choose_trainers,
    weighted_mean,
)


def f32(*values):
    return np.array(values, np.float32)


# --- fedavg -----------------------------------------------------------------------------------------------------------


def test_fedavg_two_solutions_by_hand():
    (avg,) = fedavg([([f32(1, 2)], 1), ([f32(3, 4)], 3)])
    # (1*1 + 3*3)/4 = 2.5, (2*1 + 4*3)/4 = 3.5
    np.testing.assert_allclose(avg, [2.5, 3.5], rtol=0, atol=1e-7)


def test_fedavg_three_solutions_multi_tensor_by_hand():
    a = [np.array([[1, 2], [3, 4]], np.float32), f32(10), np.array(0.0, np.float32)]
    b = [np.array([[5, 6], [7, 8]], np.float32), f32(20), np.array(6.0, np.float32)]
    c = [np.array([[9, 0], [-3, 4]], np.float32), f32(-10), np.array(-6.0, np.float32)]
    out = fedavg([(a, 2), (b, 1), (c, 1)])
    # weights 1/2, 1/4, 1/4
    np.testing.assert_allclose(
        out[0], [[(2 + 5 + 9) / 4, (4 + 6 + 0) / 4], [(6 + 7 - 3) / 4, (8 + 8 + 4) / 4]], atol=1e-6
    )
    np.testing.assert_allclose(out[1], [(20 + 20 - 10) / 4], atol=1e-6)
    np.testing.assert_allclose(out[2], 0.0, atol=1e-6)
    assert [t.shape for t in out] == [(2, 2), (1,), ()]
    assert all(t.dtype == np.float32 for t in out)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.lists(st.floats(-1e3, 1e3, width=32), min_size=3, max_size=3), min_size=1, max_size=6),
    st.integers(1, 10_000),
)
def test_fedavg_equal_weights_is_plain_mean(rows, samples):
    solutions = [([f32(*row)], samples) for row in rows]
    (avg,) = fedavg(solutions)
    np.testing.assert_allclose(avg, np.mean(np.array(rows, np.float64), axis=0), rtol=1e-5, atol=1e-3)


def test_fedavg_single_solution_is_itself():
    weights = [np.array([[0.1, -0.2]], np.float32), f32(3e-8, 7)]
    out = fedavg([(weights, 17)])
    for got, want in zip(out, weights):
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, want)


def test_fedavg_does_not_modify_its_input():
    a, b = [f32(1, 2)], [f32(3, 4)]
    fedavg([(a, 1), (b, 1)])
    np.testing.assert_array_equal(a[0], [1, 2])
    np.testing.assert_array_equal(b[0], [3, 4])


def test_fedavg_output_is_float32_even_for_float64_input():
    out = fedavg([([np.array([1.0, 2.0])], 1), ([np.array([2.0, 3.0])], 1)])
    assert out[0].dtype == np.float32


def test_fedavg_result_is_within_the_inputs_range():
    rng = np.random.default_rng(3)
    solutions = [([rng.normal(size=(4, 5)).astype(np.float32)], int(rng.integers(1, 100))) for _ in range(5)]
    (avg,) = fedavg(solutions)
    stack = np.stack([w[0] for w, _ in solutions])
    assert np.all(avg >= stack.min(axis=0) - 1e-6) and np.all(avg <= stack.max(axis=0) + 1e-6)


@pytest.mark.parametrize(
    "solutions",
    [
        [],
        [([f32(1)], 0)],
        [([f32(1)], 0), ([f32(2)], 0)],
    ],
    ids=["empty", "zero samples", "all zero samples"],
)
def test_fedavg_rejects_nothing_to_average(solutions):
    with pytest.raises(ValueError):
        fedavg(solutions)


@pytest.mark.parametrize(
    "other",
    [
        [f32(1, 2, 3)],  # different length
        [np.array([[1, 2]], np.float32)],  # same size, different shape
        [f32(1, 2), f32(0)],  # extra tensor
        [],  # no tensors
    ],
    ids=["length", "shape", "extra tensor", "no tensors"],
)
def test_fedavg_rejects_mismatched_shapes(other):
    with pytest.raises(ValueError, match="shape"):
        fedavg([([f32(1, 2)], 1), (other, 1)])


# --- weighted_mean ----------------------------------------------------------------------------------------------------


def test_weighted_mean_by_hand():
    assert weighted_mean([(0.5, 1), (1.0, 3)]) == pytest.approx(0.875)
    assert weighted_mean([(0.25, 10)]) == pytest.approx(0.25)
    assert weighted_mean(iter([(1.0, 2), (0.0, 2)])) == pytest.approx(0.5)


def test_weighted_mean_ignores_zero_counts():
    assert weighted_mean([(0.9, 0), (0.3, 4)]) == pytest.approx(0.3)


@pytest.mark.parametrize("values", [[], [(0.5, 0)], [(0.5, 0), (0.7, 0)]])
def test_weighted_mean_of_nothing_is_none(values):
    assert weighted_mean(values) is None


# --- choose_trainers --------------------------------------------------------------------------------------------------

CANDIDATES = [f"peer-{i}" for i in range(8)]


def test_choose_trainers_count_distinct_subset_sorted():
    for seed in range(50):
        chosen = choose_trainers(CANDIDATES, 3, random.Random(seed))
        assert len(chosen) == 3 == len(set(chosen))
        assert set(chosen) <= set(CANDIDATES)
        assert list(chosen) == sorted(chosen)
        assert isinstance(chosen, tuple)


def test_choose_trainers_with_fewer_candidates_takes_them_all():
    assert choose_trainers(["b", "a"], 5, random.Random(0)) == ("a", "b")
    assert choose_trainers([], 3, random.Random(0)) == ()


def test_choose_trainers_ignores_duplicate_candidates():
    chosen = choose_trainers(["a", "a", "b", "b"], 3, random.Random(0))
    assert chosen == ("a", "b")


def test_choose_trainers_is_deterministic_for_a_seed():
    first = [choose_trainers(CANDIDATES, 3, random.Random(seed)) for seed in range(20)]
    again = [choose_trainers(list(reversed(CANDIDATES)), 3, random.Random(seed)) for seed in range(20)]
    # The candidates' order (e.g. a set's iteration order) must not matter, only the seed.
    assert first == again
    assert len(set(first)) > 1


def test_choose_trainers_sequence_is_reproducible():
    rng_a, rng_b = random.Random(99), random.Random(99)
    assert [choose_trainers(set(CANDIDATES), 2, rng_a) for _ in range(10)] == [
        choose_trainers(set(CANDIDATES), 2, rng_b) for _ in range(10)
    ]


def test_every_candidate_is_eventually_chosen():
    rng = random.Random(1)
    counts = dict.fromkeys(CANDIDATES, 0)
    for _ in range(2000):
        for peer in choose_trainers(CANDIDATES, 3, rng):
            counts[peer] += 1
    assert all(c > 0 for c in counts.values())
    # 2000 draws of 3 of 8: 750 each on average; uniform enough that none is starved.
    assert min(counts.values()) > 600 and max(counts.values()) < 900


# --- SolutionCollector ------------------------------------------------------------------------------------------------

W = [f32(1, 1)]


def collector(trainers=("a", "b", "c"), quorum=2, deadline=100.0, term=2, round_=5, attempt=1):
    return SolutionCollector(
        term=term, round=round_, attempt=attempt, trainers=tuple(trainers), quorum=quorum, deadline=deadline
    )


def test_collector_accepts_chosen_trainers():
    c = collector()
    assert c.offer(2, 5, 1, "a", W, 10) is None
    assert c.offer(2, 5, 1, "c", W, 30) is None
    assert set(c.received) == {"a", "c"}
    assert c.outstanding == {"b"}


@pytest.mark.parametrize("term, round_, attempt", [(1, 5, 1), (3, 5, 1), (2, 4, 1), (2, 6, 1), (2, 5, 2), (2, 5, 0)])
def test_collector_rejects_other_term_round_or_attempt(term, round_, attempt):
    c = collector()
    reason = c.offer(term, round_, attempt, "a", W, 10)
    assert isinstance(reason, str) and reason
    assert not c.received


def test_collector_rejects_unchosen_duplicate_and_empty():
    c = collector()
    assert "not chosen" in c.offer(2, 5, 1, "z", W, 10)
    assert c.offer(2, 5, 1, "a", W, 10) is None
    first = c.received["a"]
    assert "already" in c.offer(2, 5, 1, "a", [f32(9, 9)], 99)
    assert c.received["a"] is first
    assert isinstance(c.offer(2, 5, 1, "b", W, 0), str)
    assert set(c.received) == {"a"}


def test_all_received_closes_before_deadline():
    c = collector()
    for peer in "abc":
        assert c.outcome(now=0.0) is RoundOutcome.WAIT
        c.offer(2, 5, 1, peer, W, 1)
    assert c.outcome(now=0.0) is RoundOutcome.CLOSE


def test_quorum_but_not_all_waits_until_deadline():
    c = collector(quorum=2)
    c.offer(2, 5, 1, "a", W, 1)
    c.offer(2, 5, 1, "b", W, 1)
    assert c.outcome(now=99.9) is RoundOutcome.WAIT
    assert c.outcome(now=100.0) is RoundOutcome.CLOSE
    assert c.outcome(now=1e9) is RoundOutcome.CLOSE


def test_deadline_below_quorum_retries():
    c = collector(quorum=2)
    c.offer(2, 5, 1, "a", W, 1)
    assert c.outcome(now=99.0) is RoundOutcome.WAIT
    assert c.outcome(now=100.0) is RoundOutcome.RETRY


def test_deadline_with_nothing_retries():
    assert collector(quorum=1).outcome(now=100.0) is RoundOutcome.RETRY


def test_all_outstanding_lost_decides_at_once():
    c = collector(quorum=2)
    c.offer(2, 5, 1, "a", W, 1)
    c.offer(2, 5, 1, "b", W, 1)
    c.trainer_lost("c")
    assert c.outcome(now=0.0) is RoundOutcome.CLOSE

    c = collector(quorum=2)
    c.offer(2, 5, 1, "a", W, 1)
    c.trainer_lost("b")
    assert c.outcome(now=0.0) is RoundOutcome.WAIT  # c may still answer
    c.trainer_lost("c")
    assert c.outcome(now=0.0) is RoundOutcome.RETRY


def test_losing_a_trainer_that_already_answered_changes_nothing():
    c = collector(quorum=3)
    c.offer(2, 5, 1, "a", W, 1)
    c.trainer_lost("a")
    c.trainer_lost("stranger")
    assert c.lost == set()
    assert c.outstanding == {"b", "c"}
    c.offer(2, 5, 1, "b", W, 1)
    c.offer(2, 5, 1, "c", W, 1)
    assert c.outcome(now=0.0) is RoundOutcome.CLOSE


def test_collector_contributions_are_every_received_solution_in_peer_order():
    c = collector()
    c.offer(2, 5, 1, "b", [f32(3, 4)], 3)
    c.offer(2, 5, 1, "a", [f32(1, 2)], 1)
    assert [(p, n) for p, _, n in c.contributions()] == [("a", 1), ("b", 3)]
    np.testing.assert_allclose(fedavg([(w, n) for _, w, n in c.contributions()])[0], [2.5, 3.5], atol=1e-7)


# --- EvaluationCollector ----------------------------------------------------------------------------------------------


def evaluations(expected=("a", "b", "c"), deadline=50.0):
    return EvaluationCollector(term=1, round=3, expected=set(expected), deadline=deadline)


def test_evaluation_done_when_all_answered():
    e = evaluations()
    e.offer(1, 3, "a", 0.9, 0.3, 100)
    e.offer(1, 3, "b", 0.8, 0.4, 100)
    assert not e.done(now=0.0)
    e.offer(1, 3, "c", 0.7, 0.5, 100)
    assert e.done(now=0.0)


def test_evaluation_done_when_missing_are_lost():
    e = evaluations()
    e.offer(1, 3, "a", 0.9, 0.3, 100)
    e.peer_lost("b")
    assert not e.done(now=0.0)
    e.peer_lost("c")
    assert e.done(now=0.0)


def test_evaluation_done_at_deadline():
    e = evaluations()
    assert not e.done(now=49.99)
    assert e.done(now=50.0)


def test_evaluation_rejects_stale_and_duplicates():
    e = evaluations()
    assert isinstance(e.offer(0, 3, "a", 0.9, 0.3, 10), str)
    assert isinstance(e.offer(1, 2, "a", 0.9, 0.3, 10), str)
    assert e.offer(1, 3, "a", 0.9, 0.3, 10) is None
    assert "already" in e.offer(1, 3, "a", 0.1, 9.0, 1000)
    assert e.received == {"a": (0.9, 0.3, 10)}


def test_evaluation_only_from_a_member_the_round_waits_for_and_its_weight_bounded_by_what_it_announced():
    e = evaluations()
    assert "not a member" in e.offer(1, 3, "intruder", 1.0, 0.0, 2**53 - 1)
    assert e.offer(1, 3, "b", 1.0, 0.0, 2**53 - 1, cap=200) is None
    assert e.offer(1, 3, "c", 0.5, 1.0, 100, cap=200) is None
    assert e.received["b"] == (1.0, 0.0, 200) and e.result()[0] == pytest.approx((200 + 50) / 300)


def test_evaluation_result_is_sample_weighted():
    e = evaluations()
    e.offer(1, 3, "a", 0.5, 2.0, 100)
    e.offer(1, 3, "b", 1.0, 1.0, 300)
    accuracy, loss, samples = e.result()
    assert accuracy == pytest.approx(0.875)
    assert loss == pytest.approx(1.25)
    assert samples == 400


def test_evaluation_result_none_when_nothing_arrived():
    e = evaluations()
    assert e.result() is None
    for peer in "abc":
        e.peer_lost(peer)
    assert e.done(now=0.0) and e.result() is None


# --- ModelStore -------------------------------------------------------------------------------------------------------


def summary(round_, term=1, accuracy=0.5):
    return RoundSummary(round=round_, term=term, accuracy=accuracy, loss=1.0, bytes=10)


def test_store_keeps_newer_rounds():
    store = ModelStore()
    assert store.latest is None
    assert store.offer(1, 1, W, ("a",))
    assert store.offer(2, 1, [f32(2, 2)], ("b", "c"))
    assert isinstance(store.latest, GlobalModel)
    assert (store.latest.round, store.latest.term, store.latest.trainers) == (2, 1, ("b", "c"))
    np.testing.assert_array_equal(store.latest.weights[0], [2, 2])


def test_store_refuses_older_round_or_term():
    store = ModelStore()
    store.offer(5, 3, W)
    assert not store.offer(4, 3, [f32(9, 9)])
    assert not store.offer(4, 9, [f32(9, 9)])  # a later term does not make an older round newer
    assert not store.offer(5, 2, [f32(9, 9)])  # same round from a deposed controller
    assert (store.latest.round, store.latest.term) == (5, 3)
    np.testing.assert_array_equal(store.latest.weights[0], [1, 1])


def test_store_same_round_in_later_term_replaces():
    store = ModelStore()
    store.offer(5, 3, W, ("a",))
    assert store.offer(5, 4, [f32(7, 7)], ("b",))
    assert (store.latest.round, store.latest.term, store.latest.trainers) == (5, 4, ("b",))


def test_store_later_round_from_older_term_is_newer():
    # The round counts progress; an older term's later aggregation still holds more training.
    store = ModelStore()
    store.offer(4, 5, W)
    assert store.offer(5, 4, [f32(3, 3)])
    assert store.latest.round == 5


def test_store_trainers_become_a_tuple():
    store = ModelStore()
    store.offer(1, 1, W, ["a", "b"])
    assert store.latest.trainers == ("a", "b")


def test_last_finished():
    store = ModelStore()
    assert store.last_finished is None
    store.offer(1, 1, W)
    store.finish_round(summary(1), run_started=1000.0)
    assert store.last_finished.round == 1
    store.offer(2, 1, W)
    store.finish_round(summary(3))
    store.finish_round(summary(2))
    # The latest finished round, not the last one reported.
    assert store.last_finished.round == 3


def test_run_started_is_set_once():
    store = ModelStore()
    store.finish_round(summary(1), run_started=None)
    assert store.run_started is None
    store.finish_round(summary(1), run_started=1000.0)
    assert store.run_started == 1000.0
    store.finish_round(summary(2), run_started=2000.0)
    assert store.run_started == 1000.0


def test_finishing_a_round_again_replaces_its_summary():
    store = ModelStore()
    store.finish_round(summary(1, accuracy=0.2))
    store.finish_round(summary(1, term=2, accuracy=0.4))
    assert store.finished[1].accuracy == 0.4 and len(store.finished) == 1


# --- a stop nobody decides alone, members heard but not awaited ---------------------------------------------------------


def test_the_median_accuracy_is_each_peer_one_voice_and_no_minority_moves_it():
    c = EvaluationCollector(1, 3, {"a", "b", "c", "d"}, deadline=10.0)
    for peer, accuracy in (("a", 0.4), ("b", 0.45), ("c", 0.5), ("d", 1.0)):
        c.offer(1, 3, peer, accuracy, 1.0, 10**12 if peer == "d" else 100)
    assert c.median_accuracy() == 0.45  # the lower median: the liar's 1.0 (and its count) do not reach it
    two = EvaluationCollector(1, 3, {"a", "d"}, deadline=10.0)
    two.offer(1, 3, "a", 0.4, 1.0, 100)
    two.offer(1, 3, "d", 1.0, 1.0, 100)
    assert two.median_accuracy() == 0.4  # of two, the lower one
    assert EvaluationCollector(1, 3, {"a"}, 10.0).median_accuracy() is None


def test_an_optional_member_is_heard_but_not_awaited():
    c = EvaluationCollector(1, 3, {"a"}, deadline=10.0, optional={"a", "z"})
    assert c.optional == {"z"}
    assert c.offer(1, 3, "z", 0.5, 1.0, 10) is None and c.done(0.0) is False
    assert c.offer(1, 3, "a", 0.5, 1.0, 10) is None and c.done(0.0) and c.missing == set()
    assert c.offer(1, 3, "q", 0.5, 1.0, 10) == "q is not a member this round waits for"


def test_a_finish_is_implausible_before_the_last_round_or_below_the_published_target():
    from peer.roles.rounds import implausible_finish

    finished = {2: RoundSummary(2, 1, 0.8, 1.0, 10)}
    assert implausible_finish("max-rounds", 2, finished, 5, 0.9) == "round 2 is not the last (5)"
    assert implausible_finish("max-rounds", 5, finished, 5, 0.9) is None
    assert "below the target" in implausible_finish("target-accuracy", 2, finished, 5, 0.9)
    assert "unknown" in implausible_finish("target-accuracy", 3, finished, 5, 0.5)
    assert implausible_finish("target-accuracy", 2, finished, 5, 0.8) is None
    for give_up in ("too-few-peers", "no-solutions", "no-evaluations", "forged-finish"):
        assert implausible_finish(give_up, 1, {}, 5, 0.9) is None
