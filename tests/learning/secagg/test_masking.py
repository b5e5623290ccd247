import itertools
import random

import numpy as np
import pytest

from peer.learning.secagg import crypto
from peer.learning.secagg.errors import SecAggError
from peer.learning.secagg.masking import (
    CIPHERTEXT_BYTES,
    Advertisement,
    Roster,
    Trainer,
    Unmasker,
    UnmaskRequest,
    minimum_threshold,
    pair_mask,
    self_mask,
)
from peer.learning.secagg.quantize import Quantizer
from peer.learning.secagg.shamir import PRIME, combine

CONTEXT = b"run-1|term 1|round 2|attempt 1"
LENGTH = 64


def peers(n):
    return [f"peer-{i}" for i in range(1, n + 1)]


def setup(n, threshold=None, seed=0, context=CONTEXT):
    """n trainers that advertised, shared and received every share: (trainers by peer, roster)."""
    rng = random.Random(seed)
    trainers = {p: Trainer(p, context, rng.randbytes) for p in peers(n)}
    roster = Roster.of(context, threshold or minimum_threshold(n), [t.advertisement for t in trainers.values()])
    sent = {sender: trainer.share(roster) for sender, trainer in trainers.items()}
    for sender, ciphertexts in sent.items():
        for recipient, ciphertext in ciphertexts.items():
            trainers[recipient].receive(sender, ciphertext)
    return trainers, roster


def encodings(names, seed=1, length=LENGTH):
    rng = np.random.default_rng(seed)
    return {p: rng.integers(0, 2**32, length, dtype=np.uint64).astype(np.uint32) for p in names}


def modular_sum(vectors, length=LENGTH):
    total = np.zeros(length, dtype=np.uint32)
    for v in vectors:
        total += v
    return total


def run(trainers, roster, encoded, survivors, maskers=None, answering=None):
    """Mask, drop who is not a survivor, unmask: the Unmasker's result."""
    maskers = tuple(maskers or roster.peers)
    masked = {p: trainers[p].mask(encoded[p], maskers) for p in maskers}
    unmasker = Unmasker(roster, maskers, LENGTH)
    for p in survivors:
        assert unmasker.offer_masked(p, masked[p]) is None
    request = unmasker.close()
    for p in answering if answering is not None else request.survivors:
        assert unmasker.offer_reveal(p, trainers[p].reveal(request)) is None
    return unmasker.total()


# --- the masks cancel ---------------------------------------------------------------------------------------------


def test_the_pairwise_masks_cancel_exactly_in_the_sum():
    trainers, roster = setup(4)
    zero = np.zeros(LENGTH, np.uint32)
    masked = [t.mask(zero, roster.peers) for t in trainers.values()]
    selves = [self_mask(t._seed, CONTEXT, LENGTH) for t in trainers.values()]
    assert np.array_equal(modular_sum(masked), modular_sum(selves))
    # ... while each masked vector on its own is far from the encoded zeros
    assert all(np.count_nonzero(m) > LENGTH - 3 for m in masked)


def test_pair_masks_agree_from_either_side():
    a, b = Trainer("a", CONTEXT, random.Random(1).randbytes), Trainer("b", CONTEXT, random.Random(2).randbytes)
    from_a = pair_mask(a._mask_private, b.advertisement.mask_key, "a", "b", CONTEXT, 16)
    from_b = pair_mask(b._mask_private, a.advertisement.mask_key, "b", "a", CONTEXT, 16)
    assert np.array_equal(from_a, from_b)


def test_with_no_dropout_the_sum_is_exact():
    trainers, roster = setup(5)
    encoded = encodings(roster.peers)
    result = run(trainers, roster, encoded, roster.peers)
    assert np.array_equal(result.total, modular_sum(encoded.values()))
    assert result.dropped == () and result.liars == ()


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_every_set_of_survivors_at_or_above_the_threshold_gives_their_sum(n):
    t = minimum_threshold(n)
    for size in range(t, n + 1):
        for survivors in itertools.combinations(peers(n), size):
            trainers, roster = setup(n, seed=size)
            encoded = encodings(roster.peers, seed=size)
            result = run(trainers, roster, encoded, survivors)
            assert result.survivors == survivors
            assert result.dropped == tuple(p for p in roster.peers if p not in survivors)
            assert np.array_equal(result.total, modular_sum([encoded[p] for p in survivors]))


