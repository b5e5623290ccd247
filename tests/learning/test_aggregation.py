import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.learning.aggregation import (
    AGGREGATIONS,
    STRATEGIES,
    AggregationRefused,
    AggregationResult,
    Aggregator,
    Contribution,
    aggregate,
    default_byzantine,
    fedavg,
    krum_scores,
    krum_select,
    median_rule,
    squared_distances,
    trim_count,
    trimmed_mean_rule,
    update_norm,
)

MAX_SAMPLES = 2**53 - 1
ROBUST = ("median", "trimmed-mean", "krum")
SHAPES = [(3, 4), (4,), ()]


def f32(*values):
    return np.array(values, np.float32)


def zeros(shapes=SHAPES):
    return [np.zeros(s, np.float32) for s in shapes]


def one_d(*values):
    """Solutions of a one-tensor, one-value model: (peer, [value], 1), peers a, b, c, ..."""
    return [(chr(ord("a") + i), [f32(v)], 1) for i, v in enumerate(values)]


# --- the old FedAvg, moved unchanged ----------------------------------------------------------------------------------


def old_fedavg(solutions):
    """The oracle: FedAvg as the peer computed it before aggregation.py (float64 accumulation in solution order)."""
    total = sum(samples for _, samples in solutions)
    out = []
    for index in range(len(solutions[0][0])):
        acc = np.zeros(np.shape(solutions[0][0][index]), dtype=np.float64)
        for weights, samples in solutions:
            acc += np.asarray(weights[index], dtype=np.float64) * (samples / total)
        out.append(acc.astype(np.float32))
    return out


def test_fedavg_is_bit_identical_to_the_old_one():
    rng = np.random.default_rng(0)
    for _ in range(20):
        solutions = [
            ([rng.normal(size=s).astype(np.float32) for s in SHAPES], int(rng.integers(1, 10**6)))
            for _ in range(int(rng.integers(1, 7)))
        ]
        for got, want in zip(fedavg(solutions), old_fedavg(solutions)):
            assert got.dtype == want.dtype == np.float32 and got.shape == want.shape
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize(
    "solutions, error",
    [
        ([], "fedavg needs at least one solution"),
        ([([f32(1)], 0)], "fedavg needs a positive total sample count"),
        ([([f32(1)], 1), ([f32(1, 2)], 1)], "fedavg: solutions have different tensor shapes"),
    ],
)
def test_fedavg_keeps_the_old_errors(solutions, error):
    with pytest.raises(ValueError, match=f"^{error}$"):
        fedavg(solutions)


# --- the rules, by hand -------------------------------------------------------------------------------------------


def test_fedavg_strategy_by_hand():
    result = aggregate([f32(0, 0)], [("a", [f32(1, 2)], 1), ("b", [f32(3, 4)], 3)])
    np.testing.assert_allclose(result.weights[0], [2.5, 3.5], atol=1e-7)  # (1 + 9)/4, (2 + 12)/4
    assert result.used == result.accepted == ("a", "b") and not result.clipped and result.strategy == "fedavg"


def test_median_by_hand_odd_and_even():
    points = [
        [f32(1, 10), f32(5)],
        [f32(2, 20), f32(4)],
        [f32(3, 30), f32(3)],
        [f32(4, 40), f32(2)],
        [f32(100, -100), f32(1)],
    ]
    np.testing.assert_array_equal(median_rule(points)[0], [3, 20])
    np.testing.assert_array_equal(median_rule(points)[1], [3])
    np.testing.assert_array_equal(median_rule(points[:4])[0], [2.5, 25])  # even count: mean of the middle two


def test_median_ignores_sample_counts():
    result = aggregate([f32(0)], [("a", [f32(1)], 1), ("b", [f32(2)], 1), ("c", [f32(3)], 10**6)], "median")
    np.testing.assert_array_equal(result.weights[0], [2])


