"""Secure aggregation in the roles, pure: a controller and its followers pass every message to each other in one
process (no broker), the trainers' fits are made up, and the round's model must be the FedAvg of the updates that
survived, within the quantization bound, however trainers drop out; below the threshold the round is retried."""

from __future__ import annotations

import random

import numpy as np
import pytest

from peer.learning.secagg.quantize import Quantizer
from peer.roles.actions import AdoptModel, JobDone, Log, Publish, StartJob
from peer.roles.controller import Controller, RoundRules
from peer.roles.follower import Follower
from peer.roles.rounds import GlobalModel, ModelStore, RoundSummary
from peer.wire.messages import (
    Aggregation,
    Keys,
    Masked,
    Maskers,
    Reveal,
    Roster,
    Shares,
    Solution,
    Training,
    Unmask,
    decode,
    encode,
)

FOLLOWERS = ("p1", "p2", "p3", "p4", "p5")
SAMPLES = {"p1": 100, "p2": 200, "p3": 300, "p4": 400, "p5": 500}
SHAPES = [(3, 2), (4,)]


def global_weights():
    return [np.full(s, 0.5, np.float32) for s in SHAPES]


def fitted(peer: str, round_: int) -> list[np.ndarray]:
    rng = np.random.default_rng(int(peer[1:]) * 100 + round_)
    return [w + rng.normal(0, 0.05, w.shape).astype(np.float32) for w in global_weights()]


def memory():
    store = ModelStore()
    store.offer(1, 1, global_weights())
    store.finish_round(RoundSummary(1, 1, 0.5, 1.0, 0), 0.0)
    return store


class Federation:
    """A controller and five followers on a perfect bus; `dead` peers neither send nor receive."""

    def __init__(self, live=FOLLOWERS, **rules):
        options = dict(trainers=4, min_solutions=2, max_rounds=5, round_deadline=20.0, secure_aggregation=True)
        options.update(rules)
        announced = {p: (n, 10) for p, n in SAMPLES.items()}
        self.controller = Controller(
            "c",
            RoundRules(**options),
            2,
            "start",
            ("c", *live),
            live,
            memory(),
            random.Random(0),
            announced=announced,
        )
        self.followers = {p: Follower(p, memory(), secure_aggregation=True) for p in live}
        self.now = 0.0
        self.dead: set[str] = set()
        self.seen_by_controller: list = []
        self.adopted: list[GlobalModel] = []
        self.orders: list[Training] = []
        self.kill_after: dict[str, type] = {}  # peer -> the kind of message after whose sending it dies

    def run(self, actions, sender="c"):
        queue = [(sender, a) for a in actions]
        while queue:
            who, action = queue.pop(0)
            if who in self.dead:
                continue
            if isinstance(action, AdoptModel) and who == "c":
                self.adopted.append(action.model)
            if isinstance(action, StartJob) and action.kind == "fit":
                weights = fitted(who, action.round)
                done = JobDone(action, (weights, SAMPLES[who], 0.25), None, 1.0)
                queue += [(who, a) for a in self.followers[who].on_job_done(done, self.controller.term)]
            if not isinstance(action, Publish):
                continue
            # every message crosses the wire: encoded and decoded, as a peer would receive it
            message = decode(action.message.TOPIC, encode(action.message), action.message.sender)
            if who == "c":
                if isinstance(message, Training):
                    self.orders.append(message)
                for peer, follower in self.followers.items():
                    if peer not in self.dead and not isinstance(message, Aggregation):
                        queue += [(peer, a) for a in follower.on_controller(message)]
            else:
                if isinstance(message, Shares):
                    queue += [("c", a) for a in self.controller.on_secure(message, 1, self.now)]
                    for peer, follower in self.followers.items():
                        if peer != who and peer not in self.dead:
                            queue += [(peer, a) for a in follower.on_shares(message)]
                else:
                    self.seen_by_controller.append(message)
                    queue += [("c", a) for a in self.controller.on_message(message, 1, self.now)]
                if self.kill_after.get(who) is type(message):
                    self.kill(who)

    def kill(self, peer):
        self.dead.add(peer)
        self.run(self.controller.peer_down(peer, self.now))

    def start(self):
        self.run(self.controller.take_office(self.now))

    def tick(self, seconds, step=0.5):
        end = self.now + seconds
        while self.now < end:
            self.now += step
            self.run(self.controller.tick(self.now))


def fedavg(peers, round_=2):
    total = sum(SAMPLES[p] for p in peers)
    return [
        sum(fitted(p, round_)[i].astype(np.float64) * SAMPLES[p] / total for p in peers) for i in range(len(SHAPES))
    ]


def assert_close(model, expected, trainers):
    bound = Quantizer().error_bound(trainers, 1.0) * 10 + 1e-6  # float32 rounding of the weights on top
    for got, want in zip(model.weights, expected):
        assert np.abs(got.astype(np.float64) - want).max() <= bound


def test_a_round_with_every_trainer_is_their_fedavg_and_the_controller_never_sees_an_update():
    fed = Federation()
    fed.start()
    trainers = fed.orders[0].trainers
    assert len(trainers) == 4
    model = fed.adopted[-1]
    assert model.round == 2 and model.trainers == trainers
    assert_close(model, fedavg(trainers), 4)
    assert not any(isinstance(m, Solution) for m in fed.seen_by_controller)
    kinds = {type(m) for m in fed.seen_by_controller}
    assert kinds == {Keys, Masked, Reveal}
    for m in fed.seen_by_controller:
        if isinstance(m, Masked):
            assert m.weights[0].dtype == np.uint32