@pytest.mark.parametrize("n", [2, 3, 5, 6])
def test_below_the_threshold_nothing_is_unmasked(n):
    t = minimum_threshold(n)
    for survivors in itertools.combinations(peers(n), t - 1):
        trainers, roster = setup(n)
        encoded = encodings(roster.peers)
        masked = {p: trainers[p].mask(encoded[p], roster.peers) for p in roster.peers}
        unmasker = Unmasker(roster, roster.peers, LENGTH)
        for p in survivors:
            unmasker.offer_masked(p, masked[p])
        with pytest.raises(SecAggError, match="fewer than the threshold"):
            unmasker.close()
        with pytest.raises(SecAggError, match="fewer than the threshold"):
            unmasker.total()
        # nor will a survivor answer a request that names fewer than t survivors
        request = UnmaskRequest(tuple(survivors), tuple(p for p in roster.peers if p not in survivors))
        if survivors:
            with pytest.raises(SecAggError, match="fewer than the threshold"):
                trainers[survivors[0]].reveal(request)


def test_survivors_enough_but_answers_too_few_refuse_to_unmask():
    trainers, roster = setup(6, threshold=4)
    encoded = encodings(roster.peers)
    maskers = roster.peers
    masked = {p: trainers[p].mask(encoded[p], maskers) for p in maskers}
    unmasker = Unmasker(roster, maskers, LENGTH)
    for p in maskers[:5]:
        unmasker.offer_masked(p, masked[p])
    request = unmasker.close()
    for p in request.survivors[:3]:
        unmasker.offer_reveal(p, trainers[p].reveal(request))
    assert not unmasker.sufficient and not unmasker.complete
    with pytest.raises(SecAggError, match="too few answers"):
        unmasker.total()
    unmasker.offer_reveal(request.survivors[3], trainers[request.survivors[3]].reveal(request))
    assert unmasker.sufficient and not unmasker.complete
    assert np.array_equal(unmasker.total().total, modular_sum([encoded[p] for p in request.survivors]))


def test_trainers_dropped_before_masking_are_left_out_of_the_masks():
    # U2 smaller than U1: a trainer that shared but was not named a masker adds no mask, and is not asked about.
    trainers, roster = setup(5)
    encoded = encodings(roster.peers)
    maskers = roster.peers[:4]
    result = run(trainers, roster, encoded, maskers[:3], maskers=maskers)
    assert result.dropped == (maskers[3],)
    assert np.array_equal(result.total, modular_sum([encoded[p] for p in maskers[:3]]))


def test_quantized_updates_go_through_the_masks_to_their_weighted_mean():
    trainers, roster = setup(4)
    q = Quantizer(1.0)
    rng = np.random.default_rng(7)
    updates = {p: rng.normal(0, 0.05, LENGTH) for p in roster.peers}
    weights = dict(zip(roster.peers, (0.1, 0.2, 0.3, 0.4)))
    encoded = {p: q.encode(updates[p], weights[p]) for p in roster.peers}
    survivors = roster.peers[1:]
    result = run(trainers, roster, encoded, survivors)
    total_weight = sum(weights[p] for p in survivors)
    mean = q.decode(result.total, total_weight)
    exact = sum(updates[p] * weights[p] for p in survivors) / total_weight
    assert np.abs(mean - exact).max() <= q.error_bound(len(survivors), total_weight)


# --- what the controller sees -------------------------------------------------------------------------------------


