"""Fixed-point encoding of weighted updates as integers modulo 2^32, whose sum over the trainers never overflows.

A trainer's contribution is its update (its solution minus the round's global model, all tensors flattened into one
vector) times its weight `p = samples / weight_bound`, where `weight_bound` is a bound, public to the round, on the sum
of the trainers' sample counts (so the weights of any set of trainers add up to at most 1). Each coordinate is first
CLIPPED to [-clip, clip], then multiplied by p and by the fixed-point scale

    SCALE = 2^30 / clip        (one unit of the integers is clip / 2^30)

and rounded to the nearest integer, kept modulo 2^32. The sum of n such integers is, as a signed number, at most
2^30 (the weights add up to at most 1, every clipped value is at most clip) plus n/2 (the roundings) in magnitude:
below 2^31 for any n < 2^31, so reading the sum modulo 2^32 as a signed 32-bit integer gives it exactly.

The error bound (`Quantizer.error_bound`): for coordinates within the clip, the mean update the controller decodes,
sum / (SCALE * P) with P the total weight of the trainers summed, is off the exact weighted mean by at most
n * 0.5 / (SCALE * P) = n * clip / (2^31 * P) per coordinate (each of the n roundings is at most half a unit). With the
default clip of 8, 50 trainers and P = 1: 1.9e-7, about float32's resolution at 1. A coordinate beyond the clip
counts as +-clip: the clipping is the price of a fixed range, so choose a clip above any honest update's coordinate.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from peer.learning.secagg.errors import SecAggError

MODULUS = 1 << 32
SCALE_BITS = 30  # the fixed-point scale is 2^SCALE_BITS / clip; the sum of weighted values stays below 2^31
DEFAULT_CLIP = 8.0  # far above a round's honest update coordinate; costs nothing but resolution (8 / 2^30)
MAX_TRAINERS = 1 << 20  # the roundings add at most n/2 units: far below the 2^30 of headroom


def flatten(tensors: Sequence[np.ndarray]) -> np.ndarray:
    """All tensors' values as one float64 vector, in order (C order within each)."""
    if not tensors:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([np.asarray(t, dtype=np.float64).reshape(-1) for t in tensors])


def unflatten(vector: np.ndarray, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """The inverse of `flatten` for these shapes (views into `vector`)."""
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    if sum(sizes) != vector.size:
        raise SecAggError(f"a vector of {vector.size} values does not fill tensors of {sum(sizes)}")
    out, start = [], 0
    for shape, size in zip(shapes, sizes):
        out.append(vector[start : start + size].reshape(shape))
        start += size
    return out


@dataclass(frozen=True)
class Quantizer:
    """The round's fixed point: every trainer and the controller of one round attempt use the same one."""

    clip: float = DEFAULT_CLIP

    def __post_init__(self):
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not 0 < self.clip < 2**20:
            raise SecAggError(f"secure aggregation clip: expected a number above 0 and below 2^20, got {self.clip!r}")

    @property
    def scale(self) -> float:
        return float(1 << SCALE_BITS) / self.clip

    def encode(self, update: np.ndarray, weight: float) -> np.ndarray:
        """`update` (a float vector) times `weight` (0 <= weight <= 1) in fixed point, as uint32 modulo 2^32."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 <= weight <= 1.0:
            raise SecAggError(f"a trainer's weight must be from 0 to 1, got {weight!r}")
        values = np.asarray(update, dtype=np.float64).reshape(-1)
        if not np.isfinite(values).all():
            raise SecAggError("the update has NaN or infinite values")
        fixed = np.rint(np.clip(values, -self.clip, self.clip) * (float(weight) * self.scale)).astype(np.int64)
        return (fixed & (MODULUS - 1)).astype(np.uint32)  # modulo 2^32: -1 becomes 2^32 - 1

    def decode(self, total: np.ndarray, weight: float) -> np.ndarray:
        """The weighted mean update (float64) from the sum modulo 2^32 of the encodings of trainers whose weights add
        up to `weight` (0 < weight <= 1)."""
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0.0 < weight <= 1.0:
            raise SecAggError(f"the trainers' total weight must be above 0 and at most 1, got {weight!r}")
        total = np.asarray(total)
        if total.dtype != np.uint32:
            raise SecAggError(f"a sum modulo 2^32 must be uint32, not {total.dtype}")
        signed = total.view(np.int32).astype(np.float64)
        return signed / (self.scale * float(weight))

    def error_bound(self, trainers: int, weight: float) -> float:
        """The most `decode` can be off the exact weighted mean, per coordinate within the clip, for a sum of
        `trainers` encodings of total weight `weight`."""
        if not 0 < trainers <= MAX_TRAINERS:
            raise SecAggError(f"trainers: expected 1 to {MAX_TRAINERS}, got {trainers}")
        return trainers * 0.5 / (self.scale * weight)


def weight_of(samples: int, weight_bound: int) -> float:
    """A trainer's weight: its sample count over the round's bound on the total (so any set's weights add up to at
    most 1, as long as each trainer's count is at most its announced one and the bound is their sum)."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
        raise SecAggError(f"samples: expected a whole number >= 0, got {samples!r}")
    if isinstance(weight_bound, bool) or not isinstance(weight_bound, int) or weight_bound <= 0:
        raise SecAggError(f"weight bound: expected a whole number > 0, got {weight_bound!r}")
    if samples > weight_bound:
        raise SecAggError(f"{samples} samples exceed the round's weight bound {weight_bound}")
    return samples / weight_bound