@pytest.mark.parametrize(
    "n, fraction, cut",
    [
        (1, 0.2, 0),
        (2, 0.2, 0),
        (3, 0.2, 1),
        (4, 0.2, 1),
        (5, 0.2, 1),
        (9, 0.2, 1),
        (10, 0.2, 2),
        (15, 0.2, 3),
        (5, 0.4, 2),
        (10, 0.49, 4),
        (3, 0.49, 1),
        (10, 0.0, 0),
        (3, 0.01, 1),
        (2, 0.4, 0),
    ],
)
def test_trim_count(n, fraction, cut):
    assert trim_count(n, fraction) == cut


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7, math.nan])
def test_trim_count_refuses_bad_fractions(fraction):
    with pytest.raises(ValueError):
        trim_count(5, fraction)


def test_trimmed_mean_by_hand():
    five = [[f32(v, -v)] for v in (4, 1, 100, 2, 3)]
    np.testing.assert_allclose(trimmed_mean_rule(five, 0.2)[0], [3, -3])  # mean of 2, 3, 4
    np.testing.assert_allclose(trimmed_mean_rule(five[:4], 0.2)[0], [3, -3])  # 1, 2, 4, 100: mean of 2, 4
    np.testing.assert_allclose(trimmed_mean_rule(five, 0.4)[0], [3, -3])  # the median
    np.testing.assert_allclose(trimmed_mean_rule(five, 0.0)[0], [22, -22])  # the mean
    np.testing.assert_allclose(trimmed_mean_rule(five[:2], 0.2)[0], [2.5, -2.5])  # two values: their mean


@pytest.mark.parametrize("n, f", [(0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 1), (6, 1), (7, 2), (8, 2), (9, 3)])
def test_default_byzantine_is_the_largest_f_with_n_over_2f_plus_2(n, f):
    assert default_byzantine(n) == f
    assert n <= 2 * (f + 1) + 2


def test_squared_distances_by_hand():
    points = [[f32(0, 0), f32(0)], [f32(3, 0), f32(4)], [f32(0, 1), f32(0)]]
    np.testing.assert_array_equal(squared_distances(points), [[0, 25, 1], [25, 0, 26], [1, 26, 0]])


def test_krum_by_hand():
    points = [[f32(v)] for v in (0, 1, 2, 10, 11)]
    distances = squared_distances(points)
    # n=5, f=1: the 2 nearest others. 0: 1+4; 1: 1+1; 2: 1+4; 10: 1+64; 11: 1+81
    np.testing.assert_array_equal(krum_scores(distances, 1), [5, 2, 5, 65, 82])
    assert krum_select(distances) == (1, 1)
    result = aggregate([f32(1)], [(p, w, 1) for p, w in zip("abcde", points)], "krum", clip_multiplier=None)
    assert result.used == ("b",) and result.accepted == tuple("abcde") and result.notes == ("f=1",)
    np.testing.assert_array_equal(result.weights[0], [1])


def test_krum_lowers_an_f_too_large_for_n_and_says_so():
    points = [[f32(v)] for v in (0, 1, 2, 10, 11)]
    assert krum_select(squared_distances(points), byzantine=3) == (1, 1)
    result = aggregate([f32(1)], [(p, w, 1) for p, w in zip("abcde", points)], "krum", byzantine=3)
    assert result.used == ("b",) and "lowered from 3" in result.notes[0] and "f=1" in result.notes[0]
    with pytest.raises(ValueError):
        krum_scores(squared_distances(points), 2)


def test_krum_of_two_takes_the_smaller_step_and_of_one_the_one():
    result = aggregate([f32(0, 0)], [("a", [f32(1e30, 0)], 1), ("b", [f32(0.5, 0.5)], 1)], "krum")
    assert result.used == ("b",) and "smaller update" in result.notes[0]
    np.testing.assert_array_equal(result.weights[0], [0.5, 0.5])
    result = aggregate([f32(0, 0)], [("a", [f32(1, 2)], 1)], "krum")
    assert result.used == ("a",) and result.notes == ()
    np.testing.assert_array_equal(result.weights[0], [1, 2])