def transcript(updates, seed, survivors=("peer-1", "peer-2")):
    """Every message the controller receives in a round of 3 trainers where peer-3 drops after sharing, with the
    trainers' randomness drawn from `seed`: (the messages that do not carry the update, the masked vectors, the
    request, the answers)."""
    trainers, roster = setup(3, threshold=2, seed=seed)
    adverts = [t.advertisement for t in trainers.values()]
    ciphertexts = {p: t.share(roster) for p, t in trainers.items()}  # the same ones again (idempotent)
    masked = {p: trainers[p].mask(updates[p], roster.peers) for p in survivors}
    unmasker = Unmasker(roster, roster.peers, LENGTH)
    for p in survivors:
        unmasker.offer_masked(p, masked[p])
    request = unmasker.close()
    answers = {p: trainers[p].reveal(request) for p in survivors}
    return (adverts, ciphertexts), masked, request, answers, roster


def demasked(masked, request, answers, roster, peer):
    """What the controller can strip from `peer`'s masked vector with everything it learns: the survivors' seeds and
    the dropped trainers' mask keys, rebuilt from the answers."""

    def rebuilt(owner):
        return combine({roster.x(h): a[owner] for h, a in answers.items()}, roster.threshold).to_bytes(32, "little")

    vector = masked[peer] - self_mask(rebuilt(peer), roster.context, LENGTH)
    for dropped in request.dropped:
        pair = pair_mask(rebuilt(dropped), roster.member(peer).mask_key, dropped, peer, roster.context, LENGTH)
        vector = vector - pair if peer < dropped else vector + pair
    return vector


def histogram_distance(a, b, bins=16):
    """Chi-square statistic of two samples of uint32 values being from one distribution, over their top 4 bits."""
    ha = np.bincount(np.concatenate(a) >> 28, minlength=bins).astype(float)
    hb = np.bincount(np.concatenate(b) >> 28, minlength=bins).astype(float)
    both = ha + hb
    return float(np.sum((ha - hb)[both > 0] ** 2 / both[both > 0]))


CHI2_15_P001 = 37.7  # the 0.001 critical value of chi-square with 15 degrees of freedom


def test_the_controllers_view_is_the_same_distribution_for_two_different_updates():
    # Two worlds with the same sum: peer-1 and peer-2 swap their updates (zeros, and a vector far from uniform).
    skewed = np.full(LENGTH, 0x10000000, np.uint32)
    zero = np.zeros(LENGTH, np.uint32)
    world_a = {"peer-1": zero, "peer-2": skewed, "peer-3": zero}
    world_b = {"peer-1": skewed, "peer-2": zero, "peer-3": zero}
    seen_a, seen_b = [], []
    for seed in range(300):
        rest_a, masked_a, request_a, answers_a, roster_a = transcript(world_a, seed)
        rest_b, masked_b, request_b, answers_b, roster_b = transcript(world_b, seed)
        # what does not carry the update is bit for bit the same under the same randomness
        assert rest_a == rest_b and request_a == request_b and answers_a == answers_b
        # what does, stripped of everything the controller can strip, must look alike
        seen_a.append(demasked(masked_a, request_a, answers_a, roster_a, "peer-1"))
        seen_b.append(demasked(masked_b, request_b, answers_b, roster_b, "peer-1"))
        # ... and still add up to the sum
        assert np.array_equal(seen_a[-1] + demasked(masked_a, request_a, answers_a, roster_a, "peer-2"), skewed)
    assert histogram_distance(seen_a, seen_b) < CHI2_15_P001
    uniform = [
        np.random.default_rng(s).integers(0, 2**32, LENGTH, dtype=np.uint64).astype(np.uint32) for s in range(300)
    ]
    assert histogram_distance(seen_a, uniform) < CHI2_15_P001