def test_a_trainer_killed_after_its_masked_update_still_counts():
    fed = Federation()
    fed.kill_after = {"p2": Masked}
    fed.start()
    fed.tick(10)
    trainers = fed.orders[0].trainers
    assert "p2" in trainers
    model = fed.adopted[-1]
    assert model.round == 2 and model.trainers == trainers
    assert_close(model, fedavg(trainers), 4)


def test_a_trainer_killed_after_sharing_is_dropped_and_its_masks_removed():
    fed = Federation()
    fed.kill_after = {"p2": Shares}
    fed.start()
    fed.tick(10)
    trainers = fed.orders[0].trainers
    model = fed.adopted[-1]
    survivors = tuple(p for p in trainers if p != "p2")
    assert model.round == 2 and model.trainers == survivors
    assert_close(model, fedavg(survivors), 3)


def test_below_the_threshold_the_round_is_retried_with_fresh_keys():
    fed = Federation(live=("p1", "p2", "p3", "p4"))
    fed.kill_after = {"p2": Shares, "p3": Shares}  # 2 of 4 left: the threshold is 3
    fed.start()
    fed.tick(25)
    assert [(o.attempt, o.trainers) for o in fed.orders] == [(1, ("p1", "p2", "p3", "p4")), (2, ("p1", "p4"))]
    model = fed.adopted[-1]
    assert model.round == 2 and model.trainers == ("p1", "p4")
    assert_close(model, fedavg(("p1", "p4")), 2)
    keys = [m for m in fed.seen_by_controller if isinstance(m, Keys) and m.peer == "p1"]
    assert len(keys) == 2 and keys[0].share_key != keys[1].share_key and keys[0].mask_key != keys[1].mask_key


def test_a_trainer_refuses_a_second_different_unmask_request():
    fed = Federation()
    fed.start()
    roster = next(f.secure for f in fed.followers.values() if f.secure is not None)
    order = roster.order
    peer = roster.me
    other = Unmask(order.term, "c", order.round, order.attempt, (peer,), tuple(p for p in order.trainers if p != peer))
    actions = fed.followers[peer].on_controller(other)
    assert not any(isinstance(a, Publish) for a in actions)
    assert any(isinstance(a, Log) and "refused" in a.text for a in actions)


@pytest.mark.parametrize("kind", [Roster, Maskers, Unmask])
def test_requests_of_another_attempt_are_ignored(kind):
    fed = Federation()
    fed.start()
    follower = next(f for f in fed.followers.values() if f.secure is not None)
    stale = {
        Roster: Roster(2, "c", 2, 9, 2, 8.0, 10, ()),
        Maskers: Maskers(2, "c", 2, 9, ("p1", "p2")),
        Unmask: Unmask(2, "c", 2, 9, ("p1", "p2"), ()),
    }[kind]
    assert follower.on_controller(stale) == []


def test_the_controller_takes_no_shares_that_leave_a_member_out():
    fed = Federation(live=("p1", "p2", "p3", "p4"))
    fed.controller.take_office(0.0)  # the order goes out; nobody answers yet
    secure = fed.controller.secure
    keys = {}
    for peer in ("p1", "p2", "p3", "p4"):
        follower = fed.followers[peer]
        follower.on_controller(secure.order)
        keys[peer] = follower.secure.keys
        assert secure.offer(keys[peer]) is None
    fed.controller.tick(0.1)
    assert secure.roster is not None
    partial = Shares(2, 2, 1, "p1", (("p2", "A" * 107 + "="), ("p3", "A" * 107 + "=")))
    assert "not one for every other member" in secure.offer(partial)
    assert "not in the roster" in secure.offer(Shares(2, 2, 1, "p9", ()))


def test_a_controller_without_the_setting_says_so_when_a_trainer_has_it():
    fed = Federation(secure_aggregation=False)
    fed.controller.take_office(0.0)
    actions = fed.controller.on_message(Keys(2, 2, 1, "p1", "ab" * 32, "cd" * 32, "ef" * 32), 1, 0.5)
    assert [a.level for a in actions if isinstance(a, Log)] == ["warning"]
    assert "same setting" in actions[0].text


def test_a_new_controller_retries_the_round_with_fresh_keys():
    # The first controller dies once its roster is out: the trainers' shares and masked updates go nowhere. A
    # controller of the next term trains the round again; every trainer makes new keys for it.
    fed = Federation(live=("p1", "p2", "p3", "p4"))
    old = fed.controller
    original_on_message = old.on_message

    def die_after_roster(message, size, now):
        return (
            [] if old.secure is not None and old.secure.roster is not None else original_on_message(message, size, now)
        )

    old.on_message = die_after_roster  # nothing reaches it once the roster is out
    old.on_secure = lambda message, size, now: []
    fed.start()
    assert not fed.adopted
    first_keys = {m.peer: m.mask_key for m in fed.seen_by_controller if isinstance(m, Keys)}
    announced = {p: (n, 10) for p, n in SAMPLES.items()}
    fed.controller = Controller(
        "p5",
        RoundRules(trainers=4, min_solutions=2, max_rounds=5, round_deadline=20.0, secure_aggregation=True),
        3,
        "controller-lost",
        ("p1", "p2", "p3", "p4", "p5"),
        ("p1", "p2", "p3", "p4"),
        memory(),
        random.Random(1),
        announced=announced,
    )
    fed.seen_by_controller.clear()
    fed.start()
    second = fed.orders[-1]
    assert (second.term, second.round, second.attempt) == (3, 2, 1)
    model = fed.adopted[-1]
    assert (model.round, model.term) == (2, 3) and model.trainers == ("p1", "p2", "p3", "p4")
    assert_close(model, fedavg(("p1", "p2", "p3", "p4")), 4)
    second_keys = {m.peer: m.mask_key for m in fed.seen_by_controller if isinstance(m, Keys)}
    assert set(second_keys) == set(first_keys) and not set(second_keys.values()) & set(first_keys.values())