def test_registry_names_and_default():
    assert AGGREGATIONS == ("fedavg", "median", "trimmed-mean", "krum") == tuple(STRATEGIES)
    assert Aggregator().strategy == "fedavg"
    with pytest.raises(TypeError):
        STRATEGIES["mine"] = STRATEGIES["fedavg"]


# --- norm bound and sample cap ----------------------------------------------------------------------------------------


def test_update_norm_spans_all_tensors_and_does_not_overflow():
    assert update_norm([f32(3, 1), f32(4)], [f32(0, 1), f32(0)]) == 5.0
    assert update_norm([np.full(1000, 3e38, np.float32)], [np.full(1000, -3e38, np.float32)]) == pytest.approx(
        6e38 * math.sqrt(1000), rel=1e-6
    )
    assert update_norm([f32(1)], [f32(1)]) == 0.0


def test_an_outlying_update_is_clipped_to_a_multiple_of_the_lower_median_norm():
    result = aggregate([f32(0)], one_d(1, 1, 1, 1, 100))
    assert result.norm_bound == 3.0 and result.clipped == {"e": 100.0}
    np.testing.assert_allclose(result.weights[0], [(4 + 3) / 5])
    assert "clipped e (update norm 100, bound 3)" in result.describe()


def test_one_attacker_of_two_cannot_raise_the_bound():
    result = aggregate([f32(0, 0)], [("a", [f32(1, 0)], 1), ("b", [f32(1e30, 0)], 1)])
    assert result.norm_bound == 3.0 and set(result.clipped) == {"b"}
    np.testing.assert_allclose(result.weights[0], [2, 0])


def test_the_clip_floor_keeps_the_bound_off_zero():
    result = aggregate([f32(0)], one_d(0, 0, 0, 0.5))
    assert result.norm_bound == 0.01 and set(result.clipped) == {"d"}
    np.testing.assert_allclose(result.weights[0], [0.01 / 4])


def test_clipping_can_be_turned_off():
    result = aggregate([f32(0)], one_d(1, 1, 1, 1, 50), clip_multiplier=None)
    assert result.norm_bound is None and not result.clipped
    np.testing.assert_allclose(result.weights[0], [54 / 5])


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_honest_updates_pass_untouched(strategy):
    rng = np.random.default_rng(7)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    solutions = []
    for peer, size in zip("abcde", (0.4, 1.0, 1.1, 1.2, 2.9)):  # the largest is 2.9 times the median
        step = [rng.normal(size=s) for s in SHAPES]
        scale = size / update_norm(step, zeros())
        solutions.append((peer, [(w + scale * d).astype(np.float32) for w, d in zip(start, step)], 10))
    result = aggregate(start, solutions, strategy)
    assert not result.clipped and not result.rejected and result.accepted == tuple("abcde")
    if strategy == "fedavg":
        for got, want in zip(result.weights, old_fedavg([(w, n) for _, w, n in solutions])):
            np.testing.assert_array_equal(got, want)


def test_claimed_samples_are_capped_at_what_the_peer_announced():
    solutions = [("a", [f32(1)], 10), ("b", [f32(2)], 10), ("x", [f32(3)], MAX_SAMPLES)]
    result = aggregate([f32(2)], solutions, max_samples={"a": 10, "b": 10, "x": 20})
    assert result.clamped == {"x": (MAX_SAMPLES, 20)}
    np.testing.assert_allclose(result.weights[0], [(10 + 20 + 60) / 40])
    assert f"capped x's samples {MAX_SAMPLES} -> 20" in result.describe()
    result = aggregate([f32(2)], solutions, max_samples={"a": 10, "b": 10})
    assert result.rejected == {"x": "it announced no sample count when it joined"} and result.used == ("a", "b")


