"""Shamir's t-of-n secret sharing over the prime field of PRIME = 2^255 - 19.

A secret is an integer 0 <= s < PRIME (the secrets shared here are 32-byte values whose top bit is clear and that
are below PRIME: an X25519 private key and a self-mask seed, see `crypto.field_secret`). `split` draws a random
polynomial f of degree t-1 with f(0) = s and gives holder x the share f(x); any t shares give s back by Lagrange
interpolation at 0 (`combine`), and fewer than t say nothing about it (every value of s is equally likely).

Shares from the network may lie. `recover` finds the secret when a `check` (e.g. the secret's public key or digest,
which its owner published before sharing) tells a right candidate from a wrong one: it tries the shares' t-subsets in
a fixed order, at most `MAX_SUBSETS` of them, and names the holders whose shares are off the polynomial it found.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Mapping

from peer.learning.secagg.errors import SecAggError

PRIME = (1 << 255) - 19
SHARE_BYTES = 32  # a field element, little-endian
MAX_SUBSETS = 2048  # subsets tried by `recover` before it gives up on a set of shares with too many lies
Entropy = Callable[[int], bytes]


def field_element(entropy: Entropy) -> int:
    """A uniform element of the field (40 random bytes reduced modulo PRIME: off uniform by under 2^-64)."""
    return int.from_bytes(entropy(40), "little") % PRIME


def split(secret: int, holders: Iterable[int], threshold: int, entropy: Entropy) -> dict[int, int]:
    """Holder x -> its share f(x), for a fresh random polynomial f of degree threshold-1 with f(0) = secret. Holders
    are distinct x-coordinates 1 <= x < PRIME; threshold from 1 to their count."""
    xs = list(holders)
    if not 0 <= secret < PRIME:
        raise SecAggError("a secret must be a field element")
    if len(set(xs)) != len(xs) or not all(isinstance(x, int) and 0 < x < PRIME for x in xs):
        raise SecAggError("holders must be distinct x-coordinates from 1")
    if not 1 <= threshold <= len(xs):
        raise SecAggError(f"threshold {threshold} is not from 1 to the {len(xs)} holders")
    coefficients = [secret] + [field_element(entropy) for _ in range(threshold - 1)]

    def f(x: int) -> int:
        value = 0
        for c in reversed(coefficients):
            value = (value * x + c) % PRIME
        return value

    return {x: f(x) for x in xs}


def interpolate(points: Mapping[int, int], at: int = 0) -> int:
    """The value at `at` of the polynomial of degree len(points)-1 through `points` (x -> y)."""
    if not points:
        raise SecAggError("no shares to combine")
    # The sum of y_i * num_i / den_i kept as one fraction, so that a single inversion is paid, not one per point.
    total, common = 0, 1
    for xi, yi in points.items():
        numerator, denominator = 1, 1
        for xj in points:
            if xj != xi:
                numerator = numerator * (at - xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        total = (total * denominator + yi * numerator * common) % PRIME
        common = common * denominator % PRIME
    return total * pow(common, -1, PRIME) % PRIME


def combine(shares: Mapping[int, int], threshold: int) -> int:
    """The secret from at least `threshold` shares (x -> y); with more, the first `threshold` by x are used."""
    if len(shares) < threshold:
        raise SecAggError(f"{len(shares)} shares, {threshold} needed")
    if not all(0 < x < PRIME and 0 <= y < PRIME for x, y in shares.items()):
        raise SecAggError("a share is not a field element")
    chosen = dict(sorted(shares.items())[:threshold])
    return interpolate(chosen)


def recover(shares: Mapping[int, int], threshold: int, check: Callable[[int], bool]) -> tuple[int, tuple[int, ...]]:
    """(the secret, the x of every share off its polynomial) from shares of which some may lie, or SecAggError.
    `check(secret)` is True for the real secret only. Subsets of `threshold` shares are tried in order of x, at most
    MAX_SUBSETS of them; the liars must be few enough that some t-subset is honest."""
    valid = {x: y for x, y in shares.items() if isinstance(x, int) and 0 < x < PRIME and isinstance(y, int)}
    valid = {x: y for x, y in valid.items() if 0 <= y < PRIME}
    if len(valid) < threshold:
        raise SecAggError(f"{len(valid)} usable shares, {threshold} needed")
    for tried, subset in enumerate(itertools.combinations(sorted(valid), threshold)):
        if tried >= MAX_SUBSETS:
            break
        points = {x: valid[x] for x in subset}
        secret = interpolate(points)
        if check(secret):
            liars = tuple(x for x in sorted(shares) if x not in valid or interpolate(points, x) != valid[x])
            return secret, liars
    raise SecAggError(f"no {threshold} of the {len(valid)} shares give the committed secret")


def share_bytes(share: int) -> bytes:
    return share.to_bytes(SHARE_BYTES, "little")


def share_from_bytes(raw: bytes) -> int:
    if len(raw) != SHARE_BYTES:
        raise SecAggError(f"a share is {SHARE_BYTES} bytes, not {len(raw)}")
    value = int.from_bytes(raw, "little")
    if value >= PRIME:
        raise SecAggError("a share is not a field element")
    return value
