"""Split a labelled dataset into disjoint parts, one per peer, by a named scheme.

Train and test are partitioned alike: a peer calls `partition(train_labels, N, scheme, seed=s)` and
`partition(test_labels, N, scheme, seed=s)` and takes part K of each. Every random choice that decides which
classes, what class proportions or what sizes a part gets is drawn from `np.random.default_rng(seed)` before the
labels are looked at, so it depends only on (scheme, seed, num_parts, num_classes, alpha). The labels decide only
which individual samples fill those quotas (and, through the class counts, how quotas round to whole samples).
So when train and test have the same class frequencies, part K of the test set has the class mix of part K of the
training set. Pass `num_classes` explicitly when a label array might lack the highest class, or the two arrays
could get different plans.

Promises of the schemes (N = len(labels), K = num_parts, C = num_classes, n_c = samples of class c):

- ``iid``: a seeded shuffle cut into K parts whose sizes differ by at most 1.
- ``uniform``: every part gets exactly n_c // K samples of class c, for every class, so all parts have the same
  size and the same class counts; the n_c % K samples left over per class are not used.
- ``random-equal``: every part gets a random class mix drawn from the seed, and part sizes differ by at most 1.
  Every sample is used.
- ``random-sizes``: random class mix drawn from the seed, and part k gets a share s_k of the data, drawn from the
  seed (Dirichlet(1) over the parts, plus a floor of min(1%, 0.5/K) of the data each). Every sample is used.
- ``skewed``: each part has 2 "major" classes chosen from the seed that hold 80% of its samples (40% each); the
  other 20% are spread evenly over the remaining classes. Majors are dealt out evenly, so every class is a major
  of floor(2K/C) or ceil(2K/C) parts. All parts have the same size, the largest for which every part can get
  exactly that mix; samples beyond it are not used. Classes missing from the labels are skipped (the mix is
  renormalised over the classes present). With C <= 2 every class is a major.
- ``dirichlet``: for each class c, the proportions of class c going to the K parts are drawn from
  Dirichlet(alpha, ..., alpha): small alpha (0.1) gives each class to a few parts, large alpha (100) is nearly
  iid. Every sample is used; each part's count of class c is within 1 of n_c times its proportion.
- ``shards``: the samples sorted by label (seeded order within a class) are cut into 2K contiguous shards whose
  sizes differ by at most 1, and each part gets 2 of them, chosen by a seeded permutation. When a shard is no
  larger than the smallest class, a part holds at most 4 classes.

For every scheme the parts are disjoint, sorted int64 index arrays, and none is empty: a part left empty (only
possible with very few samples per part) takes an unused sample, or else one from the largest part.
"""

from __future__ import annotations

import numpy as np

SCHEMES = ("iid", "uniform", "random-equal", "random-sizes", "skewed", "dirichlet", "shards")
DEFAULT_ALPHA = 0.5

SKEWED_MAJOR_CLASSES = 2
SKEWED_MAJOR_SHARE = 0.8
RANDOM_MIX_CONCENTRATION = 1.0
RANDOM_SIZES_FLOOR = 0.01


class PartitionError(ValueError):
    """The partition cannot be made as asked (bad scheme, counts or parameters)."""


def partition(
    labels: np.ndarray,
    num_parts: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    alpha: float = DEFAULT_ALPHA,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """num_parts disjoint, sorted int64 index arrays into `labels` (see the module docstring for the schemes)."""
    labels, num_classes = _check(labels, num_parts, scheme, seed, alpha, num_classes)
    # Two independent streams: the plan must not shift when the number of samples (and so the number of
    # draws needed to pick them) changes between a train and a test array.
    plan_rng = np.random.default_rng(seed)
    sample_rng = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])

    if scheme == "iid":
        parts = np.array_split(sample_rng.permutation(len(labels)), num_parts)
    elif scheme == "shards":
        parts = _shards(labels, num_parts, num_classes, plan_rng, sample_rng)
    else:
        # The plan is drawn before the class counts are consulted; see each planner.
        plan = _PLANNERS[scheme](plan_rng, num_parts, num_classes, alpha)
        counts = plan(np.bincount(labels, minlength=num_classes))
        parts = _fill_quotas(labels, counts, num_classes, sample_rng)
    return _ensure_nonempty([np.sort(np.asarray(p, dtype=np.int64)) for p in parts], labels)