# --- admission --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, samples, reason",
    [
        ([f32(1, 2)], 1, "tensors, not 3"),
        ([np.zeros((4, 3), np.float32), f32(1, 2, 3, 4), f32(0)], 1, "tensor 0 is (4, 3), not (3, 4)"),
        ([np.zeros((3, 4), np.float32), f32(1, 2, 3, 4), f32(0, 0)], 1, "tensor 2 is (2,), not ()"),
        ([np.zeros((3, 4), np.float32), f32(1, 2, math.nan, 4), np.float32(0)], 1, "tensor 1 has NaN or infinite"),
        ([np.zeros((3, 4), np.float32), f32(1, 2, math.inf, 4), np.float32(0)], 1, "tensor 1 has NaN or infinite"),
        ([np.zeros((3, 4), np.float32), np.array(list("abcd")), np.float32(0)], 1, "tensor 1 is not real numbers"),
        ([np.zeros((3, 4), np.float32), [1, [2]], np.float32(0)], 1, "tensor 1 is not an array of numbers"),
        (None, 1, "not a list of tensors"),
        ("weights", 1, "not a list of tensors"),
        (zeros(), 0, "it reports no samples"),
        (zeros(), -5, "it reports no samples"),
        (zeros(), True, "not a whole number"),
        (zeros(), 2.5, "not a whole number"),
    ],
)
@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_a_bad_solution_is_rejected_with_a_reason_not_a_crash(weights, samples, reason, strategy):
    good = [(p, [w + 0.1 * (i + 1) for w in zeros()], 5) for i, p in enumerate("abc")]
    result = aggregate(zeros(), good + [("x", weights, samples)], strategy)
    assert set(result.rejected) == {"x"} and reason in result.rejected["x"]
    assert result.accepted == ("a", "b", "c") and "x" not in result.used
    assert f"rejected x: {result.rejected['x']}" in result.describe()


def test_a_peer_with_two_solutions_has_both_rejected():
    result = aggregate([f32(0)], one_d(1, 2, 3) + [("a", [f32(9)], 1)])
    assert result.rejected == {"a": "it sent 2 solutions"} and result.accepted == ("b", "c")


def test_no_usable_solution_is_a_refusal_naming_every_reason():
    with pytest.raises(AggregationRefused) as refused:
        aggregate([f32(0)], [("a", [f32(1, 2)], 1), ("b", [f32(1)], 0)])
    assert str(refused.value).startswith("no usable solution (a: its tensors do not have the global model's shapes")
    assert "b: it reports no samples" in str(refused.value)
    assert set(refused.value.rejected) == {"a", "b"} and refused.value.suspects == ()
    with pytest.raises(AggregationRefused, match="^no solution to aggregate$"):
        aggregate([f32(0)], [])


def test_arrival_order_does_not_matter():
    rng = np.random.default_rng(5)
    solutions = [
        (p, [rng.normal(size=s).astype(np.float32) for s in SHAPES], int(rng.integers(1, 99))) for p in "qwert"
    ]
    for strategy in AGGREGATIONS:
        first = aggregate(zeros(), solutions, strategy)
        again = aggregate(zeros(), solutions[::-1], strategy)
        assert first.used == again.used and first.accepted == tuple("eqrtw")
        for a, b in zip(first.weights, again.weights):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("strategy", AGGREGATIONS)
def test_output_is_float32_in_the_global_shapes_and_inputs_are_untouched(strategy):
    start = [np.ones(s, np.float64) for s in SHAPES]
    solutions = [(p, [np.full(s, v, np.float64) for s in SHAPES], 1) for p, v in zip("abcd", (1.5, 2.0, 1.0, 1e6))]
    copies = [[w.copy() for w in weights] for _, weights, _ in solutions]
    result = aggregate(start, solutions, strategy)
    assert [w.shape for w in result.weights] == SHAPES and all(w.dtype == np.float32 for w in result.weights)
    assert isinstance(result, AggregationResult)
    for (_, weights, _), copy in zip(solutions, copies):
        for w, c in zip(weights, copy):
            np.testing.assert_array_equal(w, c)
    for w in start:
        np.testing.assert_array_equal(w, 1)


