"""The election state machine, driven directly and inside a simulated federation.

The simulation models what the peers rely on and nothing more: one broker that delivers the election topic's
messages (votes and claims) to every subscriber in one order, each subscriber at its own pace, only the messages
published after it subscribed; heartbeats and presence changes arriving after arbitrary delays; peers joining,
dying, hanging and coming back at random times. Thousands of seeded runs check the two promises:
- safety: at no moment do two peers act as controller of the same term;
- agreement: once joins and failures stop, every live peer follows the same live controller of the same term.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest

from peer.roles.actions import CastVote, FollowController, SendClaim, StepDown, TakeOffice
from peer.roles.election import Election, ElectionTimings, Role

T = ElectionTimings(window=1.0, claim_timeout=3.0, heartbeat_timeout=3.0, join_grace=2.5)


def machine(me="a", min_peers=3, now=0.0, seed=1, **kw) -> Election:
    return Election(me, min_peers, T, random.Random(seed), started_at=now, **kw)


# --- direct transitions -----------------------------------------------------------------------------------------------


def test_waits_for_min_peers_then_votes_after_the_grace():
    e = machine(min_peers=3)
    assert e.tick(1.0) == []  # grace not over
    notes = e.tick(3.0)
    assert "1 of 3" in notes[0].text and e.role is Role.WAITING
    assert e.tick(3.1) == []  # the same note is not repeated
    e.peer_up("b", 3.2), e.peer_up("c", 3.2)
    [vote] = e.tick(3.3)
    assert isinstance(vote, CastVote) and vote.term == 1 and vote.reason == "start" and e.role is Role.VOTING


def test_a_higher_term_vote_pulls_a_waiting_peer_in():
    e = machine(min_peers=5)
    actions = e.on_vote(1, "b", 0.3, 0, "start", 0.5)
    assert [type(a) for a in actions] == [CastVote] and e.term == 1
    assert set(e.votes) == {"a", "b"}


def test_best_voter_claims_after_the_window_and_takes_office_only_when_its_claim_comes_back():
    e = machine(min_peers=2, seed=3)
    e.peer_up("b", 0)
    [vote] = e.tick(3.0)
    e.on_vote(1, "b", vote.vote / 2, 0, "start", 3.1)  # b's vote is lower
    assert e.tick(3.5) == []  # window not over
    [claim] = e.tick(4.0)
    assert isinstance(claim, SendClaim) and claim.members == ("a", "b")
    assert e.role is Role.VOTING  # not yet: the claim must come back first
    [office] = e.on_claim(1, "a", "start", claim.members, 4.1)
    assert isinstance(office, TakeOffice) and e.role is Role.CONTROLLER


def test_the_first_claim_wins_and_a_later_claim_of_the_term_is_ignored():
    e = machine(min_peers=2)
    e.on_vote(1, "b", 0.9, 0, "start", 0)
    [follow] = e.on_claim(1, "c", "start", ("a", "b", "c"), 0.5)
    assert follow == FollowController(1, "c")
    assert e.on_claim(1, "b", "start", ("a", "b"), 0.6) == [] and e.controller == "c"


def test_a_peer_holding_an_older_model_does_not_claim():
    e = machine(min_peers=2)
    e.on_vote(1, "b", 0.01, 5, "start", 0)  # b holds round 5
    e.votes["a"] = (4, 0.99)  # a holds round 4: its higher vote must not win
    assert e.best_voter() == "b"
    assert not any(isinstance(a, SendClaim) for a in e.tick(1.5))


def test_stale_messages_are_ignored():
    e = machine(min_peers=2)
    e.on_claim(3, "b", "start", (), 0)
    assert e.term == 3
    assert e.on_vote(2, "c", 0.9, 0, "start", 1) == []
    assert e.on_claim(2, "c", "start", (), 1) == []
    assert e.on_controller_seen(2, "c", 1) == [] and e.controller == "b"
    assert e.is_stale(2) and not e.is_stale(3)


def test_controller_lost_or_silent_starts_the_next_term():
    e = machine(min_peers=2)
    e.on_claim(1, "b", "start", (), 0)
    e.on_controller_seen(1, "b", 2.0)
    assert e.tick(4.9) == []
    [vote] = e.tick(5.0)  # 3 s after the last heartbeat
    assert vote.term == 2 and vote.reason == "controller-silent"
    assert "b" not in e.live  # silent counts as gone until it speaks again
    e.on_claim(2, "c", "controller-silent", (), 6)
    [vote] = e.peer_down("c", 7)
    assert vote.term == 3 and vote.reason == "controller-lost"


def test_a_model_announced_on_its_way_is_no_silence_until_it_could_have_come():
    e = machine(min_peers=2)
    e.on_claim(1, "b", "start", (), 0)
    e.on_controller_seen(1, "b", 2.0)
    e.expect_model(1, "c", 9.0)  # not the controller it follows: no grace
    e.expect_model(0, "b", 9.0)  # nor of another term
    e.expect_model(1, "b", 9.0)  # its heartbeat: round r's model is on its way here
    assert e.tick(5.0) == [] and e.tick(8.9) == []  # the broker is still delivering the model to everyone
    [vote] = e.tick(9.0)
    assert vote.term == 2 and vote.reason == "controller-silent"
    e.on_claim(2, "c", "controller-silent", (), 9.5)
    e.on_controller_seen(2, "c", 10.0)
    assert e.tick(13.0)[0].reason == "controller-silent"  # a new term starts without the old grace


def test_a_controller_steps_down_when_a_higher_term_appears():
    e = machine(min_peers=2)
    e.on_claim(1, "a", "start", (), 0)
    assert e.role is Role.CONTROLLER
    actions = e.on_vote(2, "b", 0.5, 0, "controller-silent", 5)
    assert isinstance(actions[0], StepDown) and actions[0].term == 1
    assert isinstance(actions[1], CastVote) and actions[1].term == 2


def test_no_claim_moves_on_to_the_next_term():
    e = machine(min_peers=2)
    e.on_vote(1, "b", 0.99, 0, "start", 0)  # b is best but never claims (it died)
    assert e.tick(3.9) == []
    [vote] = e.tick(4.0)
    assert vote.term == 2 and vote.reason == "no-claim"


def test_patience_doubles_from_the_second_failed_term_up_to_8x_and_rounds_bring_it_back():
    e = machine(min_peers=2)
    e.on_vote(1, "b", 0.99, 0, "start", 0)  # b is best but its claim never comes (late, or dead)
    [vote] = e.tick(4.0)  # (window 1 + claim timeout 3) after voting
    assert vote.reason == "no-claim" and vote.patience == 1  # one failure costs nothing
    e.on_vote(2, "b", 0.99, 0, "no-claim", 4.0)
    [vote] = e.tick(8.0)
    assert vote.term == 3 and vote.patience == 2  # the second in a row: twice the window and timeouts
    e.on_vote(3, "b", 0.99, 0, "no-claim", 8.0)
    assert e.tick(15.9) == []
    [vote] = e.tick(16.0)  # 8 s, not 4
    assert vote.term == 4 and vote.patience == 4
    e.on_vote(4, "b", 0.99, 0, "no-claim", 16.0)
    [vote] = e.tick(32.0)
    assert vote.patience == 8
    e.on_vote(5, "b", 0.99, 0, "no-claim", 32.0)
    [vote] = e.tick(64.0)
    assert vote.term == 6 and vote.patience == 8  # at most 8x
    # A claim decides term 6; the controller's silence is judged with the same patience (3 s x 8)...
    e.on_claim(6, "b", "no-claim", (), 64.5)
    assert e.tick(64.5 + 23.9) == []
    e.on_controller_seen(6, "b", 89.0)
    e.progress(1)  # ...until rounds finish: one step back per round
    assert e.patience == 4
    e.progress(3)
    assert e.patience == 1
    assert e.tick(91.9) == [] and e.tick(92.0)[0].reason == "controller-silent"


def test_a_frozen_controller_is_replaced_as_fast_as_ever_and_a_lost_one_is_no_strike():
    e = machine(min_peers=2)
    e.on_claim(1, "b", "start", (), 0)
    [vote] = e.tick(3.0)
    assert vote.reason == "controller-silent" and vote.patience == 1
    e.on_claim(2, "c", "controller-silent", (), 3.5)
    [vote] = e.peer_down("c", 4.0)
    assert vote.reason == "controller-lost" and vote.patience == 1
    assert isinstance(e.tick(5.0)[0], SendClaim)  # the window is still 1 s


def test_a_dead_best_voter_is_passed_over_at_the_window():
    e = machine(min_peers=2)
    e.peer_up("b", 0)
    e.on_vote(1, "b", 0.99, 0, "start", 0)
    e.peer_down("b", 0.5)
    assert isinstance(e.tick(1.0)[0], SendClaim)


def test_two_controllers_in_one_term_resolve_into_a_new_term():
    e = machine(min_peers=2)
    e.on_claim(1, "a", "start", (), 0)
    actions = e.on_controller_seen(1, "b", 1)
    assert isinstance(actions[0], StepDown) and actions[1].term == 2 and actions[1].reason == "conflict"


def test_a_controller_resumed_after_a_freeze_steps_down_into_a_new_term():
    e = machine(min_peers=2)
    e.on_claim(1, "a", "start", (), 0)
    actions = e.thawed(10)
    assert isinstance(actions[0], StepDown) and actions[1].term == 2 and actions[1].reason == "controller-stalled"
    # the others had already elected term 2: the thawed peer follows it
    assert e.on_claim(2, "b", "controller-silent", (), 10.1) == [FollowController(2, "b")]


def test_a_follower_resumed_after_a_freeze_waits_a_full_timeout_before_judging_the_controller():
    e = machine(min_peers=2)
    e.on_claim(1, "b", "start", (), 0)
    assert e.thawed(10) == []
    assert e.tick(10.1) == []  # not "controller-silent" on the stale clock
    e.on_controller_seen(1, "b", 10.2)  # the queued heartbeats arrive
    assert e.tick(12) == []


def test_an_echo_of_an_earlier_life_of_this_id_is_not_obeyed():
    e = machine(min_peers=2)
    assert e.on_controller_seen(4, "a", 0) == [] and e.role is Role.WAITING


def test_a_late_joiner_adopts_the_running_controller():
    e = machine(min_peers=5)
    [follow] = e.on_controller_seen(7, "c", 0.3)
    assert follow == FollowController(7, "c") and e.role is Role.FOLLOWER


# --- simulated federation ---------------------------------------------------------------------------------------------


@dataclass
class SimPeer:
    name: str
    machine: Election
    joined: bool = False
    alive: bool = True
    paused_until: float = 0.0
    cursor: int = 0  # position in the broker's election log
    lagging_until: float = 0.0  # its deliveries are held up (busy link, slow host)
    inbox: list = field(default_factory=list)  # (deliver_at, kind, payload) for other topics
    next_heartbeat: float = 0.0


class Simulation:
    HEARTBEAT = 1.0
    lag_probability = 0.01  # per peer and step: deliveries to it stall for 0.5-2.5 s

    def __init__(self, seed: int):
        rng = self.rng = random.Random(seed)
        self.n = rng.randint(2, 7)
        self.min_peers = rng.randint(2, self.n)
        self.peers = [
            SimPeer(f"p{i}", Election(f"p{i}", self.min_peers, T, random.Random(rng.random()), 0.0))
            for i in range(self.n)
        ]
        self.join_at = {p.name: rng.uniform(0, 4) for p in self.peers}
        self.log: list[tuple] = []  # the election topic, in the broker's one order
        self.offices: dict[int, set[str]] = {}
        self.retained: dict[str, tuple] = {}  # the broker's retained claim and heartbeat
        # Failures: deaths (the will arrives), hangs (SIGSTOP then SIGCONT), restarts under the same id.
        self.events: list[tuple[float, str, str]] = []
        for _ in range(rng.randint(0, 3)):
            victim = rng.choice(self.peers).name
            self.events.append((rng.uniform(4, 20), rng.choice(["die", "hang"]), victim))
        self.quiet_from = max([t for t, _, _ in self.events] + list(self.join_at.values())) + 1
        self.now = 0.0

    # delivery ------------------------------------------------------------------------------------------------------
    def delay(self) -> float:
        return self.rng.choice([0.0, 0.01, 0.05, 0.2, 0.5])

    def broadcast(self, sender: str, kind: str, payload) -> None:
        for p in self.peers:
            if p.joined and p.alive and p.name != sender:
                p.inbox.append((self.now + self.delay(), kind, payload))

    def publish_election(self, message: tuple) -> None:
        self.log.append(message)

    def carry_out(self, p: SimPeer, actions) -> None:
        for a in actions:
            if isinstance(a, CastVote):
                self.publish_election(("vote", a.term, p.name, a.vote, a.round, a.reason))
            elif isinstance(a, SendClaim):
                self.publish_election(("claim", a.term, p.name, a.reason, a.members))
                self.retained["claim"] = (a.term, p.name)
            elif isinstance(a, TakeOffice):
                self.offices.setdefault(a.term, set()).add(p.name)
                p.next_heartbeat = self.now

    def feed(self, p: SimPeer, item) -> list:
        m = p.machine
        if item[0] == "vote":
            _, term, peer, vote, round_, reason = item
            return m.on_vote(term, peer, vote, round_, reason, self.now)
        if item[0] == "claim":
            _, term, peer, reason, members = item
            return m.on_claim(term, peer, reason, members, self.now)
        if item[0] == "heartbeat":
            term, controller = item[1]
            if m.is_stale(term):
                return []
            return m.on_controller_seen(term, controller, self.now)
        if item[0] == "up":
            return m.peer_up(item[1], self.now)
        if item[0] == "down":
            return m.peer_down(item[1], self.now)
        raise AssertionError(item)

    # events --------------------------------------------------------------------------------------------------------
    def join(self, p: SimPeer) -> None:
        p.joined, p.alive = True, True
        p.cursor = len(self.log)  # sees only what is published from now on
        p.machine.started_at = self.now
        for term, controller in self.retained.values():  # delivered on subscribe, before anything live
            self.carry_out(p, p.machine.on_retained(term, controller, self.now))
        for other in self.peers:  # retained presence of everyone live
            if other.joined and other.alive and other is not p:
                p.inbox.append((self.now + self.delay(), "up", other.name))
        self.broadcast(p.name, "up", p.name)

    def fail(self, kind: str, p: SimPeer) -> None:
        if not p.alive or not p.joined:
            return
        if kind == "die":
            p.alive = False
            self.broadcast(p.name, "down", p.name)
            # it restarts under the same id a little later, with a fresh state machine
            restart = self.now + self.rng.uniform(1, 5)
            self.events.append((restart, "restart", p.name))
        else:
            p.paused_until = self.now + self.rng.uniform(2, 9)
            if p.paused_until - self.now > 7.5:  # longer than 1.5 x keepalive: the will goes out
                self.broadcast(p.name, "down", p.name)
                self.events.append((p.paused_until, "reconnect", p.name))

    def restart(self, p: SimPeer) -> None:
        p.machine = Election(p.name, self.min_peers, T, random.Random(self.rng.random()), self.now)
        p.inbox, p.alive = [], True
        self.join(p)

    # loop ----------------------------------------------------------------------------------------------------------
    def step(self, dt: float) -> None:
        self.now += dt
        for p in self.peers:
            if not p.joined and self.now >= self.join_at[p.name]:
                self.join(p)
        for when, kind, name in [e for e in self.events if e[0] <= self.now]:
            self.events.remove((when, kind, name))
            p = next(x for x in self.peers if x.name == name)
            if kind in ("die", "hang"):
                self.fail(kind, p)
            elif kind == "restart":
                self.restart(p)
            elif kind == "reconnect":
                self.broadcast(p.name, "up", p.name)
                for other in self.peers:
                    if other.joined and other.alive and other is not p:
                        p.inbox.append((self.now, "up", other.name))
        order = [p for p in self.peers if p.joined and p.alive and p.paused_until <= self.now]
        self.rng.shuffle(order)
        for p in order:
            if self.rng.random() < self.lag_probability:
                p.lagging_until = self.now + self.rng.uniform(0.5, 2.5)
            # each subscriber reads the election topic in the broker's order, at its own pace, while its clock runs
            for _ in range(0 if p.lagging_until > self.now else self.rng.randint(0, 3)):
                if p.cursor < len(self.log):
                    p.cursor += 1
                    self.carry_out(p, self.feed(p, self.log[p.cursor - 1]))
            due = [item for item in p.inbox if item[0] <= self.now]
            for item in due:
                p.inbox.remove(item)
                self.carry_out(p, self.feed(p, item[1:]))
            self.carry_out(p, p.machine.tick(self.now))
            if p.machine.role is Role.CONTROLLER and self.now >= p.next_heartbeat:
                p.next_heartbeat = self.now + self.HEARTBEAT
                self.retained["heartbeat"] = (p.machine.term, p.name)
                self.broadcast(p.name, "heartbeat", (p.machine.term, p.name))
        self.check_safety()

    def check_safety(self) -> None:
        for term, holders in self.offices.items():
            assert len(holders) <= 1, f"term {term} had controllers {holders}"
        acting: dict[int, list[str]] = {}
        for p in self.peers:
            if p.alive and p.machine.role is Role.CONTROLLER:
                acting.setdefault(p.machine.term, []).append(p.name)
        for term, names in acting.items():
            assert len(names) == 1, f"two controllers acting in term {term}: {names}"

    def run(self) -> None:
        while self.now < self.quiet_from + 25:
            self.step(0.05)

    def agreement(self) -> tuple[int, str]:
        live = [p for p in self.peers if p.joined and p.alive and p.paused_until <= self.now]
        views = {(p.machine.term, p.machine.controller) for p in live}
        assert len(views) == 1, (
            f"peers disagree: {[(p.name, p.machine.term, p.machine.controller, p.machine.role) for p in live]}"
        )
        term, controller = views.pop()
        assert controller in {p.name for p in live}, f"controller {controller} of term {term} is not live"
        leader = next(p for p in live if p.name == controller)
        assert leader.machine.role is Role.CONTROLLER
        return term, controller


@pytest.mark.parametrize("block", range(10))
def test_random_joins_orders_and_failures_never_give_two_controllers_and_end_in_agreement(block):
    # 10 blocks x 110 seeds = 1,100 randomized federations.
    for seed in range(block * 110, (block + 1) * 110):
        sim = Simulation(seed)
        try:
            sim.run()
            sim.agreement()
        except AssertionError as err:
            raise AssertionError(f"seed {seed} (n={sim.n}, min_peers={sim.min_peers}): {err}") from None


def test_without_failures_or_stalls_the_first_term_elects_the_highest_vote():
    # With a peer stalled longer than the window, a lower vote may claim first (and then rightly wins).
    seeds_checked = 0
    for seed in range(300):
        sim = Simulation(seed)
        sim.lag_probability = 0.0
        sim.events.clear()
        sim.quiet_from = max(sim.join_at.values()) + 1
        sim.run()
        term, controller = sim.agreement()
        if term == 1:
            votes = [item for item in sim.log if item[0] == "vote" and item[1] == 1]
            best = max(votes, key=lambda v: (v[4], v[3], v[2]))
            assert controller == best[2], f"seed {seed}"
            seeds_checked += 1
    assert seeds_checked > 200  # most runs decide in the first term
