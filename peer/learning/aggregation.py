"""Aggregation of the trainers' solutions into the next global model, robust to trainers that lie: pure functions
(no I/O, no logging, no clock).

`Aggregator(strategy).aggregate(global_weights, solutions, max_samples)` runs one round attempt through five steps:

1. Admission. Solutions are taken in peer-id order, so arrival order never changes a result. A solution is
   rejected, with a one-line reason, and never crashes the call, when its tensors do not have the global model's
   count and shapes, are not real numbers, hold NaN or infinity, when its sample count is not a positive whole
   number, when `max_samples` is given and names no cap for its peer, or when its peer sent more than one (all
   copies go: we cannot tell which one is real).
2. Sample clamp. A claimed sample count above the peer's cap (what it announced when it joined) is lowered to the
   cap; otherwise one trainer claiming 2**53-1 samples outweighs everyone in FedAvg. `max_samples=None` uses the
   claims as they are (then only the norm bound limits what a liar moves).
3. Norm bound, on updates (solution minus the global model the round started from): the size of a step is what
   tells a poisoned solution from an honest one, not the size of the weights. The bound is adaptive:
   `max(clip_floor, clip_multiplier * lower median of this round's update norms)`, default 3x. The lower median
   (the middle value; of an even count the smaller middle one) cannot be raised by one attacker for any number of
   solutions >= 2, nor by any minority. An update above the bound is CLIPPED (scaled down to the bound, direction
   kept), not rejected: an honest trainer with an unusually large step (more data, a skewed shard) still counts,
   only less; a 1e30-weight solution becomes a step no larger than three typical ones, and a free rider that sends
   back zero weights (update = -global) likewise. An honest update below the bound passes bit for bit untouched.
   `clip_multiplier=None` turns clipping off.
4. The rule, chosen by name from `STRATEGIES`: `fedavg` (default; sample-weighted mean, McMahan et al. 2017),
   `median` (coordinate-wise, unweighted), `trimmed-mean` (coordinate-wise, unweighted, `trim_fraction` of the
   values cut at each end, default 0.2: one of 3 to 9, two of 10 to 14; see trim_count) and `krum` (Blanchard et
   al. 2017: the one solution closest to its n-f-2 nearest neighbours, f = `byzantine`, by default the most that
   n tolerates; too large an f is lowered, and of 1 or 2 solutions it takes the smaller update). Every rule is
   translation-equivariant (rule(x - g) = rule(x) - g), so it runs on the (clipped) weights and the step it takes
   is the same as on updates; running on weights keeps `fedavg` bit-identical to the old `rounds.fedavg` whenever
   nothing was clipped or clamped. Only `fedavg` uses sample counts: a median, a
   trimmed mean or Krum that weighted by a claimed count would hand the attacker back the lever they remove.
5. Refusal. `AggregationRefused` (one-line reason, the suspects, the rejections) is raised when no solution is
   usable, when the aggregate has NaN or infinity (in float32), when its update norm exceeds `refuse_multiplier`
   (100) times the round's lower-median update norm, or `max_growth` (1000) times the global model's own norm
   (counted as at least 1). With clipping on, no rule reaches the relative limit (a mean or a choice of clipped
   updates is no larger than the bound, 3x the median; a coordinate-wise median at most sqrt(n) times it): that
   check is the last line when clipping is off. The limit on growth is the only defence when every solution of
   the round is bad (e.g. the only one), which no relative bound can see.

The controller logs `AggregationResult.describe()` after a round and `str(refusal)` on a refusal, then retries the
round with other trainers, preferably not the refusal's suspects.
"""

from __future__ import annotations

import math
import numbers
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import NamedTuple

import numpy as np

# Tensors are worked on in blocks of this many values: float64 temporaries of 8 MB whatever the model's size, so a
# controller aggregating a model of hundreds of MB needs little more memory than the solutions it holds.
BLOCK = 1 << 20


def _blocks(*tensors):
    """The same span of each tensor's values, as float64, one block at a time."""
    flats = [np.asarray(t).reshape(-1) for t in tensors]
    for start in range(0, flats[0].size, BLOCK):
        yield [flat[start : start + BLOCK].astype(np.float64) for flat in flats]


# --- the old FedAvg, unchanged in its arithmetic ----------------------------------------------------------------------


