import itertools
import random

import pytest

from peer.learning.secagg.errors import SecAggError
from peer.learning.secagg.shamir import (
    PRIME,
    combine,
    interpolate,
    recover,
    share_bytes,
    share_from_bytes,
    split,
)


def entropy(seed):
    return random.Random(seed).randbytes


@pytest.mark.parametrize("n,t", [(2, 2), (3, 2), (5, 3), (7, 4), (7, 7)])
def test_every_subset_of_t_shares_gives_the_secret_and_no_smaller_one_does(n, t):
    secret = random.Random(n * 100 + t).randrange(PRIME)
    shares = split(secret, range(1, n + 1), t, entropy(t))
    for size in range(1, n + 1):
        for subset in itertools.combinations(sorted(shares), size):
            points = {x: shares[x] for x in subset}
            if size >= t:
                assert combine(points, t) == secret
            else:
                with pytest.raises(SecAggError, match="needed"):
                    combine(points, t)
                # the polynomial through fewer points misses the secret (it has the wrong degree)
                assert interpolate(points) != secret


def test_fewer_than_t_shares_are_consistent_with_every_secret():
    # t-1 shares and any candidate secret lie on one polynomial of degree t-1: the shares rule out no secret.
    t = 3
    shares = split(12345, [1, 2, 3, 4], t, entropy(0))
    known = {1: shares[1], 2: shares[2]}
    for candidate in (0, 1, 12345, PRIME - 1):
        through = {0: candidate, **known}
        third = interpolate(through, 3)
        assert interpolate({1: known[1], 2: known[2], 3: third}) == candidate


def test_a_share_is_spread_evenly_whatever_the_secret():
    # One share of a 2-of-n sharing, drawn 4000 times for two very different secrets: its top four bits fall in the
    # 16 bins alike (chi-square of the two histograms below the 0.001 critical value for 15 degrees of freedom).
    def histogram(secret, seed):
        rng = random.Random(seed)
        bins = [0] * 16
        for _ in range(4000):
            y = split(secret, [1, 2], 2, rng.randbytes)[1]
            bins[y * 16 // PRIME] += 1
        return bins

    a, b = histogram(0, 1), histogram(PRIME - 1, 2)
    chi2 = sum((x - y) ** 2 / (x + y) for x, y in zip(a, b) if x + y)
    assert chi2 < 37.7


def test_recover_names_the_liars_and_still_finds_the_secret():
    secret = 987654321
    shares = split(secret, range(1, 8), 4, entropy(3))
    lied = dict(shares)
    lied[2] = (shares[2] + 1) % PRIME
    lied[5] = 0
    found, liars = recover(lied, 4, lambda s: s == secret)
    assert found == secret and liars == (2, 5)


def test_recover_gives_up_when_the_liars_leave_no_honest_subset():
    shares = split(42, range(1, 6), 3, entropy(4))
    lied = {x: (y + 1000 + x * x) % PRIME if x <= 3 else y for x, y in shares.items()}  # 3 liars, 2 honest
    with pytest.raises(SecAggError, match="committed secret"):
        recover(lied, 3, lambda s: s == 42)


def test_recover_refuses_too_few_and_ignores_values_outside_the_field():
    shares = split(7, [1, 2, 3], 2, entropy(5))
    with pytest.raises(SecAggError, match="usable"):
        recover({1: shares[1], 2: PRIME}, 2, lambda s: s == 7)
    secret, liars = recover({1: shares[1], 2: PRIME + 5, 3: shares[3]}, 2, lambda s: s == 7)
    assert secret == 7 and liars == (2,)


@pytest.mark.parametrize(
    "secret,holders,t,match",
    [
        (PRIME, [1, 2], 2, "field element"),
        (-1, [1, 2], 2, "field element"),
        (1, [1, 1], 2, "distinct"),
        (1, [0, 2], 2, "distinct"),
        (1, [1, 2], 3, "threshold"),
        (1, [1, 2], 0, "threshold"),
    ],
)
def test_split_refuses_bad_arguments(secret, holders, t, match):
    with pytest.raises(SecAggError, match=match):
        split(secret, holders, t, entropy(0))


def test_shares_travel_as_32_bytes():
    assert share_from_bytes(share_bytes(PRIME - 1)) == PRIME - 1
    with pytest.raises(SecAggError, match="32 bytes"):
        share_from_bytes(b"\x00" * 31)
    with pytest.raises(SecAggError, match="field element"):
        share_from_bytes(share_bytes(PRIME))