def class_histogram(labels: np.ndarray, num_classes: int) -> list[int]:
    """Samples per class, as plain ints (JSON-ready)."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise PartitionError(f"labels must lie in 0..{num_classes - 1}, found {labels.min()}..{labels.max()}")
    return [int(n) for n in np.bincount(labels.astype(np.int64).ravel(), minlength=num_classes)]


def split_train_test(labels: np.ndarray, test_fraction: float, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified, seeded split of one labelled set into (train, test) sorted int64 index arrays.

    Stratified so both halves keep the class frequencies of the whole, which is what lets `partition` give a
    peer's train and test parts the same class mix. round(N * test_fraction) samples go to test, shared among the
    classes by largest remainder, so each class sends within 1 of n_c * test_fraction.
    """
    labels = np.asarray(labels)
    if not 0 < test_fraction < 1:
        raise PartitionError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or (labels.size and labels.min() < 0):
        raise PartitionError("labels must be a 1-D array of non-negative integers")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PartitionError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    classes, class_counts = np.unique(labels, return_counts=True)
    test_counts = _largest_remainder(class_counts * test_fraction, int(round(len(labels) * test_fraction)))
    test_parts = []
    for cls, test_count in zip(classes, test_counts):
        members = rng.permutation(np.flatnonzero(labels == cls))
        test_parts.append(members[:test_count])
    test = np.sort(np.concatenate(test_parts)) if test_parts else np.empty(0, np.int64)
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), test)
    if len(train) == 0 or len(test) == 0:
        raise PartitionError(
            f"a test fraction of {test_fraction} leaves an empty train or test set from {len(labels)} samples"
        )
    return train, test.astype(np.int64)


# --- checks -----------------------------------------------------------------------------------------------------


def _check(labels, num_parts, scheme, seed, alpha, num_classes):
    if scheme not in SCHEMES:
        raise PartitionError(f"unknown partition scheme {scheme!r}; valid schemes: {', '.join(SCHEMES)}")
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise PartitionError(f"labels must be a 1-D integer array, got shape {labels.shape} of {labels.dtype}")
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)):
        raise PartitionError(f"num_parts must be an integer, got {num_parts!r}")
    if num_parts < 1:
        raise PartitionError(f"num_parts must be at least 1, got {num_parts}")
    if num_parts > len(labels):
        raise PartitionError(f"cannot split {len(labels)} samples into {num_parts} non-empty parts")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise PartitionError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(alpha, (int, float, np.integer, np.floating)) or not (alpha > 0 and np.isfinite(alpha)):
        raise PartitionError(f"alpha (the Dirichlet concentration) must be a positive number, got {alpha}")
    if labels.min() < 0:
        raise PartitionError(f"labels must be non-negative, found {labels.min()}")
    if num_classes is None:
        num_classes = int(labels.max()) + 1
    elif labels.max() >= num_classes:
        raise PartitionError(f"label {labels.max()} does not fit num_classes={num_classes}")
    return labels.astype(np.int64, copy=False), int(num_classes)


# --- planners: (plan_rng, K, C, alpha) -> (class_counts -> int counts[C, K]) ------------------------------------
# Each draws everything random up front and returns a deterministic function of the class counts.