def fedavg(solutions: Sequence[tuple[Sequence[np.ndarray], int]]) -> list[np.ndarray]:
    """Average each tensor over the solutions, weighting each solution by its sample count (McMahan et al.); in
    float64, block by block."""
    if not solutions:
        raise ValueError("fedavg needs at least one solution")
    total = sum(samples for _, samples in solutions)
    if total <= 0:
        raise ValueError("fedavg needs a positive total sample count")
    shapes = [tuple(t.shape for t in weights) for weights, _ in solutions]
    if any(s != shapes[0] for s in shapes):
        raise ValueError("fedavg: solutions have different tensor shapes")
    averaged = []
    for index in range(len(shapes[0])):
        out = np.empty(shapes[0][index], dtype=np.float32)
        flat = out.reshape(-1)
        start = 0
        for block in _blocks(*(weights[index] for weights, _ in solutions)):
            acc = np.zeros(block[0].size, dtype=np.float64)
            for values, (_, samples) in zip(block, solutions):
                acc += values * (samples / total)
            flat[start : start + acc.size] = acc
            start += acc.size
        averaged.append(out)
    return averaged


# --- the rules, on lists of tensors of equal shapes ---------------------------------------------------------------


def _stack(points: Sequence[Sequence[np.ndarray]], index: int) -> np.ndarray:
    return np.stack([np.asarray(p[index], dtype=np.float64) for p in points])


def median_rule(points: Sequence[Sequence[np.ndarray]]) -> list[np.ndarray]:
    """Coordinate-wise median of the solutions (of an even count, the mean of the two middle values), in float64."""
    if not points:
        raise ValueError("median needs at least one solution")
    return [np.asarray(np.median(_stack(points, i), axis=0)) for i in range(len(points[0]))]