def test_the_view_test_sees_a_leak_when_a_trainers_key_and_seed_both_reach_the_controller():
    # The control: what Trainer.reveal refuses (a second request that counts peer-1 dropped), had it been answered,
    # gives the controller peer-1's mask key too, and then the same statistic tells the two worlds apart.
    skewed = np.full(LENGTH, 0x10000000, np.uint32)
    zero = np.zeros(LENGTH, np.uint32)
    leaked_a, leaked_b = [], []
    for seed in range(40):
        for world, out in (
            ({"peer-1": zero, "peer-2": skewed}, leaked_a),
            ({"peer-1": skewed, "peer-2": zero}, leaked_b),
        ):
            trainers, roster = setup(3, threshold=2, seed=seed)
            masked = {p: trainers[p].mask(world[p], roster.peers) for p in world}
            first = UnmaskRequest(("peer-1", "peer-2"), ("peer-3",))
            answers = {p: trainers[p].reveal(first) for p in world}
            seed_1 = combine({roster.x(h): a["peer-1"] for h, a in answers.items()}, 2).to_bytes(32, "little")
            with pytest.raises(SecAggError, match="another split"):
                trainers["peer-2"].reveal(UnmaskRequest(("peer-2", "peer-3"), ("peer-1",)))
            key_1 = trainers["peer-1"]._mask_private  # what the refused request would have rebuilt
            vector = masked["peer-1"] - self_mask(seed_1, CONTEXT, LENGTH)
            for other in ("peer-2", "peer-3"):
                vector = vector - pair_mask(key_1, roster.member(other).mask_key, "peer-1", other, CONTEXT, LENGTH)
            out.append(vector)
    assert histogram_distance(leaked_a, leaked_b) > 10 * CHI2_15_P001


# --- forged, wrong, replayed and contradictory inputs ---------------------------------------------------------------


def test_a_changed_ciphertext_is_refused():
    rng = random.Random(9)
    trainers = {p: Trainer(p, CONTEXT, rng.randbytes) for p in peers(3)}
    roster = Roster.of(CONTEXT, 2, [t.advertisement for t in trainers.values()])
    sent = trainers["peer-1"].share(roster)
    for t in trainers.values():
        t.share(roster)
    forged = bytearray(sent["peer-2"])
    forged[5] ^= 1
    with pytest.raises(SecAggError, match="does not decrypt"):
        trainers["peer-2"].receive("peer-1", bytes(forged))
    # meant for peer-3, delivered to peer-2; or claimed to be from peer-3
    with pytest.raises(SecAggError, match="does not decrypt"):
        trainers["peer-2"].receive("peer-1", sent["peer-3"])
    with pytest.raises(SecAggError, match="does not decrypt"):
        trainers["peer-2"].receive("peer-3", sent["peer-2"])
    with pytest.raises(SecAggError, match="80 bytes"):
        trainers["peer-2"].receive("peer-1", sent["peer-2"][:-1])
    with pytest.raises(SecAggError, match="not another member"):
        trainers["peer-2"].receive("peer-9", sent["peer-2"])
    trainers["peer-2"].receive("peer-1", sent["peer-2"])
    trainers["peer-2"].receive("peer-1", sent["peer-2"])  # a duplicate is harmless
    assert "peer-1" in trainers["peer-2"].holds
    assert len(sent["peer-2"]) == CIPHERTEXT_BYTES


def test_shares_of_another_attempt_are_refused_even_with_the_same_randomness():
    # A peer that (wrongly) drew the same randomness in two attempts still makes keys, shares and masks that do not
    # carry over: everything is bound to the attempt's context.
    first, _ = setup(3, seed=5, context=b"run|1|2|1")
    second, roster_2 = setup(3, seed=5, context=b"run|1|2|2")
    old_roster = Roster.of(b"run|1|2|1", 2, [t.advertisement for t in first.values()])
    replayed = first["peer-1"].share(old_roster)["peer-2"]
    assert replayed != second["peer-1"].share(roster_2)["peer-2"]
    fresh = Trainer("peer-2", b"run|1|2|3", random.Random(5).randbytes)
    assert fresh.advertisement.seed_digest != first["peer-2"].advertisement.seed_digest
    zero = np.zeros(LENGTH, np.uint32)
    assert not np.array_equal(
        first["peer-1"].mask(zero, ["peer-1", "peer-2"]), second["peer-1"].mask(zero, ["peer-1", "peer-2"])
    )
    with pytest.raises(SecAggError, match="another round attempt"):
        Trainer("peer-1", b"run|1|2|4", random.Random(5).randbytes).share(roster_2)