def test_contribution_named_tuple_is_accepted():
    result = aggregate([f32(0)], [Contribution("a", [f32(1)], 1), Contribution("b", [f32(3)], 1)])
    np.testing.assert_array_equal(result.weights[0], [2])


def test_a_non_finite_global_model_is_a_caller_error():
    with pytest.raises(ValueError, match="global model"):
        aggregate([f32(math.nan)], one_d(1))


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "mean"},
        {"trim_fraction": 0.5},
        {"trim_fraction": -0.1},
        {"byzantine": -1},
        {"byzantine": 1.5},
        {"byzantine": True},
        {"clip_multiplier": 0.5},
        {"clip_multiplier": math.inf},
        {"clip_floor": 0},
        {"refuse_multiplier": math.nan},
        {"max_growth": -1},
        {"clip_floor": "1"},
    ],
)
def test_bad_options_fail_at_start_up(options):
    with pytest.raises(ValueError):
        Aggregator(**options)


# --- refusals -------------------------------------------------------------------------------------------------------


def test_a_non_finite_aggregate_is_refused():
    # float64 values past float32's range: the mean is finite in float64 but not as a float32 model
    solutions = [("a", [np.array([1.0])], 1), ("b", [np.array([2.0])], 1), ("x", [np.array([1e300])], 1)]
    with pytest.raises(AggregationRefused) as refused:
        aggregate([np.array([0.0])], solutions, clip_multiplier=None)
    assert "NaN or infinite" in str(refused.value) and refused.value.suspects == ("x",)
    assert aggregate([np.array([0.0])], solutions).clipped.keys() == {"x"}  # clipped, it is harmless


def test_an_exploding_fedavg_is_refused_when_clipping_is_off():
    honest = [(p, [w + 0.1 for w in zeros()], 10) for p in "abcd"]
    attacker = ("x", [np.full(s, 1e30, np.float32) for s in SHAPES], 10)
    with pytest.raises(AggregationRefused) as refused:
        aggregate(zeros(), honest + [attacker], clip_multiplier=None)
    reason = str(refused.value)
    assert "\n" not in reason and "over 100 times the round's median update norm" in reason
    assert reason.startswith("fedavg of 5 solution(s) (a,b,c,d,x): ") and refused.value.suspects == ("x",)


def test_a_lone_exploding_solution_is_refused_against_the_global_model():
    start = [np.full(s, 0.5, np.float32) for s in SHAPES]
    for strategy in AGGREGATIONS:
        with pytest.raises(AggregationRefused, match="over 1000 times the global model's norm") as refused:
            aggregate(start, [("x", [np.full(s, 1e30, np.float32) for s in SHAPES], 1)], strategy)
        assert refused.value.suspects == ("x",)
    aggregate(start, [("a", [np.full(s, 50.0, np.float32) for s in SHAPES], 1)])  # a big honest step is fine


# --- one attacker among five ------------------------------------------------------------------------------------------


def honest_round(seed: int, count: int, noise: float = 0.05):
    """A global model and `count` honest solutions: one common step of norm 1 plus a little noise each."""
    rng = np.random.default_rng(seed)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    step = [rng.normal(size=s) for s in SHAPES]
    step = [d / update_norm(step, zeros()) for d in step]
    solutions = []
    for i in range(count):
        jitter = [rng.normal(size=s) for s in SHAPES]
        jitter = [j * noise / update_norm(jitter, zeros()) for j in jitter]
        solutions.append((f"h{i}", [(w + d + j).astype(np.float32) for w, d, j in zip(start, step, jitter)], 100))
    return start, step, solutions


