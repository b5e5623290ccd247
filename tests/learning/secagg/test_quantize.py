import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.learning.secagg.errors import SecAggError
from peer.learning.secagg.quantize import (
    DEFAULT_CLIP,
    MODULUS,
    SCALE_BITS,
    Quantizer,
    flatten,
    unflatten,
    weight_of,
)


def modular_sum(vectors):
    total = np.zeros(vectors[0].size, dtype=np.uint32)
    for v in vectors:
        total += v
    return total


@settings(max_examples=60, deadline=None)
@given(
    trainers=st.integers(1, 60),
    clip=st.sampled_from([0.5, 1.0, DEFAULT_CLIP, 100.0]),
    seed=st.integers(0, 2**32 - 1),
    spare=st.floats(0.0, 0.9),
)
def test_the_decoded_mean_is_within_the_stated_bound(trainers, clip, seed, spare):
    rng = np.random.default_rng(seed)
    samples = rng.integers(1, 1000, trainers)
    bound = int(samples.sum() / (1.0 - spare)) + 1  # any bound at least the total
    weights = [weight_of(int(s), bound) for s in samples]
    updates = [rng.uniform(-clip, clip, 257) for _ in range(trainers)]
    q = Quantizer(clip)
    total_weight = sum(weights)
    decoded = q.decode(modular_sum([q.encode(u, w) for u, w in zip(updates, weights)]), total_weight)
    exact = sum(u * w for u, w in zip(updates, weights)) / total_weight
    error = np.abs(decoded - exact).max()
    assert error <= q.error_bound(trainers, total_weight) * (1 + 1e-9)


def test_the_bound_is_not_loose_by_orders_of_magnitude():
    # One trainer, values half-way between two steps: the rounding error is half a step, the whole bound.
    q = Quantizer(1.0)
    step = 1.0 / q.scale
    values = np.array([0.5 * step, 2.5 * step, -0.5 * step])
    decoded = q.decode(q.encode(values, 1.0), 1.0)
    assert np.abs(decoded - values).max() == pytest.approx(q.error_bound(1, 1.0))


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_a_sum_at_the_extremes_does_not_overflow(sign):
    # 1000 trainers, every coordinate at the clip, weights adding up to exactly 1: the largest sum there can be.
    q = Quantizer(2.0)
    n = 1000
    vectors = [q.encode(np.full(5, sign * 2.0), 1 / n) for _ in range(n)]
    total = modular_sum(vectors)
    assert abs(int(total.view(np.int32)[0])) <= (1 << SCALE_BITS) + n // 2 < (1 << 31)
    assert q.decode(total, 1.0) == pytest.approx(np.full(5, sign * 2.0), abs=q.error_bound(n, 1.0))


def test_coordinates_beyond_the_clip_count_as_the_clip():
    q = Quantizer(1.0)
    decoded = q.decode(q.encode(np.array([5.0, -7.0, 0.25]), 1.0), 1.0)
    assert decoded == pytest.approx([1.0, -1.0, 0.25], abs=q.error_bound(1, 1.0))


def test_negative_values_wrap_modulo_2_32():
    q = Quantizer(1.0)
    encoded = q.encode(np.array([-1.0 / q.scale]), 1.0)
    assert encoded.dtype == np.uint32 and int(encoded[0]) == MODULUS - 1


@pytest.mark.parametrize("clip", [0, -1.0, float("nan"), float("inf"), True, "1", 2.0**20])
def test_a_bad_clip_is_refused(clip):
    with pytest.raises(SecAggError, match="clip"):
        Quantizer(clip)


@pytest.mark.parametrize("weight", [-0.1, 1.5, float("nan"), True])
def test_a_weight_outside_0_1_is_refused(weight):
    with pytest.raises(SecAggError, match="weight"):
        Quantizer().encode(np.zeros(3), weight)


def test_a_non_finite_update_is_refused():
    with pytest.raises(SecAggError, match="NaN or infinite"):
        Quantizer().encode(np.array([0.0, np.nan]), 0.5)


def test_decode_refuses_a_zero_weight_and_a_sum_of_another_dtype():
    q = Quantizer()
    with pytest.raises(SecAggError, match="total weight"):
        q.decode(np.zeros(3, np.uint32), 0.0)
    with pytest.raises(SecAggError, match="uint32"):
        q.decode(np.zeros(3, np.int64), 1.0)


def test_weight_of_refuses_counts_above_the_bound_and_bad_numbers():
    assert weight_of(30, 120) == 0.25
    with pytest.raises(SecAggError, match="exceed"):
        weight_of(121, 120)
    with pytest.raises(SecAggError, match="samples"):
        weight_of(-1, 120)
    with pytest.raises(SecAggError, match="weight bound"):
        weight_of(1, 0)


def test_flatten_and_unflatten_round_trip():
    tensors = [np.arange(12, dtype=np.float32).reshape(3, 4), np.array(7.0, np.float32), np.ones((2, 1, 2))]
    vector = flatten(tensors)
    assert vector.dtype == np.float64 and vector.size == 17
    back = unflatten(vector, [t.shape for t in tensors])
    assert all(np.array_equal(a, b) for a, b in zip(tensors, back))
    with pytest.raises(SecAggError, match="does not fill"):
        unflatten(vector[:-1], [t.shape for t in tensors])