def test_a_lying_holder_is_named_and_outvoted():
    trainers, roster = setup(5, threshold=3)
    encoded = encodings(roster.peers)
    maskers = roster.peers
    masked = {p: trainers[p].mask(encoded[p], maskers) for p in maskers}
    unmasker = Unmasker(roster, maskers, LENGTH)
    for p in maskers[:4]:
        unmasker.offer_masked(p, masked[p])
    request = unmasker.close()
    for p in request.survivors:
        answer = trainers[p].reveal(request)
        if p == "peer-2":
            answer = {owner: (share + 1) % PRIME for owner, share in answer.items()}
        assert unmasker.offer_reveal(p, answer) is None
    result = unmasker.total()
    assert result.liars == ("peer-2",)
    assert np.array_equal(result.total, modular_sum([encoded[p] for p in request.survivors]))


def test_too_many_liars_refuse_the_sum_rather_than_give_a_wrong_one():
    trainers, roster = setup(3, threshold=2)
    encoded = encodings(roster.peers)
    masked = {p: trainers[p].mask(encoded[p], roster.peers) for p in roster.peers}
    unmasker = Unmasker(roster, roster.peers, LENGTH)
    for p in roster.peers[:2]:
        unmasker.offer_masked(p, masked[p])
    request = unmasker.close()
    for p in request.survivors:
        unmasker.offer_reveal(p, {owner: (share + 7) % PRIME for owner, share in trainers[p].reveal(request).items()})
    with pytest.raises(SecAggError, match="committed secret"):
        unmasker.total()


def test_the_unmasker_refuses_what_does_not_belong():
    trainers, roster = setup(4)
    encoded = encodings(roster.peers)
    masked = {p: trainers[p].mask(encoded[p], roster.peers) for p in roster.peers}
    unmasker = Unmasker(roster, roster.peers, LENGTH)
    assert "not a masker" in unmasker.offer_masked("peer-9", masked["peer-1"])
    assert "uint32" in unmasker.offer_masked("peer-1", masked["peer-1"].astype(np.int64))
    assert "uint32" in unmasker.offer_masked("peer-1", masked["peer-1"][:-1])
    assert "no request" in unmasker.offer_reveal("peer-1", {})
    for p in roster.peers[:3]:
        assert unmasker.offer_masked(p, masked[p]) is None
    assert "already sent" in unmasker.offer_masked("peer-1", masked["peer-1"])
    request = unmasker.close()
    assert "already fixed" in unmasker.offer_masked("peer-4", masked["peer-4"])  # late: it counts as dropped
    assert "not a survivor" in unmasker.offer_reveal("peer-4", trainers["peer-1"].reveal(request))
    assert "not maskers" in unmasker.offer_reveal("peer-1", {"peer-9": 1})
    assert "field element" in unmasker.offer_reveal("peer-1", {"peer-1": PRIME})
    assert "field element" in unmasker.offer_reveal("peer-1", {"peer-1": True})
    assert unmasker.offer_reveal("peer-1", trainers["peer-1"].reveal(request)) is None
    assert "already answered" in unmasker.offer_reveal("peer-1", trainers["peer-1"].reveal(request))


def test_a_trainer_never_gives_both_shares_of_one_trainer():
    trainers, roster = setup(5)
    zero = np.zeros(LENGTH, np.uint32)
    with pytest.raises(SecAggError, match="before I masked"):
        trainers["peer-1"].reveal(UnmaskRequest(roster.peers, ()))
    for t in trainers.values():
        t.mask(zero, roster.peers)
    me = trainers["peer-1"]
    with pytest.raises(SecAggError, match="both shares"):
        me.reveal(UnmaskRequest(("peer-1", "peer-2", "peer-3"), ("peer-3", "peer-4", "peer-5")))
    with pytest.raises(SecAggError, match="are not the maskers"):
        me.reveal(UnmaskRequest(("peer-1", "peer-2", "peer-3"), ("peer-4",)))
    with pytest.raises(SecAggError, match="counted as dropped"):
        me.reveal(UnmaskRequest(("peer-2", "peer-3", "peer-4"), ("peer-1", "peer-5")))
    first = UnmaskRequest(("peer-1", "peer-2", "peer-3"), ("peer-4", "peer-5"))
    answer = me.reveal(first)
    assert set(answer) == set(roster.peers)
    assert me.reveal(first) == answer  # a repeated request (a lost answer) gets the same answer
    with pytest.raises(SecAggError, match="another split"):
        me.reveal(UnmaskRequest(("peer-1", "peer-2", "peer-3", "peer-4"), ("peer-5",)))