def attack(kind: str, start, step, rng: np.random.Generator, scale: float = 1.0):
    """(weights, claimed samples) of an attacker."""
    if kind == "huge":
        return [np.full(s, 1e30, np.float32) for s in SHAPES], 100
    if kind == "zero":
        return zeros(), 100
    if kind == "flip":
        return [(w - 1e3 * d).astype(np.float32) for w, d in zip(start, step)], 100
    if kind == "samples":
        return [(w - 5 * d).astype(np.float32) for w, d in zip(start, step)], MAX_SAMPLES
    if kind == "random":
        return [(w + scale * rng.normal(size=w.shape)).astype(np.float32) for w in start], 100
    raise AssertionError(kind)


ATTACKS = ("huge", "zero", "flip", "samples")


def honest_range(solutions):
    stacks = [np.stack([w[i] for p, w, _ in solutions if p.startswith("h")]) for i in range(len(SHAPES))]
    return [s.min(axis=0) for s in stacks], [s.max(axis=0) for s in stacks]


def assert_within(weights, low, high):
    for w, lo, hi in zip(weights, low, high):
        assert np.all(w >= lo - 1e-6) and np.all(w <= hi + 1e-6)


@pytest.mark.parametrize("kind", ATTACKS)
@pytest.mark.parametrize("strategy", ROBUST)
def test_one_attacker_of_five_robust_rules_stay_in_the_honest_range(strategy, kind):
    start, step, solutions = honest_round(1, 4)
    weights, samples = attack(kind, start, step, np.random.default_rng(2))
    solutions.append(("x", weights, samples))
    result = aggregate(start, solutions, strategy)  # no sample cap: these rules ignore sample counts
    assert_within(result.weights, *honest_range(solutions))
    assert not result.rejected and all(p.startswith("h") or p == "x" for p in result.accepted)
    if strategy == "krum":
        assert result.used[0].startswith("h")


@pytest.mark.parametrize("kind", ATTACKS)
def test_one_attacker_of_five_fedavg_stays_finite_and_near_the_honest_mean(kind):
    start, step, solutions = honest_round(1, 4)
    honest_mean = old_fedavg([(w, n) for _, w, n in solutions])
    weights, samples = attack(kind, start, step, np.random.default_rng(2))
    solutions.append(("x", weights, samples))
    result = aggregate(start, solutions, max_samples=dict.fromkeys(("h0", "h1", "h2", "h3", "x"), 100))
    assert all(np.isfinite(w).all() for w in result.weights)
    # the attacker weighs 1/5 after the cap, and its step is clipped to 3 honest ones: at most 4/5 of a step off
    assert update_norm(result.weights, honest_mean) <= 0.8 * 1.05
    assert set(result.clipped) <= {"x"} and (kind == "samples") == bool(result.clamped)


def test_without_a_cap_a_huge_sample_claim_still_moves_fedavg_by_no_more_than_the_bound():
    start, step, solutions = honest_round(1, 4)
    weights, _ = attack("flip", start, step, None)
    result = aggregate(start, solutions + [("x", weights, MAX_SAMPLES)])
    assert result.update_norm <= result.norm_bound * (1 + 1e-6)