def trim_count(n: int, fraction: float) -> int:
    """How many values a trimmed mean of n cuts at EACH end: floor(fraction * n), but at least one when fraction > 0
    and n >= 3 (so one outlier is always cut, also of 3 or 4 solutions), and never so many that nothing is left
    (at most (n - 1) // 2, which is 0 for n <= 2: a trimmed mean of one or two values is their mean)."""
    if not 0.0 <= fraction < 0.5:
        raise ValueError(f"trim fraction must be at least 0 and below 0.5, got {fraction}")
    cut = math.floor(fraction * n + 1e-9)  # 0.2 * 5 is 1, whatever the rounding
    if fraction > 0 and n >= 3:
        cut = max(cut, 1)
    return min(cut, (n - 1) // 2)


def trimmed_mean_rule(points: Sequence[Sequence[np.ndarray]], fraction: float = 0.2) -> list[np.ndarray]:
    """Coordinate-wise: sort each coordinate's values, drop `trim_count(n, fraction)` at each end, average the
    rest (unweighted), in float64."""
    if not points:
        raise ValueError("trimmed-mean needs at least one solution")
    n = len(points)
    cut = trim_count(n, fraction)
    return [np.asarray(np.sort(_stack(points, i), axis=0)[cut : n - cut].mean(axis=0)) for i in range(len(points[0]))]


def default_byzantine(n: int) -> int:
    """The largest f that Krum tolerates among n solutions (n > 2f + 2), at least 0: 0 for n <= 4, 1 for 5 or 6,
    2 for 7 or 8, ..."""
    return max(0, (n - 3) // 2)


def squared_distances(points: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
    """The n x n matrix of squared L2 distances between the solutions, over all their tensors (float64)."""
    n = len(points)
    distances = np.zeros((n, n), dtype=np.float64)
    if n == 0:
        return distances
    with np.errstate(over="ignore", invalid="ignore"):
        for index in range(len(points[0])):
            stack = _stack(points, index).reshape(n, -1)
            for i in range(n):
                distances[i] += np.square(stack - stack[i]).sum(axis=1)
    return distances


def krum_scores(distances: np.ndarray, byzantine: int) -> np.ndarray:
    """Each solution's Krum score: the sum of its squared distances to its n - f - 2 nearest other solutions."""
    n = len(distances)
    if byzantine < 0 or n <= 2 * byzantine + 2:
        raise ValueError(f"krum needs n > 2f + 2 solutions, got n={n}, f={byzantine}")
    neighbours = n - byzantine - 2
    scores = np.empty(n, dtype=np.float64)
    for i in range(n):
        others = np.delete(distances[i], i)
        scores[i] = np.sort(others)[:neighbours].sum()
    return scores


def krum_select(distances: np.ndarray, byzantine: int | None = None) -> tuple[int, int]:
    """(index of the solution Krum chooses, the f it used). f defaults to `default_byzantine(n)`; an f too large
    for n is lowered to `default_byzantine(n)`. Needs n >= 3; ties go to the lowest index."""
    n = len(distances)
    if n < 3:
        raise ValueError(f"krum needs at least 3 solutions, got {n}")
    f = default_byzantine(n) if byzantine is None or n <= 2 * byzantine + 2 else byzantine
    return int(np.argmin(krum_scores(distances, f))), f


# --- norms ------------------------------------------------------------------------------------------------------------


def update_norm(weights: Sequence[np.ndarray], global_weights: Sequence[np.ndarray] | None) -> float:
    """L2 norm of weights - global_weights over all tensors (of the weights alone for None), in float64, scaled so
    that large finite values do not overflow to infinity; block by block."""

    def diffs():
        for index, w in enumerate(weights):
            if global_weights is None:
                yield from (block for (block,) in _blocks(w))
            else:
                yield from (a - b for a, b in _blocks(w, global_weights[index]))

    with np.errstate(over="ignore", invalid="ignore"):
        scale = max((float(np.max(np.abs(d))) for d in diffs() if d.size), default=0.0)
        if scale == 0.0 or not math.isfinite(scale):
            return scale
        total = math.fsum(float(np.square(d / scale).sum()) for d in diffs())
    return scale * math.sqrt(total)


def _lower_median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


# --- strategies: the rules behind one signature, selected by name ----------------------------------------------------


class Choice(NamedTuple):
    """What a strategy returns: the new weights (any float dtype, the global model's shapes), the indices of the
    solutions it used, and a note for the log (or None)."""

    weights: list[np.ndarray]
    used: tuple[int, ...]
    note: str | None = None


# strategy(global weights, solution weights, samples, options) -> Choice; pure.
Strategy = Callable[[list[np.ndarray], list[Sequence[np.ndarray]], list[int], "Aggregator"], Choice]


def _fedavg(origin, points, samples, options) -> Choice:
    return Choice(fedavg(list(zip(points, samples))), tuple(range(len(points))))


def _median(origin, points, samples, options) -> Choice:
    return Choice(median_rule(points), tuple(range(len(points))))


def _trimmed_mean(origin, points, samples, options) -> Choice:
    cut = trim_count(len(points), options.trim_fraction)
    note = f"cut {cut} of {len(points)} values at each end" if cut else f"nothing to cut of {len(points)} values"
    return Choice(trimmed_mean_rule(points, options.trim_fraction), tuple(range(len(points))), note)


def _krum(origin, points, samples, options) -> Choice:
    n = len(points)
    if n < 3:
        # Krum needs a neighbour besides the one compared; of one or two, take the smaller step (the one closer to
        # the model we had): an attacker cannot push the model further than the honest trainer would.
        norms = [update_norm(p, origin) for p in points]
        index = min(range(n), key=lambda i: norms[i])
        note = None if n == 1 else "krum needs 3 solutions: took the smaller update of 2"
        return Choice(list(points[index]), (index,), note)
    index, f = krum_select(squared_distances(points), options.byzantine)
    wanted = options.byzantine
    note = f"f={f}" if wanted is None or wanted == f else f"f={f} (lowered from {wanted}: krum needs n > 2f+2, n={n})"
    return Choice(list(points[index]), (index,), note)


STRATEGIES: Mapping[str, Strategy] = MappingProxyType(
    {
        "fedavg": _fedavg,
        "median": _median,
        "trimmed-mean": _trimmed_mean,
        "krum": _krum,
    }
)
AGGREGATIONS = tuple(STRATEGIES)  # the names `--aggregation` accepts; the first is the default


# --- results and refusals -------------------------------------------------------------------------------------------


class Contribution(NamedTuple):
    """One trainer's solution; a plain (peer, weights, samples) tuple works as well."""

    peer: str
    weights: Sequence[np.ndarray]
    samples: int


class AggregationRefused(Exception):
    """No model can be made of this round attempt's solutions; `str()` is a one-line reason for the log.

    `suspects`: peers whose update norm alone broke a limit (largest first), for the controller to leave out of the
    retry; `rejected`: peer -> reason for the solutions refused at admission."""

    def __init__(self, reason: str, suspects: Sequence[str] = (), rejected: Mapping[str, str] | None = None):
        self.reason = " ".join(str(reason).split())
        super().__init__(self.reason)
        self.suspects = tuple(suspects)
        self.rejected = dict(rejected or {})


@dataclass(frozen=True)
class AggregationResult:
    weights: list[np.ndarray]  # the new global model, float32, the global model's shapes
    strategy: str
    used: tuple[str, ...]  # peers whose solutions went into the weights (krum: the chosen one)
    accepted: tuple[str, ...]  # peers admitted to the rule (used, plus those krum passed over)
    rejected: Mapping[str, str] = field(default_factory=dict)  # peer -> why its solution was refused
    clipped: Mapping[str, float] = field(default_factory=dict)  # peer -> its update norm before clipping
    clamped: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # peer -> (claimed samples, cap)
    norm_bound: float | None = None  # the update norm bound of this round (None: clipping off)
    update_norm: float = 0.0  # the norm of (new weights - global weights)
    notes: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for the log, e.g. `krum of 5 solutions (a,b,c,d,e) chose c, f=1; clipped e (update norm
        2.4e+32, bound 0.81); rejected x: ...`."""
        peers = ",".join(self.accepted)
        if self.strategy == "krum":
            line = f"krum of {len(self.accepted)} solution(s) ({peers}) chose {','.join(self.used)}"
        else:
            line = f"{self.strategy} of {len(self.accepted)} solution(s) ({peers})"
        parts = [line + "".join(f", {note}" for note in self.notes), f"update norm {self.update_norm:.3g}"]
        parts += [f"clipped {p} (update norm {n:.3g}, bound {self.norm_bound:.3g})" for p, n in self.clipped.items()]
        parts += [f"capped {p}'s samples {claimed} -> {cap}" for p, (claimed, cap) in self.clamped.items()]
        parts += [f"rejected {p}: {why}" for p, why in self.rejected.items()]
        return "; ".join(parts)


# --- admission --------------------------------------------------------------------------------------------------------


def _admit_weights(weights, shapes: list[tuple[int, ...]]) -> tuple[list[np.ndarray] | None, str | None]:
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        return None, "its weights are not a list of tensors"
    if len(weights) != len(shapes):
        return None, f"its tensors do not have the global model's shapes: {len(weights)} tensors, not {len(shapes)}"
    tensors = []
    for index, (tensor, shape) in enumerate(zip(weights, shapes)):
        try:
            array = np.asarray(tensor)
        except (TypeError, ValueError):
            return None, f"its tensor {index} is not an array of numbers"
        if array.dtype.kind not in "fiu":
            return None, f"its tensor {index} is not real numbers ({array.dtype})"
        if array.shape != shape:
            return None, (
                f"its tensors do not have the global model's shapes: tensor {index} is {array.shape}, not {shape}"
            )
        if not np.isfinite(array).all():
            return None, f"its tensor {index} has NaN or infinite values"
        tensors.append(array)
    return tensors, None


def _admit_samples(
    peer: str, samples, max_samples: Mapping[str, int] | None
) -> tuple[int | None, int | None, str | None]:
    """(samples to use, the cap if it lowered them, reason if refused)."""
    if isinstance(samples, bool) or not isinstance(samples, numbers.Integral):
        return None, None, "its sample count is not a whole number"
    samples = int(samples)
    if samples <= 0:
        return None, None, "it reports no samples"
    if max_samples is None:
        return samples, None, None
    cap = max_samples.get(peer)
    if cap is None:
        return None, None, "it announced no sample count when it joined"
    cap = int(cap)
    if cap <= 0:
        return None, None, "it announced no samples when it joined"
    return (cap, cap, None) if samples > cap else (samples, None, None)


# --- the aggregator -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Aggregator:
    """A strategy and its options; `aggregate()` is pure. Invalid options raise ValueError here, at start-up."""

    strategy: str = "fedavg"
    trim_fraction: float = 0.2  # trimmed-mean: cut per end (see trim_count)
    byzantine: int | None = None  # krum: f, the attackers assumed; None: the most n tolerates
    clip_multiplier: float | None = 3.0  # update norm bound = this x the round's lower-median update norm; None: off
    clip_floor: float = 0.01  # ... but at least this (for rounds whose typical update is ~0)
    refuse_multiplier: float = 100.0  # refuse an aggregate update this many times the round's median update
    max_growth: float = 1000.0  # refuse an aggregate update this many times the global model's norm

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"aggregation {self.strategy!r}: expected one of {', '.join(AGGREGATIONS)}")
        trim_count(3, self.trim_fraction)  # validates the fraction
        if self.byzantine is not None and (
            isinstance(self.byzantine, bool) or not isinstance(self.byzantine, int) or self.byzantine < 0
        ):
            raise ValueError(f"byzantine: expected a whole number >= 0, got {self.byzantine!r}")
        for name in ("clip_multiplier", "clip_floor", "refuse_multiplier", "max_growth"):
            value = getattr(self, name)
            if value is None and name == "clip_multiplier":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        if self.clip_multiplier is not None and self.clip_multiplier < 1:
            raise ValueError(
                f"clip_multiplier: must be at least 1 (below, it clips the round's median update), "
                f"got {self.clip_multiplier}"
            )

    def aggregate(
        self,
        global_weights: Sequence[np.ndarray],
        solutions: Sequence[tuple[str, Sequence[np.ndarray], int]],
        max_samples: Mapping[str, int] | None = None,
    ) -> AggregationResult:
        """The next global model from the round's solutions, or AggregationRefused. `global_weights`: the model the
        round started from (ours, so it must be finite: ValueError otherwise). `solutions`: (peer, weights,
        samples) each. `max_samples`: peer -> the sample count it announced when it joined; None: no cap."""
        origin = [np.asarray(t) for t in global_weights]
        if not all(np.isfinite(t).all() for t in origin):
            raise ValueError("the global model has NaN or infinite values")
        shapes = [t.shape for t in origin]

        entries = sorted(((peer, weights, samples) for peer, weights, samples in solutions), key=lambda s: str(s[0]))
        copies = Counter(peer for peer, _, _ in entries)
        rejected: dict[str, str] = {}
        clamped: dict[str, tuple[int, int]] = {}
        peers: list[str] = []
        tensors_of: list[list[np.ndarray]] = []
        samples_of: list[int] = []
        for peer, weights, samples in entries:
            if copies[peer] > 1:
                rejected[peer] = f"it sent {copies[peer]} solutions"
                continue
            tensors, reason = _admit_weights(weights, shapes)
            count, cap = None, None
            if tensors is not None:
                count, cap, reason = _admit_samples(peer, samples, max_samples)
            if tensors is None or count is None:
                rejected[peer] = reason or "refused"
                continue
            if cap is not None:
                clamped[peer] = (int(samples), cap)
            peers.append(peer)
            tensors_of.append(tensors)
            samples_of.append(count)
        if not peers:
            detail = "; ".join(f"{p}: {why}" for p, why in rejected.items())
            raise AggregationRefused(
                f"no usable solution ({detail})" if detail else "no solution to aggregate", rejected=rejected
            )

        norms = [update_norm(t, origin) for t in tensors_of]
        typical = _lower_median(norms)
        bound = None if self.clip_multiplier is None else max(self.clip_floor, self.clip_multiplier * typical)
        clipped: dict[str, float] = {}
        points: list[Sequence[np.ndarray]] = []
        for peer, tensors, norm in zip(peers, tensors_of, norms):
            if bound is not None and norm > bound:
                scale = bound / norm if math.isfinite(norm) else 0.0
                points.append([o + (t.astype(np.float64) - o) * scale for t, o in zip(tensors, origin)])
                clipped[peer] = norm
            else:
                points.append(tensors)

        with np.errstate(over="ignore", invalid="ignore"):  # overflow to float32 infinity is refused below
            choice = STRATEGIES[self.strategy](origin, points, samples_of, self)
            weights = [np.asarray(t, dtype=np.float32).reshape(shape) for t, shape in zip(choice.weights, shapes)]

        relative_limit = self.refuse_multiplier * max(typical, self.clip_floor)
        growth_limit = self.max_growth * max(update_norm(origin, None), 1.0)
        limit = min(relative_limit, growth_limit)
        suspects = [p for n, p in sorted(zip(norms, peers), key=lambda x: -x[0]) if n > limit]

        def refuse(reason: str):
            raise AggregationRefused(
                f"{self.strategy} of {len(peers)} solution(s) ({','.join(peers)}): {reason}", suspects, rejected
            )

        if not all(np.isfinite(t).all() for t in weights):
            refuse("the aggregate has NaN or infinite values")
        norm = update_norm(weights, origin)
        if norm > relative_limit:
            refuse(
                f"the aggregate's update norm {norm:.3g} is over {self.refuse_multiplier:g} times the round's "
                f"median update norm {typical:.3g}"
            )
        if norm > growth_limit:
            refuse(
                f"the aggregate's update norm {norm:.3g} is over {self.max_growth:g} times the global model's "
                f"norm {growth_limit / self.max_growth:.3g} (counted as at least 1)"
            )

        notes = (choice.note,) if choice.note else ()
        return AggregationResult(
            weights=weights,
            strategy=self.strategy,
            used=tuple(peers[i] for i in choice.used),
            accepted=tuple(peers),
            rejected=rejected,
            clipped=clipped,
            clamped=clamped,
            norm_bound=bound,
            update_norm=norm,
            notes=notes,
        )


def aggregate(
    global_weights: Sequence[np.ndarray],
    solutions: Sequence[tuple[str, Sequence[np.ndarray], int]],
    strategy: str = "fedavg",
    *,
    max_samples: Mapping[str, int] | None = None,
    **options,
) -> AggregationResult:
    """`Aggregator(strategy, **options).aggregate(global_weights, solutions, max_samples)`."""
    return Aggregator(strategy, **options).aggregate(global_weights, solutions, max_samples)