def _uniform_counts(plan_rng, num_parts, num_classes, alpha):
    def counts(class_counts):
        return np.repeat((class_counts // num_parts)[:, None], num_parts, axis=1)

    return counts


def _random_mix_weights(plan_rng, num_parts, num_classes):
    # Column k is part k's unbalanced wish for a class mix; the floor keeps the scaling below well defined.
    wishes = plan_rng.dirichlet(np.full(num_classes, RANDOM_MIX_CONCENTRATION), size=num_parts).T
    return np.maximum(wishes, 1e-9)


def _random_equal_counts(plan_rng, num_parts, num_classes, alpha):
    weights = _random_mix_weights(plan_rng, num_parts, num_classes)
    shares = np.full(num_parts, 1.0 / num_parts)
    return _scaled_mix_counts(weights, shares)


def _random_sizes_counts(plan_rng, num_parts, num_classes, alpha):
    weights = _random_mix_weights(plan_rng, num_parts, num_classes)
    floor = min(RANDOM_SIZES_FLOOR, 0.5 / num_parts)
    shares = floor + (1 - floor * num_parts) * plan_rng.dirichlet(np.ones(num_parts))
    return _scaled_mix_counts(weights, shares)


def _scaled_mix_counts(weights, shares):
    """Quotas that use every sample, give part k a share shares[k], and follow the random wishes otherwise.

    Sinkhorn scaling fits the wishes to the class frequencies and the part shares. The result is a smooth
    function of the class frequencies, so two label arrays with equal frequencies get the same mixes.
    """

    def counts(class_counts):
        total = int(class_counts.sum())
        frequencies = class_counts / total
        joint = _sinkhorn(weights, frequencies, shares)
        part_sizes = _largest_remainder(shares * total, total)
        part_sizes = _at_least_one_each(part_sizes)
        return _round_matrix(joint * total, class_counts, part_sizes)

    return counts


def _skewed_counts(plan_rng, num_parts, num_classes, alpha):
    majors = _deal_majors(plan_rng, num_parts, num_classes)
    # Minor classes all want the same fractional share; a fixed tie order would round the same low-numbered
    # classes up in every part and exhaust them first.
    tiebreaks = plan_rng.random((num_parts, num_classes))
    mixes = np.zeros((num_classes, num_parts))
    num_minor = num_classes - majors.shape[1]
    major_share = SKEWED_MAJOR_SHARE if num_minor else 1.0
    for part, part_majors in enumerate(majors):
        if num_minor:
            mixes[:, part] = (1 - major_share) / num_minor
        mixes[part_majors, part] = major_share / len(part_majors)

    def counts(class_counts):
        present = class_counts > 0
        wanted = mixes * present[:, None]
        wanted /= wanted.sum(axis=0, keepdims=True)
        demand = wanted.sum(axis=1)
        limits = class_counts[present] / demand[present]
        size = int(np.floor(limits.min()))
        while size > 0:
            quotas = np.stack(
                [_largest_remainder(wanted[:, k] * size, size, tiebreaks[k]) for k in range(num_parts)], axis=1
            )
            if np.all(quotas.sum(axis=1) <= class_counts):
                return quotas
            size -= 1  # rounding up pushed a class past its supply; a slightly smaller part always fits
        return np.zeros((num_classes, num_parts), dtype=np.int64)

    return counts


def _deal_majors(plan_rng, num_parts, num_classes):
    """Major classes per part (rows), dealt from seeded permutations so each class is a major about equally often."""
    per_part = min(SKEWED_MAJOR_CLASSES, num_classes)
    dealt: list[int] = []
    while len(dealt) < num_parts * per_part:
        deck = list(plan_rng.permutation(num_classes))
        # A part's majors must differ: when a new deck would pair its first card with the part's first card,
        # rotate the deck.
        if len(dealt) % per_part and deck[0] in dealt[-(len(dealt) % per_part) :]:
            deck = deck[1:] + deck[:1]
        dealt.extend(int(c) for c in deck)
    return np.array(dealt[: num_parts * per_part], dtype=np.int64).reshape(num_parts, per_part)


def _dirichlet_counts(plan_rng, num_parts, num_classes, alpha):
    proportions = plan_rng.dirichlet(np.full(num_parts, float(alpha)), size=num_classes)

    def counts(class_counts):
        return np.stack(
            [_largest_remainder(proportions[c] * class_counts[c], int(class_counts[c])) for c in range(num_classes)]
        )

    return counts


_PLANNERS = {
    "uniform": _uniform_counts,
    "random-equal": _random_equal_counts,
    "random-sizes": _random_sizes_counts,
    "skewed": _skewed_counts,
    "dirichlet": _dirichlet_counts,
}


# --- filling quotas ---------------------------------------------------------------------------------------------


def _class_grouped_order(labels, sample_rng):
    """All indices, grouped by class in class order, in a seeded random order inside each class."""
    shuffled = sample_rng.permutation(len(labels))
    return shuffled[np.argsort(labels[shuffled], kind="stable")]


def _fill_quotas(labels, counts, num_classes, sample_rng):
    order = _class_grouped_order(labels, sample_rng)
    class_starts = np.concatenate([[0], np.cumsum(np.bincount(labels, minlength=num_classes))])
    parts: list[list[np.ndarray]] = [[] for _ in range(counts.shape[1])]
    for cls in range(num_classes):
        members = order[class_starts[cls] : class_starts[cls + 1]]
        cuts = np.cumsum(counts[cls])
        for part, (start, stop) in enumerate(zip(np.concatenate([[0], cuts[:-1]]), cuts)):
            parts[part].append(members[start:stop])
    return [np.concatenate(pieces) if pieces else np.empty(0, np.int64) for pieces in parts]


def _shards(labels, num_parts, num_classes, plan_rng, sample_rng):
    assignment = plan_rng.permutation(2 * num_parts).reshape(num_parts, 2)
    # Cut at rounded quantiles (not array_split's "extras first") so shard j covers the same stretch of the
    # label distribution in a train and a test array.
    cuts = np.round(np.arange(1, 2 * num_parts) * len(labels) / (2 * num_parts)).astype(np.int64)
    pieces = np.split(_class_grouped_order(labels, sample_rng), cuts)
    return [np.concatenate([pieces[a], pieces[b]]) for a, b in assignment]


def _ensure_nonempty(parts, labels):
    used = np.zeros(len(labels), dtype=bool)
    for p in parts:
        used[p] = True
    unused = list(np.flatnonzero(~used))
    for k, p in enumerate(parts):
        if len(p):
            continue
        if unused:
            taken = unused.pop(0)
        else:
            # Take from the largest part's most common class, which disturbs its mix the least.
            donor = max(range(len(parts)), key=lambda j: (len(parts[j]), -j))
            donor_labels = labels[parts[donor]]
            common = np.bincount(donor_labels).argmax()
            taken = parts[donor][np.flatnonzero(donor_labels == common)[-1]]
            parts[donor] = parts[donor][parts[donor] != taken]
        parts[k] = np.array([taken], dtype=np.int64)
    return parts


# --- arithmetic -------------------------------------------------------------------------------------------------


def _largest_remainder(targets, total, tiebreak=None):
    """Non-negative ints summing to `total`, each within 1 of its (non-negative) target.

    Equal remainders go to the lower `tiebreak` value first (default: the earlier index).
    """
    targets = np.asarray(targets, dtype=float)
    if total == 0 or targets.sum() <= 0:
        out = np.zeros(len(targets), dtype=np.int64)
        out[:1] = total
        return out
    targets = targets * (total / targets.sum())
    out = np.floor(targets).astype(np.int64)
    missing = total - int(out.sum())
    if missing > 0:
        if tiebreak is None:
            tiebreak = np.arange(len(targets))
        out[np.lexsort((tiebreak, -(targets - out)))[:missing]] += 1
    return out


def _at_least_one_each(sizes):
    sizes = sizes.copy()
    for k in np.flatnonzero(sizes == 0):
        sizes[int(np.argmax(sizes))] -= 1
        sizes[k] = 1
    return sizes


def _sinkhorn(weights, row_sums, col_sums, iterations=2000, tolerance=1e-12):
    """Scale rows and columns of a positive matrix until its margins are row_sums and col_sums."""
    joint = weights * (row_sums / weights.sum(axis=1))[:, None]
    for _ in range(iterations):
        joint *= col_sums / joint.sum(axis=0)
        row_totals = joint.sum(axis=1)
        joint *= np.divide(row_sums, row_totals, out=np.zeros_like(row_sums), where=row_totals > 0)[:, None]
        if np.abs(joint.sum(axis=0) - col_sums).max() < tolerance:
            break
    return joint


def _round_matrix(targets, row_totals, col_totals):
    """Integer matrix with exactly the given row and column totals, close to the real-valued targets.

    Row targets must sum to the row totals (so floors never overshoot a row). Floors first, then the missing
    units go to the cells with the largest fractional parts while both their row and column still lack units.
    """
    out = np.floor(targets).astype(np.int64)
    row_missing = np.asarray(row_totals, dtype=np.int64) - out.sum(axis=1)
    col_missing = np.asarray(col_totals, dtype=np.int64) - out.sum(axis=0)
    fractions = (targets - np.floor(targets)).ravel()
    for flat in np.argsort(-fractions, kind="stable"):
        r, c = divmod(int(flat), targets.shape[1])
        if row_missing[r] > 0 and col_missing[c] > 0:
            out[r, c] += 1
            row_missing[r] -= 1
            col_missing[c] -= 1
    for r in np.flatnonzero(row_missing > 0):
        while row_missing[r] > 0:
            c = int(np.argmax(col_missing))
            if col_missing[c] > 0:
                out[r, c] += 1
                col_missing[c] -= 1
                row_missing[r] -= 1
            else:
                break
    # A column total can sit below its floors (a part bumped to its minimum of one sample took a unit from the
    # largest part); move such units, within a row, to columns still short.
    for c in np.flatnonzero(col_missing < 0):
        while col_missing[c] < 0:
            short = int(np.argmax(col_missing))
            donor_row = int(np.argmax(out[:, c]))
            out[donor_row, c] -= 1
            out[donor_row, short] += 1
            col_missing[c] += 1
            col_missing[short] -= 1
    return out