# --- properties -----------------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 7), st.lists(st.integers(1, 10**7), min_size=7, max_size=7))
def test_fedavg_equals_the_old_fedavg_when_nothing_is_clipped(seed, count, samples):
    rng = np.random.default_rng(seed)
    start = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    solutions = []
    for i in range(count):
        step = [rng.normal(size=s) for s in SHAPES]
        size = rng.uniform(1.0, 2.9) / update_norm(step, zeros())  # sizes within 2.9x: none is clipped
        solutions.append((f"p{i}", [(w + size * d).astype(np.float32) for w, d in zip(start, step)], samples[i]))
    result = aggregate(start, solutions)
    assert not result.clipped
    for got, want in zip(result.weights, old_fedavg([(w, n) for _, w, n in solutions])):
        np.testing.assert_array_equal(got, want)


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(3, 9), st.data())
def test_krum_selects_an_honest_solution_against_far_attackers(seed, n, data):
    f = default_byzantine(n)
    attackers = data.draw(st.integers(0, f), label="attackers")
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=6)
    points = [[centre + rng.normal(size=6) * 0.01] for _ in range(n - attackers)]
    collude = data.draw(st.booleans(), label="collude")
    far = rng.normal(size=6)
    for _ in range(attackers):
        direction = far if collude else rng.normal(size=6)
        distance = data.draw(st.floats(1.0, 1e30), label="distance")
        points.append([centre + direction / np.linalg.norm(direction) * distance])
    index, used_f = krum_select(squared_distances(points))
    assert used_f == f and index < n - attackers


@settings(max_examples=80, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 9), st.sampled_from(ROBUST), st.data())
def test_robust_rules_stay_within_the_honest_range(seed, n, strategy, data):
    limit = {"median": (n - 1) // 2, "trimmed-mean": trim_count(n, 0.2), "krum": default_byzantine(n)}[strategy]
    attackers = data.draw(st.integers(0, limit), label="attackers")
    start, step, solutions = honest_round(seed, n - attackers)
    rng = np.random.default_rng(seed + 1)
    for i in range(attackers):
        kind = data.draw(st.sampled_from(ATTACKS + ("random",)), label="kind")
        scale = data.draw(st.floats(1e-3, 1e30), label="scale")
        weights, samples = attack(kind, start, step, rng, scale)
        solutions.append((f"x{i}", weights, samples))
    result = aggregate(start, solutions, strategy)
    assert not set(result.clipped) & {p for p, _, _ in solutions if p.startswith("h")}
    assert_within(result.weights, *honest_range(solutions))
    if strategy == "krum":
        (chosen,) = result.used
        assert chosen.startswith("h")
        weights = dict((p, w) for p, w, _ in solutions)[chosen]
        for got, want in zip(result.weights, weights):
            np.testing.assert_array_equal(got, want)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(ATTACKS + ("random",)), st.floats(1e-3, 1e30))
def test_fedavg_with_one_capped_attacker_stays_near_the_honest_mean(seed, kind, scale):
    start, step, solutions = honest_round(seed, 4)
    honest_mean = old_fedavg([(w, n) for _, w, n in solutions])
    weights, samples = attack(kind, start, step, np.random.default_rng(seed), scale)
    result = aggregate(
        start, solutions + [("x", weights, samples)], max_samples=dict.fromkeys(("h0", "h1", "h2", "h3", "x"), 100)
    )
    assert all(np.isfinite(w).all() for w in result.weights)
    assert update_norm(result.weights, honest_mean) <= 0.8 * 1.05 + 1e-6


def test_fedavg_and_norms_work_block_by_block_with_the_same_results(monkeypatch):
    # A model larger than a block gives the same average and norms as one worked on whole (the block size only
    # bounds the float64 temporaries of a controller aggregating a large model).
    from peer.learning import aggregation

    rng = np.random.default_rng(5)
    solutions = [
        ([rng.normal(size=(50, 7)).astype(np.float32), rng.normal(size=3).astype(np.float32)], n) for n in (10, 30, 7)
    ]
    whole = fedavg(solutions)
    norm = aggregation.update_norm(solutions[0][0], solutions[1][0])
    monkeypatch.setattr(aggregation, "BLOCK", 16)
    assert all(np.array_equal(a, b) for a, b in zip(fedavg(solutions), whole))
    assert aggregation.update_norm(solutions[0][0], solutions[1][0]) == pytest.approx(norm, rel=1e-12)
    assert aggregation.update_norm(solutions[0][0], None) == pytest.approx(
        float(np.sqrt(sum(np.square(t.astype(np.float64)).sum() for t in solutions[0][0]))), rel=1e-12
    )
