"""Client-level DP's pieces: clipping bounds every update, the noise has the stated scale (statistical tests with a
fixed seed), and the epsilon reported is the accountant library's for the same parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peer.learning.privacy import (
    PLD_DISCRETIZATION,
    Ledger,
    Privacy,
    clip,
    epsilon,
    gaussian_noise,
    l2_norm,
    noised_mean,
    privatize_solution,
    update_of,
)

dp_accounting = pytest.importorskip("dp_accounting")  # a requirement: CI (where a skip fails) always has it


def model(rng, scale=1.0):
    return [rng.normal(0, scale, (20, 30)).astype(np.float32), rng.normal(0, scale, 7).astype(np.float32)]


def test_every_clipped_update_is_within_the_bound_and_keeps_its_direction():
    rng = np.random.default_rng(1)
    origin = model(rng)
    for scale in (1e-4, 0.01, 0.3, 10.0, 1e6):
        for _ in range(20):
            weights = [o + rng.normal(0, scale, o.shape).astype(np.float32) for o in origin]
            update = update_of(origin, weights)
            clipped, before = clip(update, 1.5)
            assert l2_norm(clipped) <= 1.5 * (1 + 1e-12) and math.isclose(before, l2_norm(update))
            if before <= 1.5:
                assert all(np.array_equal(a, b) for a, b in zip(clipped, update))  # untouched below the bound
            else:
                cosine = sum(float((a * b).sum()) for a, b in zip(clipped, update)) / (l2_norm(clipped) * before)
                assert cosine == pytest.approx(1.0)
            # what a trainer sends: the update (float32 rounding aside) within the bound too
            sent, _ = privatize_solution(origin, weights, 1.5)
            assert l2_norm(update_of(origin, sent)) <= 1.5 * (1 + 1e-5)
    zero, norm = clip([np.zeros(3)], 1.0)
    assert norm == 0.0 and np.all(zero[0] == 0)


def test_the_noise_has_standard_deviation_z_times_c():
    # 400,000 draws: the sample std is within 0.5% of the stated one far beyond chance (its relative standard
    # error is about 1 / sqrt(2n) = 0.11%), and the mean within 5 standard errors of 0.
    rng = np.random.default_rng(2026)
    z, c = 1.3, 0.7
    noise = np.concatenate([n.ravel() for n in gaussian_noise([(400, 500), (200, 1000)], z * c, rng)])
    assert noise.size == 400_000
    assert abs(noise.std() / (z * c) - 1) < 0.005
    assert abs(noise.mean()) < 5 * z * c / math.sqrt(noise.size)
    # Kurtosis of a Gaussian is 3: the noise is Gaussian, not merely of the right variance.
    assert abs(((noise / noise.std()) ** 4).mean() - 3) < 0.05


def test_the_central_aggregate_is_the_noised_sum_over_the_chosen_trainers():
    rng = np.random.default_rng(7)
    origin = model(rng)
    total = [np.full(o.shape, 0.25) for o in origin]  # the sum of the clipped updates
    z, c, trainers = 0.9, 2.0, 10
    out = noised_mean(origin, total, trainers, z * c, np.random.default_rng(11))
    noise = np.concatenate([((o - g) * trainers - s).ravel() for o, g, s in zip(out, origin, total)])
    # float32 rounding of the model (~1e-7 relative) times the denominator stays far below the noise
    assert abs(noise.std() / (z * c) - 1) < 0.1 and noise.size == 607
    again = noised_mean(origin, total, trainers, z * c, np.random.default_rng(11))
    assert all(np.array_equal(a, b) for a, b in zip(out, again))  # the generator decides it all
    with pytest.raises(ValueError):
        noised_mean(origin, total, 0, 1.0, rng)


def test_local_noise_is_added_after_clipping():
    rng = np.random.default_rng(3)
    origin = [np.zeros((300, 300), np.float32)]
    weights = [np.full((300, 300), 5.0, np.float32)]  # update norm 1500, clipped to 1
    sent, norm = privatize_solution(origin, weights, 1.0, noise_std=0.5, rng=np.random.default_rng(9))
    assert norm == pytest.approx(1500)
    update = sent[0].astype(np.float64)
    assert update.mean() == pytest.approx(1 / 300, abs=5 * 0.5 / 300)  # the clipped value, 1/300 per coordinate
    assert abs(update.std() / 0.5 - 1) < 0.01
    with pytest.raises(ValueError, match="generator"):
        privatize_solution(origin, weights, 1.0, noise_std=0.5)
    assert rng is not None


@pytest.mark.parametrize("accountant", ["rdp", "pld"])
@pytest.mark.parametrize("z, releases, delta", [(1.1, 1, 1e-5), (1.1, 10, 1e-5), (0.8, 37, 1e-6), (3.0, 200, 1e-5)])
def test_epsilon_is_the_accountant_librarys(accountant, z, releases, delta):
    if accountant == "pld":
        from dp_accounting.pld import pld_privacy_accountant

        library = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    else:
        from dp_accounting.rdp import rdp_privacy_accountant

        library = rdp_privacy_accountant.RdpAccountant()
    library.compose(dp_accounting.GaussianDpEvent(z), releases)
    assert epsilon(z, releases, delta, accountant) == pytest.approx(library.get_epsilon(delta), rel=1e-9)


def test_the_pld_discretization_costs_little_precision():
    from dp_accounting.pld import pld_privacy_accountant

    fine = pld_privacy_accountant.PLDAccountant()  # the library's default interval, 1e-4
    fine.compose(dp_accounting.GaussianDpEvent(1.1), 10)
    assert epsilon(1.1, 10, 1e-5, "pld") == pytest.approx(fine.get_epsilon(1e-5), abs=1e-3)


def test_epsilon_grows_with_releases_and_shrinks_with_noise():
    assert epsilon(1.0, 0, 1e-5) == 0.0
    assert epsilon(1.0, 5, 1e-5) < epsilon(1.0, 6, 1e-5) and epsilon(2.0, 5, 1e-5) < epsilon(1.0, 5, 1e-5)
    assert epsilon(0.0, 1, 1e-5) == math.inf


def test_the_ledger_counts_releases_per_peer_and_lost_rounds_against_everyone():
    ledger = Ledger().released(["a", "b"]).released(["a"])
    assert dict(ledger.counts) == {"a": 2, "b": 1} and ledger.most == 2
    assert Ledger(unattributed=4).released(["b"]).most == 5 and Ledger().most == 0


def test_privacy_settings_are_checked_and_described():
    assert not Privacy().on and Privacy().describe() == ""
    central = Privacy(clip=1.0, noise_multiplier=1.1)
    assert central.central and central.noise_std == pytest.approx(1.1) and "central DP" in central.describe()
    assert Privacy(clip=2.0, noise_multiplier=0.5, local=True).describe().startswith("local DP (C 2, z 0.5")
    for bad in (dict(clip=0.0), dict(clip=-1.0), dict(noise_multiplier=-1), dict(delta=1.0), dict(accountant="x")):
        with pytest.raises(ValueError):
            Privacy(**bad)