def test_masking_is_fixed_to_one_set_of_maskers():
    trainers, roster = setup(4)
    zero = np.zeros(LENGTH, np.uint32)
    me = trainers["peer-1"]
    with pytest.raises(SecAggError, match="not named a masker"):
        me.mask(zero, ["peer-2", "peer-3", "peer-4"])
    with pytest.raises(SecAggError, match="fewer than the threshold"):
        me.mask(zero, ["peer-1", "peer-2"])
    with pytest.raises(SecAggError, match="not in the roster"):
        me.mask(zero, ["peer-1", "peer-2", "peer-9"])
    with pytest.raises(SecAggError, match="uint32"):
        me.mask(zero.astype(np.float32), roster.peers)
    me.mask(zero, roster.peers)
    with pytest.raises(SecAggError, match="other maskers"):
        me.mask(zero, roster.peers[:3])
    unshared = Trainer("peer-1", CONTEXT, random.Random(3).randbytes)
    with pytest.raises(SecAggError, match="before sharing"):
        unshared.mask(zero, roster.peers)


def test_a_roster_that_swapped_my_keys_or_changed_is_refused():
    rng = random.Random(11)
    trainers = {p: Trainer(p, CONTEXT, rng.randbytes) for p in peers(3)}
    adverts = [t.advertisement for t in trainers.values()]
    impostor = Trainer("peer-1", CONTEXT, rng.randbytes).advertisement
    swapped = Roster.of(CONTEXT, 2, [impostor, *adverts[1:]])
    with pytest.raises(SecAggError, match="my advertisement"):
        trainers["peer-1"].share(swapped)
    roster = Roster.of(CONTEXT, 2, adverts)
    first = trainers["peer-2"].share(roster)
    assert trainers["peer-2"].share(roster) == first
    with pytest.raises(SecAggError, match="different roster"):
        trainers["peer-2"].share(Roster.of(CONTEXT, 3, adverts))
    with pytest.raises(SecAggError, match="before the roster"):
        Trainer("peer-3", CONTEXT, rng.randbytes).receive("peer-2", first["peer-3"])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda ads: ads[:1], "at least 2 trainers"),
        (lambda ads: [ads[0], ads[0], ads[1]], "each trainer once"),
        (
            lambda ads: [
                ads[0],
                Advertisement("peer-2", ads[0].share_key, ads[1].mask_key, ads[1].seed_digest),
                ads[2],
            ],
            "public keys",
        ),
    ],
)
def test_a_bad_roster_is_refused(change, match):
    rng = random.Random(12)
    ads = [Trainer(p, CONTEXT, rng.randbytes).advertisement for p in peers(3)]
    with pytest.raises(SecAggError, match=match):
        Roster(CONTEXT, 2, tuple(change(ads)))


@pytest.mark.parametrize("n,t", [(4, 2), (4, 5), (2, 1), (5, True)])
def test_a_threshold_of_half_or_less_or_above_n_is_refused(n, t):
    rng = random.Random(13)
    ads = [Trainer(p, CONTEXT, rng.randbytes).advertisement for p in peers(n)]
    with pytest.raises(SecAggError, match="threshold"):
        Roster.of(CONTEXT, t, ads)


def test_an_advertisement_of_the_wrong_sizes_and_a_low_order_key_are_refused():
    with pytest.raises(SecAggError, match="share key"):
        Advertisement("peer-1", b"short", bytes(32), bytes(32))
    trainers, roster = setup(2)
    with pytest.raises(SecAggError, match="low order"):
        crypto.agree(trainers["peer-1"]._mask_private, bytes(32), b"mask", CONTEXT)
