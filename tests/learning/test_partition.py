import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from peer.learning.partition import (
    SCHEMES,
    PartitionError,
    class_histogram,
    partition,
    split_train_test,
)

NUM_CLASSES = 10


def shuffled_labels(per_class, seed=0):
    """Labels with per_class[c] samples of class c, in a shuffled order."""
    labels = np.repeat(np.arange(len(per_class)), per_class)
    return np.random.default_rng(seed).permutation(labels)


BALANCED = shuffled_labels([600] * NUM_CLASSES)
# Unequal class sizes, and a test set with the same class frequencies at a sixth of the size.
TEST_PER_CLASS = np.array([90, 110, 100, 95, 105, 80, 120, 100, 98, 102])
TRAIN = shuffled_labels(TEST_PER_CLASS * 6, seed=1)
TEST = shuffled_labels(TEST_PER_CLASS, seed=2)


def histograms(labels, parts, num_classes=NUM_CLASSES):
    return np.array([np.bincount(labels[p], minlength=num_classes) for p in parts])


def mean_max_class_share(labels, parts):
    counts = histograms(labels, parts)
    return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))


# --- every scheme ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("num_parts", [1, 5, 7])
def test_parts_are_disjoint_sorted_valid_and_nonempty(scheme, num_parts):
    parts = partition(TRAIN, num_parts, scheme, seed=3)
    assert len(parts) == num_parts
    for part in parts:
        assert part.dtype == np.int64 and part.ndim == 1 and len(part) > 0
        assert np.all(np.diff(part) > 0)
        assert part.min() >= 0 and part.max() < len(TRAIN)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_same_seed_same_parts_other_seed_other_parts(scheme):
    first = partition(TRAIN, 5, scheme, seed=11)
    again = partition(TRAIN.copy(), 5, scheme, seed=11)
    other = partition(TRAIN, 5, scheme, seed=12)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("scheme", ["random-equal", "random-sizes", "skewed", "dirichlet", "shards", "uniform"])
@pytest.mark.parametrize("num_parts,seed", [(5, 0), (7, 42)])
def test_train_and_test_parts_have_the_same_class_mix(scheme, num_parts, seed):
    train_counts = histograms(TRAIN, partition(TRAIN, num_parts, scheme, seed=seed))
    test_counts = histograms(TEST, partition(TEST, num_parts, scheme, seed=seed))
    for train_row, test_row in zip(train_counts, test_counts):
        test_size = test_row.sum()
        gap = np.abs(train_row / train_row.sum() - test_row / test_size)
        # Only rounding to whole samples separates them: about one test sample per class.
        assert np.all(gap <= 2.5 / test_size), (train_row, test_row)
    sizes_train = train_counts.sum(axis=1) / train_counts.sum()
    sizes_test = test_counts.sum(axis=1) / test_counts.sum()
    assert np.allclose(sizes_train, sizes_test, atol=0.01)


def test_explicit_num_classes_keeps_the_plan_when_a_class_is_missing():
    without_last = TEST[TEST != NUM_CLASSES - 1]
    parts = partition(without_last, 5, "dirichlet", seed=4, num_classes=NUM_CLASSES)
    reference = partition(TEST, 5, "dirichlet", seed=4)
    kept = histograms(without_last, parts)[:, :-1]
    full = histograms(TEST, reference)[:, :-1]
    assert np.array_equal(kept, full)


# --- sizes ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["iid", "random-equal"])
def test_equal_size_schemes_use_everything_and_differ_by_at_most_one(scheme):
    sizes = [len(p) for p in partition(TRAIN, 7, scheme, seed=2)]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == len(TRAIN)


