"""Who is the controller: a pure state machine (no I/O, no clock, no threads), so every interleaving can be tested.

The peer feeds it what it hears (votes, claims, signs of a live controller, peers coming and going) and the time;
it answers with actions for the peer to carry out (cast a vote, send a claim, take office, follow, step down).

How a term is decided
- Every message carries a term; anything of a lower term than ours is stale and ignored.
- A peer that needs an election (first start with enough peers, controller lost or silent, no claim came) moves to
  term + 1 and votes with a random number. A peer that sees a vote of a higher term joins that term and votes too.
- After `window` seconds a peer looks at the votes it has of live peers. If its own is the best by
  (latest global round, vote, peer id), it sends a claim. The round comes first so a peer that missed the last
  aggregation cannot win and lose a finished round; among equals, the highest vote wins, ties broken by id.
- The first claim of a term that arrives decides the term; later claims of that term are ignored. Votes and claims
  share one MQTT topic, and the broker delivers one topic's messages to every subscriber in one order, so every peer
  sees the same first claim. A claimer takes office only when its own claim comes back as that first claim: it
  never acts on a term it might not have won.
- No claim within `window + claim_timeout` (the best voter died): next term. A controller heard from in a term we
  already decided for somebody else (possible only if a broker reorders): next term, so one controller remains.
- Patience grows with failure: from the second term in a row begun because the last came to nothing (no claim in
  time, a controller judged silent or stalled), each such term doubles the window and both timeouts, up to 8x; each
  round finished halves them again. One failure costs nothing (a frozen controller is replaced as fast as ever). On an
  overloaded machine (a hundred peers on two cores, timings set tight) votes, claims and heartbeats arrive late, and
  every new term adds a round of votes to the backlog: without this the peers would elect forever and never train.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from peer.roles.actions import (
    EXIT_GAVE_UP,
    Action,
    CastVote,
    Exit,
    FollowController,
    Log,
    SendClaim,
    StepDown,
    TakeOffice,
    Unconfirmed,
)

MAX_DOUBLINGS = 3  # patience grows to at most 2**3 = 8x the configured timings
STRIKES = ("no-claim", "controller-silent", "controller-stalled")  # reasons that say the last term came to nothing


class Role(str, enum.Enum):
    WAITING = "waiting"  # no controller known yet, not enough peers for the first election
    VOTING = "voting"
    CONTROLLER = "controller"
    FOLLOWER = "follower"


@dataclass(frozen=True)
class ElectionTimings:
    window: float = 1.0  # votes are collected this long before the best voter claims
    claim_timeout: float = 3.0  # after the window, wait this long for a claim before the next term
    heartbeat_timeout: float = 3.0  # a controller unheard for this long is silent (hung, or cut off)
    join_grace: float = 2.5  # a new peer listens this long for a running controller before electing
    give_up_after: float = float("inf")  # waiting this long for enough peers to start, the peer gives up

    @classmethod
    def from_heartbeat(cls, heartbeat: float, window: float, give_up_after: float = float("inf")) -> ElectionTimings:
        return cls(
            window=window,
            claim_timeout=max(3 * window, 3 * heartbeat),
            heartbeat_timeout=3 * heartbeat,
            # A running controller's heartbeat is retained: a newcomer has it as it subscribes. The grace covers the
            # delivery of the retained messages and the others' presence, not a heartbeat interval's wait.
            join_grace=max(1.5 * heartbeat, window),
            give_up_after=give_up_after,
        )


@dataclass
class Election:
    me: str
    min_peers: int
    timings: ElectionTimings
    rng: random.Random
    started_at: float
    term: int = 0
    role: Role = Role.WAITING
    controller: str | None = None
    round: int = 0  # latest global round this peer holds
    live: set[str] = field(default_factory=set)
    votes: dict[str, tuple[int, float]] = field(default_factory=dict)  # this term's: peer -> (round, vote)
    reason: str = "start"
    voted_at: float = 0.0
    claimed: bool = False
    last_heard: float = 0.0  # last sign of life of the controller
    patient_until: float = 0.0  # a model the controller announced is on its way: not silent before this
    unconfirmed: set[str] = field(default_factory=set)  # live peers not heard from since this peer (re)connected
    confirm_by: float = 0.0
    strikes: int = 0  # terms begun because the last came to nothing, less rounds since
    _last_note: str = ""

    def __post_init__(self):
        self.live.add(self.me)

    # --- inputs -------------------------------------------------------------------------------------------------------

    def restore(self, term: int, round_: int) -> None:
        """Going on with a run from its checkpoint: its terms up to `term` are used, and this peer holds `round_`."""
        if self.role is Role.WAITING:
            self.term, self.round = max(self.term, term), max(self.round, round_)

    def is_stale(self, term: int) -> bool:
        return term < self.term

    def progress(self, round_: int) -> None:
        """This peer now holds the global model of `round_`. A finished round is the federation working: patience
        comes back one step per round (not at once, so a load that spoils every other term does not swing it)."""
        if round_ > self.round:
            self.strikes = max(0, self.strikes - (round_ - self.round))
        self.round = max(self.round, round_)

    @property
    def patience(self) -> float:
        """How many times the configured window and timeouts this peer waits now (1, 2, 4 or 8)."""
        return float(2 ** max(0, self.strikes - 1))

    @property
    def silent_after(self) -> float:
        """How long a controller may go unheard before this peer judges it silent, now."""
        return self.timings.heartbeat_timeout * self.patience

    def expect_model(self, term: int, controller: str, until: float) -> None:
        """The controller this peer follows announced a model on its way here (its heartbeat names a round whose
        model this peer does not hold yet). Its next messages come behind that model, however long the broker takes
        to deliver a large model to every peer: until `until` that is no silence. (A controller that dies meanwhile
        is still found by its Last Will, at once when killed, within 1.5 keepalives when hung.)"""
        if self.role is Role.FOLLOWER and term == self.term and controller == self.controller:
            self.patient_until = max(self.patient_until, until)

    def on_retained(self, term: int, controller: str, now: float) -> list[Action]:
        """The broker's retained claim or heartbeat, delivered when this peer subscribes: who led most recently.

        A peer that joins after a term was claimed never saw the claim go by; without this it could be drawn into
        that decided term by a late vote and claim it a second time. Adopting the retained decision keeps it out.
        If the controller named is dead, its silence starts the next term as usual. A retained message naming this
        peer is from an earlier life of its id: it only tells which terms are used up."""
        if term == 0 or term < self.term:
            return []
        if controller == self.me:
            if self.role is Role.WAITING:
                self.term = max(self.term, term)
            return []
        if term > self.term or self.role in (Role.WAITING, Role.VOTING):
            return self.on_controller_seen(term, controller, now)
        return []

    def peer_up(self, peer: str, now: float) -> list[Action]:
        self.live.add(peer)
        self.unconfirmed.discard(peer)
        return []

    def reconnected(self, now: float) -> None:
        """This peer (re)connected to the broker: whoever it counts live must show it still is (every peer announces
        itself on connecting and answers others' announcements) within two heartbeat timeouts. A peer that died while
        the broker was down left no Last Will, so this is the only way to learn it is gone."""
        self.unconfirmed = self.live - {self.me}
        self.confirm_by = now + 2 * self.timings.heartbeat_timeout

    def heard_from(self, peer: str) -> None:
        """Any message of `peer`: it is alive."""
        self.unconfirmed.discard(peer)

    def peer_down(self, peer: str, now: float) -> list[Action]:
        if peer == self.me:
            return []
        self.live.discard(peer)
        if self.role is Role.FOLLOWER and peer == self.controller:
            return self._new_term(now, "controller-lost")
        if self.role is Role.VOTING:
            self.votes.pop(peer, None)  # so the next best voter claims at the window instead of waiting it out
        return []

    def on_vote(self, term: int, peer: str, vote: float, round_: int, reason: str, now: float) -> list[Action]:
        if term < self.term or term == 0:
            return []
        self.live.add(peer)  # a vote of a current term is a sign of life, even one too late to count
        actions: list[Action] = []
        if term > self.term:
            actions = self._enter_term(term, reason, now)
        if self.role is Role.VOTING:
            self.votes[peer] = (round_, vote)
        return actions

    def on_claim(self, term: int, peer: str, reason: str, members: tuple[str, ...], now: float) -> list[Action]:
        if term < self.term or term == 0:
            return []
        if term > self.term:
            actions = self._leave_office("a higher term was claimed") + self._set_term(term, reason)
            return actions + self._decide(peer, members, now)
        if self.role in (Role.VOTING, Role.WAITING):
            return self._decide(peer, members, now)
        return []  # the term is decided: the first claim won, this one came second

    def on_controller_seen(self, term: int, controller: str, now: float) -> list[Action]:
        """A live message from a controller (heartbeat, training order, aggregation, metrics, finish)."""
        if term < self.term or term == 0:
            return []
        if controller == self.me and self.role is not Role.CONTROLLER:
            return []  # an echo of an earlier life of this id (restarted peer): not ours to act on
        if term > self.term:
            actions = self._leave_office("a higher term is running") + self._set_term(term, "joined")
            return actions + self._decide(controller, (), now)
        if self.role in (Role.VOTING, Role.WAITING):
            return self._decide(controller, (), now)
        if controller == self.controller:
            self.last_heard = now
            return []
        # Two controllers in one term: only if messages were reordered. A new term leaves exactly one.
        return self._new_term(now, "conflict")

    def thawed(self, now: float) -> list[Action]:
        """This peer's loop was frozen for longer than a heartbeat timeout (SIGSTOP, a swapped-out host): what it
        is about to hear is stale, and the clock has run past every timer. A controller must assume it was replaced
        and must not act on deadlines that passed while it was away: it steps down into a new term (if the others
        already elected one, it simply follows it). Anyone else gives the messages now arriving a fresh timeout
        before judging the controller silent."""
        if self.role is Role.CONTROLLER:
            return self._new_term(now, "controller-stalled")
        self.last_heard = self.voted_at = now
        return []

    def tick(self, now: float) -> list[Action]:
        if self.unconfirmed and now >= self.confirm_by:
            gone, self.unconfirmed = sorted(self.unconfirmed & self.live), set()
            return [Unconfirmed(peer) for peer in gone]
        t, patience = self.timings, self.patience
        if self.role is Role.WAITING:
            if now - self.started_at < t.join_grace:
                return []
            if len(self.live) >= self.min_peers:
                return self._new_term(now, "start")
            if now - self.started_at >= t.give_up_after:
                return [
                    Log(
                        f"giving up: only {len(self.live)} of {self.min_peers} peers came within "
                        f"{t.give_up_after:.0f}s (--wait-timeout); is every peer on this broker, with the same "
                        "--topic-prefix?",
                        "error",
                    ),
                    Exit(EXIT_GAVE_UP),
                ]
            return self._note(
                f"waiting for peers: {len(self.live)} of {self.min_peers} present before the first election"
            )
        if self.role is Role.VOTING:
            if now - self.voted_at >= (t.window + t.claim_timeout) * patience:
                return self._new_term(now, "no-claim")
            if not self.claimed and now - self.voted_at >= t.window * patience and self.best_voter() == self.me:
                self.claimed = True
                round_, vote = self.votes[self.me]
                return [SendClaim(self.term, vote, round_, self.reason, tuple(sorted(self.votes)))]
            return []
        if self.role is Role.FOLLOWER and now - self.last_heard >= self.silent_after and now >= self.patient_until:
            return self._new_term(now, "controller-silent")
        return []

    # --- queries ------------------------------------------------------------------------------------------------------

    def best_voter(self) -> str | None:
        ballots = [(r, v, p) for p, (r, v) in self.votes.items() if p in self.live]
        return max(ballots)[2] if ballots else None

    # --- transitions --------------------------------------------------------------------------------------------------

    def _new_term(self, now: float, reason: str) -> list[Action]:
        return self._enter_term(self.term + 1, reason, now)

    def _enter_term(self, term: int, reason: str, now: float) -> list[Action]:
        if reason == "controller-silent" and self.controller != self.me:
            # Silent counts as gone until it speaks again (a peer that stepped down or thawed announces itself),
            # so the next controller neither waits for its evaluation nor picks it as a trainer.
            self.live.discard(self.controller)
        if reason in STRIKES:
            self.strikes = min(self.strikes + 1, MAX_DOUBLINGS + 1)
        actions = self._leave_office(f"term {term} began ({reason})") + self._set_term(term, reason)
        self.role = Role.VOTING
        vote = self.rng.random()
        self.votes[self.me] = (self.round, vote)
        self.voted_at = now
        return actions + [CastVote(term, vote, self.round, reason, self.patience)]

    def _set_term(self, term: int, reason: str) -> list[Action]:
        self.term, self.reason = term, reason
        self.controller, self.votes, self.claimed = None, {}, False
        self.patient_until = 0.0
        self._last_note = ""
        return []

    def _leave_office(self, why: str) -> list[Action]:
        if self.role is Role.CONTROLLER:
            self.role = Role.VOTING
            return [StepDown(self.term, why)]
        return []

    def _decide(self, controller: str, members: tuple[str, ...], now: float) -> list[Action]:
        self.controller, self.last_heard = controller, now
        if controller == self.me:
            self.role = Role.CONTROLLER
            return [TakeOffice(self.term, self.reason, members or tuple(sorted(self.live)))]
        self.role = Role.FOLLOWER
        return [FollowController(self.term, controller)]

    def _note(self, text: str) -> list[Action]:
        if text == self._last_note:
            return []
        self._last_note = text
        return [Log(text)]