def test_uniform_gives_every_part_the_same_count_of_every_class():
    parts = partition(TRAIN, 7, "uniform", seed=2)
    counts = histograms(TRAIN, parts)
    assert np.all(counts == np.bincount(TRAIN) // 7)


def test_random_sizes_are_unequal_above_the_floor_and_use_everything():
    for seed in range(5):
        sizes = np.array([len(p) for p in partition(TRAIN, 5, "random-sizes", seed=seed)])
        assert len(set(sizes.tolist())) > 1
        assert sizes.sum() == len(TRAIN)
        assert sizes.min() >= 0.01 * len(TRAIN) - 1


def test_skewed_parts_have_equal_size():
    sizes = {len(p) for p in partition(TRAIN, 7, "skewed", seed=2)}
    assert len(sizes) == 1


def test_shards_sizes_differ_by_at_most_two():
    sizes = [len(p) for p in partition(TRAIN, 7, "shards", seed=2)]
    assert max(sizes) - min(sizes) <= 2
    assert sum(sizes) == len(TRAIN)


@pytest.mark.parametrize("scheme", ["random-equal", "random-sizes", "dirichlet", "shards"])
def test_schemes_that_promise_to_use_every_sample_do(scheme):
    assert sum(len(p) for p in partition(TRAIN, 6, scheme, seed=9)) == len(TRAIN)


# --- class mixes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_parts", [5, 7, 13])
def test_skewed_two_major_classes_hold_eighty_percent(num_parts):
    counts = histograms(BALANCED, partition(BALANCED, num_parts, "skewed", seed=6))
    shares = counts / counts.sum(axis=1, keepdims=True)
    top_two = np.sort(shares, axis=1)[:, -2:]
    assert np.allclose(top_two, 0.4, atol=0.01)
    minor = np.sort(shares, axis=1)[:, :-2]
    assert np.allclose(minor, 0.2 / (NUM_CLASSES - 2), atol=0.01)
    # Majors are dealt evenly over the classes.
    times_major = np.bincount(np.argsort(shares, axis=1)[:, -2:].ravel(), minlength=NUM_CLASSES)
    assert times_major.max() - times_major.min() <= 1


def test_skewed_majors_depend_on_the_seed():
    def majors(seed):
        counts = histograms(BALANCED, partition(BALANCED, 5, "skewed", seed=seed))
        return [frozenset(np.argsort(row)[-2:].tolist()) for row in counts]

    assert majors(1) != majors(2)


def test_dirichlet_small_alpha_is_far_more_uneven_than_large_alpha():
    uneven = mean_max_class_share(BALANCED, partition(BALANCED, 10, "dirichlet", seed=1, alpha=0.1))
    even = mean_max_class_share(BALANCED, partition(BALANCED, 10, "dirichlet", seed=1, alpha=100))
    assert uneven > 0.5
    assert even < 0.15


def test_random_mixes_are_more_uneven_than_iid():
    iid = mean_max_class_share(BALANCED, partition(BALANCED, 10, "iid", seed=1))
    for scheme in ("random-equal", "random-sizes"):
        assert mean_max_class_share(BALANCED, partition(BALANCED, 10, scheme, seed=1)) > iid + 0.05


def test_shards_hold_few_classes():
    aligned = histograms(BALANCED, partition(BALANCED, 5, "shards", seed=3))
    assert np.all((aligned > 0).sum(axis=1) == 2)
    unaligned = histograms(TRAIN, partition(TRAIN, 7, "shards", seed=3))
    assert np.all((unaligned > 0).sum(axis=1) <= 4)


# --- property ---------------------------------------------------------------------------------------------------


@settings(max_examples=120, deadline=None)
@given(
    labels=st.lists(st.integers(0, 11), min_size=1, max_size=200),
    scheme=st.sampled_from(SCHEMES),
    data=st.data(),
    seed=st.integers(0, 2**32),
    alpha=st.floats(0.01, 1000),
)
def test_any_input_gives_a_valid_nonempty_partition(labels, scheme, data, seed, alpha):
    labels = np.array(labels)
    num_parts = data.draw(st.integers(1, len(labels)))
    parts = partition(labels, num_parts, scheme, seed=seed, alpha=alpha)
    assert len(parts) == num_parts
    assert all(len(p) > 0 and p.dtype == np.int64 and np.all(np.diff(p) > 0) for p in parts)
    joined = np.concatenate(parts)
    assert len(np.unique(joined)) == len(joined) and joined.min() >= 0 and joined.max() < len(labels)


# --- errors -----------------------------------------------------------------------------------------------------


def test_unknown_scheme_lists_the_valid_ones():
    with pytest.raises(PartitionError, match="valid schemes: iid, uniform, .*shards"):
        partition(TRAIN, 3, "noniid")


@pytest.mark.parametrize("num_parts,message", [(0, "at least 1"), (-2, "at least 1"), (10**6, "cannot split")])
def test_bad_number_of_parts(num_parts, message):
    with pytest.raises(PartitionError, match=message):
        partition(TRAIN, num_parts)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan")])
def test_alpha_must_be_positive(alpha):
    with pytest.raises(PartitionError, match="alpha"):
        partition(TRAIN, 3, "dirichlet", alpha=alpha)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"labels": np.zeros((4, 2), int)}, "1-D integer"),
        ({"labels": np.array([0.5, 1.0])}, "1-D integer"),
        ({"labels": np.array([0, -1, 2])}, "non-negative"),
        ({"labels": np.array([0, 1, 7]), "num_classes": 5}, "does not fit"),
        ({"labels": np.array([0, 1, 2]), "seed": -1}, "seed"),
    ],
)
def test_bad_labels_or_seed(kwargs, message):
    labels = kwargs.pop("labels")
    with pytest.raises(PartitionError, match=message):
        partition(labels, 2, **kwargs)


# --- helpers ----------------------------------------------------------------------------------------------------


def test_class_histogram():
    assert class_histogram(np.array([0, 2, 2, 1, 2], dtype=np.uint8), 4) == [1, 1, 3, 0]
    assert all(type(n) is int for n in class_histogram(TEST, NUM_CLASSES))
    with pytest.raises(PartitionError):
        class_histogram(np.array([0, 4]), 4)


def test_split_train_test_is_stratified_disjoint_and_complete():
    train, test = split_train_test(TEST, 0.2, seed=7)
    assert len(np.intersect1d(train, test)) == 0
    assert len(train) + len(test) == len(TEST)
    assert len(test) == 200
    assert np.all(np.abs(np.bincount(TEST[test]) - TEST_PER_CLASS * 0.2) < 1)
    again = split_train_test(TEST, 0.2, seed=7)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(split_train_test(TEST, 0.2, seed=8)[1], test)
    tiny_train, tiny_test = split_train_test(np.arange(10), 0.2)
    assert len(tiny_train) == 8 and len(tiny_test) == 2
    for fraction in (0, 1, 1.5):
        with pytest.raises(PartitionError, match="test_fraction"):
            split_train_test(TEST, fraction)


def test_shards_is_the_fedavg_papers_pathological_split_at_100_peers():
    # McMahan et al. 2017: the 60,000 training samples sorted by label, cut into 200 shards of 300, 2 per peer; the
    # test set alike (200 shards of 50), so a peer is tested on the classes it trains on.
    rng = np.random.default_rng(3)
    train, test = rng.permutation(np.repeat(np.arange(10), 6000)), rng.permutation(np.repeat(np.arange(10), 1000))
    train_parts = partition(train, 100, "shards", seed=42, num_classes=10)
    test_parts = partition(test, 100, "shards", seed=42, num_classes=10)
    shard_classes = []
    for train_part, test_part in zip(train_parts, test_parts):
        counts = np.bincount(train[train_part], minlength=10)
        assert len(train_part) == 600 and set(counts[counts > 0]) <= {300, 600}  # two whole one-class shards
        shard_classes += [c for c in range(10) for _ in range(counts[c] // 300)]
        test_counts = np.bincount(test[test_part], minlength=10)
        assert len(test_part) == 100 and np.array_equal(test_counts * 6, counts)  # the same classes, in the same mix
    assert sorted(shard_classes) == sorted(np.repeat(np.arange(10), 20))  # 200 shards, 20 of each class
    assert sum(1 for p in train_parts if len(np.unique(train[p])) == 2) >= 90  # most peers hold two classes
