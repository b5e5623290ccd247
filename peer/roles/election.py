"""Who is the controller: a pure state machine (no I/O, no clock, no threads), so every interleaving can be tested.

The peer feeds it what it hears (votes, claims, announcements, signs of a live controller, peers coming and going)
and the time; it answers with actions for the peer to carry out (cast a vote, send a claim, take office, follow,
step down).

How a term is decided (Raft's PreVote and leader stickiness, over a broker instead of RPCs)
- Every message carries a term; anything of a lower term than ours is stale and ignored. A peer's term moves only
  when a majority stands behind the new one: nobody, liar or not, moves it alone. A majority is of the live peers
  and of controllers judged silent whose Last Will has not come yet (SILENT_COUNTS_FOR heartbeat timeouts at most):
  a peer whose deliveries lag cannot elect itself alone while its controller, and the others, are fine.
- Campaign. A peer that judges the controller gone (its Last Will came, its heartbeats stopped, no claim came, or
  it is the controller and was frozen) votes for the next term with a random number, but stays in its term: the vote
  is a pre-vote. The next term is past its own and past every term a live member is heard to stand in (a peer that
  restarted never elects a term again), but at most MAX_TERM_STEP past what a majority stands in (one voice moves it
  no further). Another peer joins the campaign (votes too) only if it agrees there is no controller: it is waiting
  for the first election, or the vote comes from its own controller (who resigns), or most of the other peers call
  for that term. A peer that hears a live controller ignores the call (stickiness), and so does a peer still waiting
  out its own election: the vote is kept, and counts once its own timers call the same campaign. So one member
  calling elections moves nobody.
- Entering. A peer enters a term once the votes of a majority for it are in: only then does its term change. A
  campaign that finds no majority is made again after the window and claim timeout (with growing patience), and the
  peer announces itself, so the answers tell it whether the others went on without it; a peer that hears its
  controller again meanwhile simply follows it again. So a term starts at most once per election timeout, and only
  when most peers want it.
- Claim. After `window` seconds a peer that entered a new term by a majority's votes, its own among them, looks at
  that term's votes of live peers. If its own is the best by (latest global round, vote, peer id), it sends a claim.
  The first claim of a term that arrives decides the term; later claims of that term are ignored. Votes and claims
  share one MQTT topic, and the broker delivers messages to every subscriber in one order, so every peer sees the
  same first claim. (A peer that subscribed after the claims went by gets them retained, in no order: a live claim of
  that term that comes after is a late one, not the first.) A claimer takes office only when its own claim comes back
  as that first claim: it never acts on a term it might not have won.
- Catching up. A peer that missed terms (it just started, reconnected, or thawed) adopts a later term only when a
  majority of the other peers it hears, at least two, stand in it (by their announcements, claims and heartbeats; a
  peer that has followed nobody yet, with one other peer only, takes that one's term if it is at most MAX_TERM_STEP
  past its own; a controller also by its members' answers, solutions and evaluations, of a later term: one cut off
  while the others elected anew steps down so), or when most others voted for it and its claim came, live or retained
  (after a broker restart a peer that voted for a term, then heard its old controller again first, goes on to the
  term most others voted for once it learns it was claimed). It then follows the term's first claim if it saw it,
  else the peer acting as its controller whose claim the broker kept, else (if it watched none of that term's
  election) the first peer heard acting as its controller among those that voted in it; it never claims a term it
  caught up to. A new life listens for its join grace before it moves at all. The same rules hold from term 0 as
  later: a retained claim of term 2^31 - 2 moves nobody. A peer in a term nobody claimed or led (it got the votes;
  the others heard their controller again first) goes back to the controller it followed before, when it speaks and
  most others still stand in that term.
- No claim within `window + claim_timeout` (the best voter died): campaign for the next term. A controller message
  of our term from anyone but our controller is not obeyed (only the first claim decides who leads a term).
- The top of the term range is a refusal: no peer campaigns for a term past MAX_TERM - 1 (it says so in one line).
  With terms entered only by a majority, once per election timeout, by at most MAX_TERM_STEP + 1 at a time, the
  range lasts longer than any run.
- Patience grows with failure: from the second campaign in a row begun because the last came to nothing (no claim
  in time, no majority, a controller judged silent or stalled), each such campaign doubles the window and both
  timeouts, up to 8x; each round finished halves them again. One failure costs nothing (a frozen controller is
  replaced as fast as ever). On an overloaded machine (a hundred peers on two cores, timings set tight) votes,
  claims and heartbeats arrive late, and every new term adds a round of votes to the backlog: without this the
  peers would elect forever and never train.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field

from peer.roles.actions import (
    EXIT_GAVE_UP,
    Action,
    Announce,
    CastVote,
    Exit,
    FollowController,
    Log,
    SendClaim,
    StepDown,
    TakeOffice,
    Unconfirmed,
)
from peer.wire.messages import MAX_TERM

MAX_DOUBLINGS = 3  # patience grows to at most 2**3 = 8x the configured timings
# reasons that say the last campaign came to nothing
STRIKES = ("no-claim", "no-majority", "controller-silent", "controller-stalled")
TERMS_KEPT = 8  # terms ahead of ours whose votes, claims and sightings are kept: the nearest (a flood of far terms
PER_TERM_KEPT = 4  # claims and sightings kept per term, the first ones      costs no more than this)
SILENT_COUNTS_FOR = 4  # heartbeat timeouts a silent controller still counts in majorities (its Last Will comes first)
# A campaign is for a term past every term a live member is heard to stand in (peers that restarted must not elect a
# term again), but a member alone moves it at most this far past what a majority stands in: one liar's term 2^31 - 2
# moves nobody, and no campaign jumps more than this.
MAX_TERM_STEP = 100


class Role(str, enum.Enum):
    WAITING = "waiting"  # no controller known yet, not enough peers for the first election
    VOTING = "voting"  # campaigning (voted for the next term, no majority yet), or in a term with no claim yet
    CONTROLLER = "controller"
    FOLLOWER = "follower"


@dataclass(frozen=True)
class ElectionTimings:
    window: float = 1.0  # votes are collected this long before the best voter claims
    claim_timeout: float = 3.0  # after the window, wait this long for a claim (or a majority) before trying again
    heartbeat_timeout: float = 3.0  # a controller unheard for this long is silent (hung, or cut off)
    join_grace: float = 2.5  # a new peer listens this long for a running controller before electing
    give_up_after: float = float("inf")  # waiting this long for enough peers to start, the peer gives up

    @classmethod
    def from_heartbeat(cls, heartbeat: float, window: float, give_up_after: float = float("inf")) -> ElectionTimings:
        return cls(
            window=window,
            claim_timeout=max(3 * window, 3 * heartbeat),
            heartbeat_timeout=3 * heartbeat,
            join_grace=max(2.5 * heartbeat, window),
            give_up_after=give_up_after,
        )


def _keep(store: dict, term: int, floor: int) -> bool:
    """Whether `store` (term -> something) may hold an entry for `term`: terms below `floor` are history, and of the
    terms ahead only the TERMS_KEPT nearest are kept (a farther one is dropped to make room for a nearer one)."""
    if term < floor:
        return False
    if term in store or len(store) < TERMS_KEPT:
        return True
    farthest = max(store)
    if term > farthest:
        return False
    del store[farthest]
    return True


@dataclass
class Election:
    me: str
    min_peers: int
    timings: ElectionTimings
    rng: random.Random
    started_at: float
    term: int = 0  # the last term this peer entered (a majority stood behind it), or restored from a checkpoint
    role: Role = Role.WAITING
    controller: str | None = None  # of `term`; kept while campaigning: if it speaks again, this peer follows it again
    campaign: int = 0  # the term this peer last voted for: above `term` while no majority stands behind it yet
    round: int = 0  # latest global round this peer holds
    live: set[str] = field(default_factory=set)
    # Controllers judged silent and not (yet) gone: out of `live` (nobody waits for them), but counted in every
    # majority until their Last Will comes (or SILENT_COUNTS_FOR heartbeat timeouts pass): a peer whose deliveries lag
    # must not elect itself alone while its controller, and the majority, are fine.
    silent: dict[str, float] = field(default_factory=dict)
    ballots: dict[int, dict[str, tuple[int, float]]] = field(default_factory=dict)  # term -> voter -> (round, vote)
    claims: dict[int, list[tuple[str, tuple[str, ...]]]] = field(default_factory=dict)  # term -> (claimer, members)
    sightings: dict[int, list[str]] = field(default_factory=dict)  # term -> peers heard acting as its controller
    retained_claims: dict[int, list[str]] = field(default_factory=dict)  # term -> peers whose retained claim names it
    # Terms whose first claim went by before this peer subscribed (their claims came retained, before any live one):
    # a live claim of such a term came after those, so it is a late claim, not the one that decided the term.
    missed_claims: set[int] = field(default_factory=set)
    reasons: dict[int, str] = field(default_factory=dict)  # term -> why it began (its first vote's reason)
    stood: dict[str, int] = field(default_factory=dict)  # peer -> the latest term it stood in (init, claim, led)
    called: dict[str, int] = field(default_factory=dict)  # peer -> the latest term it voted for
    strangers: set[str] = field(default_factory=set)  # peers of another model: never members, but they say terms
    caught_up: bool = False  # this term was entered by catching up: if it saw no claim, it follows its controller
    first_term: int = 0  # the term this life started in (0, or its checkpoint's): it had no controller in it
    reason: str = "start"
    voted_at: float = 0.0
    claimed: bool = False
    last_heard: float = 0.0  # last sign of life of the controller
    patient_until: float = 0.0  # a model the controller announced is on its way: not silent before this
    unconfirmed: set[str] = field(default_factory=set)  # live peers not heard from since this peer (re)connected
    confirm_by: float = 0.0
    strikes: int = 0  # campaigns begun because the last came to nothing, less rounds since
    asked_at: float = float("-inf")  # when this peer last announced itself to learn where the others are
    left: tuple[int, str] | None = None  # the last term this peer had a controller in, and who (it may go back)
    _last_note: str = ""

    def __post_init__(self):
        self.live.add(self.me)

    @property
    def votes(self) -> dict[str, tuple[int, float]]:
        """This term's votes: peer -> (round, vote)."""
        return self.ballots.setdefault(self.term, {})

    # --- inputs -------------------------------------------------------------------------------------------------------

    def restore(self, term: int, round_: int) -> None:
        """Going on with a run from its checkpoint: its terms up to `term` are used, and this peer holds `round_`."""
        if self.role is Role.WAITING:
            self.term, self.round = max(self.term, term), max(self.round, round_)
            self.campaign = self.first_term = max(self.campaign, self.term)

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

    def on_init(self, peer: str, term: int, now: float) -> list[Action]:
        """A member announced itself, in `term`: it is live, and it stands in that term."""
        self._stand(peer, term)
        self.peer_up(peer, now)
        return self._agreement(now)

    def stranger(self, peer: str, term: int, now: float) -> list[Action]:
        """A peer of another model announced itself: never a member (it does not count, its ballots are ignored), but
        a peer that is itself the odd one out learns from such announcements which term the run is in."""
        self.strangers.add(peer)
        self._stand(peer, term)
        return self._agreement(now)

    def on_retained(self, term: int, leader: str, now: float, claim: bool = True) -> list[Action]:
        """The broker's retained claim or heartbeat, delivered when this peer subscribes. Both say their sender stood
        in that term. A heartbeat also says who led it: a peer that catches up to that term follows it. (A retained
        claim does not: the broker hands them over in no order, and a late claim of a decided term stays retained
        too.) One naming this peer is from an earlier life of its id: ignored."""
        if term == 0 or term < self.term:
            return []
        self._stand(leader, term)
        if leader == self.me:
            return []  # an earlier life of this id stood in that term: this one will campaign past it
        if claim:
            self._add_to(self.retained_claims, term, leader)
            if leader in self.retained_claims.get(term, []) and not self.claims.get(term):
                self.missed_claims = {t for t in self.missed_claims if t in self.retained_claims} | {term}
        else:
            self._add_sighting(term, leader)
        if term == self.term and self.role is Role.VOTING and self.controller is None:
            return self._decide_known(now)
        return self._agreement(now)

    def peer_up(self, peer: str, now: float) -> list[Action]:
        self.live.add(peer)
        self.silent.pop(peer, None)
        self.unconfirmed.discard(peer)
        return []

    def reconnected(self, now: float) -> None:
        """This peer (re)connected to the broker: whoever it counts live must show it still is (every peer announces
        itself on connecting and answers others' announcements) within two heartbeat timeouts. A peer that died while
        the broker was down left no Last Will, so this is the only way to learn it is gone."""
        self.unconfirmed = self.live - {self.me}
        self.confirm_by = now + 2 * self.timings.heartbeat_timeout

    def unconfirmed_until_heard(self, peer: str, now: float) -> None:
        """`peer` is counted live on old news (a retained presence): unless it is heard from within two heartbeat
        timeouts (every peer answers a newcomer's init within about one), it is counted gone."""
        if not self.unconfirmed:
            self.confirm_by = now + 2 * self.timings.heartbeat_timeout
        self.unconfirmed.add(peer)

    def heard_from(self, peer: str) -> None:
        """Any message of `peer`: it is alive."""
        self.unconfirmed.discard(peer)

    def peer_down(self, peer: str, now: float) -> list[Action]:
        if peer == self.me:
            return []
        self.live.discard(peer)
        self.silent.pop(peer, None)
        if self.role is Role.FOLLOWER and peer == self.controller:
            return self._campaign(self.next_term(), "controller-lost", now)
        return self._agreement(now)  # fewer live peers: a majority may now stand behind a later term

    def on_vote(self, term: int, peer: str, vote: float, round_: int, reason: str, now: float) -> list[Action]:
        if term < self.term or term == 0:
            return []
        self.live.add(peer)  # a vote of a current term is a sign of life, even one too late to count
        if term > self.called.get(peer, 0):
            self.called[peer] = term
        if _keep(self.ballots, term, self.term):
            self.ballots.setdefault(term, {})[peer] = (round_, vote)
            self.reasons.setdefault(term, reason)
        if term == self.next_term() and self.campaign < term and self._answers_call(peer):
            return self._campaign(term, reason, now)
        return self._agreement(now)

    def on_claim(self, term: int, peer: str, reason: str, members: tuple[str, ...], now: float) -> list[Action]:
        if term < self.term or term == 0:
            return []
        self._stand(peer, term)
        self._add_claim(term, peer, members)
        if term == self.term:
            if self.role is Role.VOTING and self.controller is None:
                return self._decide_known(now)
            return []  # the term is decided: the first claim won, this one came second
        return self._agreement(now)

    def on_answer(self, peer: str, term: int, now: float) -> list[Action]:
        """A member's answer to a controller (a solution or an evaluation) of a later term than ours: it stands in
        that term. What a controller whose term was replaced while it was cut off (a broker restart: the others
        elected a new controller while it was away) learns from: its followers answer the new controller, on the
        topics it still reads. Once most of the others stand in that term it catches up (and steps down). One
        member alone moves nobody, as with an announcement."""
        if term <= self.term or term == 0 or peer == self.me:
            return []
        self._stand(peer, term)
        return self._agreement(now)

    def on_controller_seen(self, term: int, controller: str, now: float) -> list[Action]:
        """A live message from a controller (heartbeat, training order, aggregation, metrics, finish). One of an earlier
        term than ours is stale, and moves this peer only back from a term that came to nothing (`_go_back`)."""
        if 0 < term < self.term:
            return self._go_back(term, controller, now)
        if term == 0:
            return []
        if controller == self.me and self.role is not Role.CONTROLLER:
            return []  # an echo of an earlier life of this id (restarted peer): not ours to act on
        self._stand(controller, term)
        self._add_sighting(term, controller)
        if term > self.term:
            return self._agreement(now)
        if controller == self.controller:
            self.last_heard = now
            if self.role is Role.VOTING:
                # Campaigning because it seemed gone, and it speaks: it was not (only this peer missed it).
                self.role, self.campaign = Role.FOLLOWER, self.term
                self.live.add(controller)
                self.silent.pop(controller, None)
                return [
                    Log(f"{controller}, controller of term {term}, is heard again: following it again"),
                    FollowController(self.term, controller),
                ]
            return []
        if self.role is Role.VOTING and self.controller is None:
            return self._decide_known(now)
        return []  # not the controller of this term: its messages are not obeyed

    def _go_back(self, term: int, controller: str, now: float) -> list[Action]:
        """A controller of an earlier term speaks while this peer is in a term that came to nothing: it entered it by
        the votes of a majority, but nobody claimed or led it, because the others heard their controller again first
        and went back to it (a broker restart: every Will, then every peer reconnecting; only this peer got the
        votes in time). If most of the other peers stand in that earlier term and it is the term's leader, the
        federation went on without this peer's term: it goes back and follows that controller (else it would call
        elections nobody joins, for ever). Its term's votes and the others' calls for later terms are forgotten:
        they came to nothing, and would pull it straight back."""
        if (
            self.role is not Role.VOTING
            or controller == self.me
            or self.claims.get(self.term)
            or self.sightings.get(self.term)
            or self.stood_term() != term
            or self.left != (term, controller)
        ):
            return []
        self.term, self.campaign, self.controller, self.last_heard = term, term, controller, now
        self.role, self.caught_up, self.patient_until = Role.FOLLOWER, False, 0.0
        self.live.add(controller)
        self.silent.pop(controller, None)
        for store in (self.ballots, self.claims, self.sightings, self.retained_claims, self.reasons):
            for later in [t for t in store if t > term]:
                del store[later]
        self.missed_claims = {t for t in self.missed_claims if t <= term}
        self.called = {peer: min(called, term) for peer, called in self.called.items()}
        return [
            Log(
                f"{controller}, controller of term {term}, is followed by the others: back to it from a term that came to nothing"
            ),
            FollowController(term, controller),
        ]

    def thawed(self, now: float) -> list[Action]:
        """This peer's loop was frozen for longer than a heartbeat timeout (SIGSTOP, a swapped-out host): what it
        is about to hear is stale, and the clock has run past every timer. A controller must assume it was replaced
        and must not act on deadlines that passed while it was away: it steps down and campaigns for a new term (if
        the others already elected one, it simply follows it). Anyone else gives the messages now arriving a fresh
        timeout before judging the controller silent."""
        if self.role is Role.CONTROLLER:
            return self._campaign(self.next_term(), "controller-stalled", now)
        self.last_heard = self.voted_at = now
        return []

    def tick(self, now: float) -> list[Action]:
        if self.unconfirmed and now >= self.confirm_by:
            gone, self.unconfirmed = sorted(self.unconfirmed & self.live), set()
            return [Unconfirmed(peer) for peer in gone]
        for peer, since in list(self.silent.items()):
            if now - since >= SILENT_COUNTS_FOR * self.timings.heartbeat_timeout:
                del self.silent[peer]
        t, patience = self.timings, self.patience
        if self.role is Role.WAITING:
            if now - self.started_at < t.join_grace:
                return []
            moved = self._agreement(now)  # what it heard while listening: a run to catch up with, a campaign
            if self.role is not Role.WAITING:
                return moved
            if self.sightings and max(self.sightings) > self.term and now - self.asked_at >= self.silent_after:
                # Someone leads a later term, and the answers to this peer's init did not say so (they came before
                # that term began): ask again, at most once per heartbeat timeout.
                self.asked_at = now
                return [Announce()]
            if len(self.live) >= self.min_peers:
                return self._campaign(self.next_term(), "start", now)
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
            timed_out = now - self.voted_at >= (t.window + t.claim_timeout) * patience
            if self.campaign > self.term:
                # No majority stood behind the campaign: try again, and ask where the others are (they answer an
                # init with their own: if they went on without this peer, it catches up).
                again = max(self.campaign, self.next_term())
                return [Announce(), *self._campaign(again, "no-majority", now)] if timed_out else []
            if timed_out:
                return self._campaign(self.next_term(), "no-claim", now)
            if (
                not self.claimed
                and now - self.voted_at >= t.window * patience
                and self.may_claim()
                and self.best_voter() == self.me
            ):
                self.claimed = True
                round_, vote = self.votes[self.me]
                return [SendClaim(self.term, vote, round_, self.reason, tuple(sorted(self.votes)))]
            return []
        if self.role is Role.FOLLOWER and now - self.last_heard >= self.silent_after and now >= self.patient_until:
            return self._campaign(self.next_term(), "controller-silent", now)
        return []

    # --- queries ------------------------------------------------------------------------------------------------------

    def best_voter(self) -> str | None:
        ballots = [(r, v, p) for p, (r, v) in self.votes.items() if p in self.live]
        return max(ballots)[2] if ballots else None

    @property
    def majority(self) -> int:
        """How many peers are a majority: of the live peers and the controllers judged silent but not gone."""
        return len(self.live | set(self.silent)) // 2 + 1

    def elected_term(self) -> int:
        """The latest term (later than ours) the votes of a majority of the live peers are in for, this peer's own
        among them or not; else our own term."""
        majority = self.majority
        for term in sorted((t for t in self.ballots if t > self.term), reverse=True):
            if len(set(self.ballots[term]) & self.live) >= majority:
                return term
        return self.term

    def may_claim(self) -> bool:
        """Whether this peer may claim its term: it entered it as a new term, voted in it, and saw the votes of a
        majority of the live peers (it watched the election from its start: a peer that caught up to a term, one
        that others already stood in, may have missed its claim)."""
        voters = set(self.votes) & self.live
        return not self.caught_up and self.me in voters and len(voters) >= self.majority

    def stood_term(self) -> int:
        """The latest term a majority of the other peers this peer hears stand in (by what they announced, claimed or
        led), at least two of them: the term a peer that missed elections catches up to. One peer alone, whatever it
        says, moves nobody this way, with one exception: a peer that stands in no term yet (it just started, and has
        followed nobody, among one other) takes the other's term if it is at most MAX_TERM_STEP past its own (else a
        campaign settles it)."""
        others = [self.stood.get(p, 0) for p in (self.live | self.strangers) - {self.me}]
        new = self.term == self.first_term and self.controller is None  # it has followed nobody in this life
        if len(others) == 1 and new and others[0] <= self.term + MAX_TERM_STEP:
            return others[0]
        return self._majority_of_others(2, self.stood)

    def called_term(self) -> int:
        """The latest term a majority of the other peers stand in or vote for: if later than the term they stand in,
        a campaign most peers want, which this peer joins."""
        return self._majority_of_others(1, self.stood, self.called)

    def _majority_of_others(self, fewest: int, *sources: dict[str, int]) -> int:
        terms = sorted(
            (max(source.get(p, 0) for source in sources) for p in (self.live | self.strangers) - {self.me}),
            reverse=True,
        )
        needed = max(len(terms) // 2 + 1, fewest)
        return terms[needed - 1] if len(terms) >= needed else 0

    def next_term(self) -> int:
        """The term this peer campaigns for: past its own, and past the latest term a live member (or an earlier life
        of this id) is heard to stand in, but never more than MAX_TERM_STEP past what a majority stands in."""
        base = max(self.term, self.stood_term())
        heard = max((t for p, t in self.stood.items() if p in self.live), default=0)
        return max(base, min(heard, base + MAX_TERM_STEP)) + 1

    # --- transitions --------------------------------------------------------------------------------------------------

    def _stand(self, peer: str, term: int) -> None:
        if term > self.stood.get(peer, 0):
            self.stood[peer] = term

    def _add_claim(self, term: int, peer: str, members: tuple[str, ...]) -> None:
        if _keep(self.claims, term, self.term):
            claims = self.claims.setdefault(term, [])
            if len(claims) < PER_TERM_KEPT and all(p != peer for p, _ in claims):
                claims.append((peer, members))

    def _add_sighting(self, term: int, peer: str) -> None:
        self._add_to(self.sightings, term, peer)

    def _add_to(self, store: dict[int, list[str]], term: int, peer: str) -> None:
        if _keep(store, term, self.term):
            seen = store.setdefault(term, [])
            if len(seen) < PER_TERM_KEPT and peer not in seen:
                seen.append(peer)

    def _listening(self, now: float) -> bool:
        """A peer that just started (or restarted) listens for its join grace before it moves at all: until it has
        heard who is here (retained presence) and which term each stands in (their answers to its init), one voice
        could look like a majority."""
        return self.role is Role.WAITING and now - self.started_at < self.timings.join_grace

    def _answers_call(self, peer: str) -> bool:
        """Whether a vote of `peer` for the next term makes this peer campaign too: only if it agrees there is no
        controller. A peer waiting for the first election does; so does a follower whose own controller resigns.
        A peer that hears a live controller, or waits out its own election, does not (the vote is kept, and counts
        once its own timers call the same campaign)."""
        return self.role is Role.WAITING or (self.role is Role.FOLLOWER and peer == self.controller)

    def _agreement(self, now: float) -> list[Action]:
        """Move to where the majority is, if it is past this peer: a new term a majority voted in; or the term most
        others stand in (catching up); or, if most others call for a later one, their campaign (this peer votes
        too)."""
        if self._listening(now):
            return []
        elected, stood = self.elected_term(), min(self.stood_term(), MAX_TERM - 1)
        if elected > max(self.term, stood):  # a new term: a majority votes in it, and no majority stood in it yet
            return self._enter(elected, now, caught_up=False)
        if stood > self.term:
            return self._enter(stood, now, caught_up=True) + self._agreement(now)
        wanted = self.next_term()
        called = min(self.called_term(), wanted + MAX_TERM_STEP, MAX_TERM - 1)  # (one voice moves it no further)
        if called > self.term and (self.claims.get(called) or self.retained_claims.get(called)):
            # Most others voted for it, and its claim came (live, or kept by the broker for a peer that reconnected
            # after it went by): decided. (This peer may have voted for it too, then heard its old controller again.)
            return self._enter(called, now, caught_up=True)
        ready = self.role is not Role.WAITING or len(self.live) >= self.min_peers
        if called >= wanted and called > self.campaign and ready:  # most others want a new term: so does this peer
            return self._campaign(called, self.reasons.get(called, "joined"), now)
        if self.role is Role.VOTING and self.controller is None:
            return self._decide_known(now)
        return []

    def _campaign(self, term: int, reason: str, now: float) -> list[Action]:
        """Vote for `term` (the next one, or the same again after a campaign found no majority)."""
        if term >= MAX_TERM:
            return self._note(
                f"cannot campaign for term {term}: the last usable term is {MAX_TERM - 1}; this run cannot elect "
                "again (start a new run)",
                "error",
            )
        if reason == "controller-silent" and self.controller not in (None, self.me):
            # Silent counts as gone until it speaks again (a peer that stepped down or thawed announces itself),
            # so the next controller neither waits for its evaluation nor picks it as a trainer; it still counts in
            # the majority until its Last Will comes.
            self.live.discard(self.controller)
            self.silent[self.controller] = now
        if reason in STRIKES:
            self.strikes = min(self.strikes + 1, MAX_DOUBLINGS + 1)
        actions = self._leave_office(f"campaigning for term {term} ({reason})")
        self.role, self.reason, self.claimed = Role.VOTING, reason, False
        self.reasons.setdefault(term, reason)
        actions += self._vote(term, now)
        return actions + self._agreement(now)

    def _vote(self, term: int, now: float) -> list[Action]:
        vote = self.rng.random()
        if _keep(self.ballots, term, self.term):
            self.ballots.setdefault(term, {})[self.me] = (self.round, vote)
        self.campaign, self.voted_at = term, now
        return [CastVote(term, vote, self.round, self.reason, self.patience)]

    def _enter(self, term: int, now: float, caught_up: bool) -> list[Action]:
        """This peer's term becomes `term`: its votes are in (this peer claims it if its vote is the best), or it
        caught up to it (it follows its claim, or its controller). A peer that did not vote waits for the claim, and
        if none comes in time, campaigns for the next term."""
        why = self.reasons.get(term, "joined") if self.campaign != term else self.reason
        actions = self._leave_office(f"term {term} began ({why})")
        # A peer that saw the votes of its majority watched its election: it waits for the claim (which comes after
        # those votes), and never follows a mere sighting.
        voters = set(self.ballots.get(term, {}))
        caught_up = caught_up and len(voters & self.live) < self.majority
        if self.controller is not None:
            self.left = (self.term, self.controller)
        self.term, self.controller, self.claimed, self.caught_up = term, None, False, caught_up
        self.patient_until = 0.0  # an announced model was of the term before
        if self.campaign != term:
            self.reason = why
            self.voted_at = now  # the no-claim timeout counts from here
        self.campaign = max(self.campaign, term)
        self.role = Role.VOTING
        self._forget_before(term)
        self._last_note = ""
        return actions + self._decide_known(now)

    def _forget_before(self, term: int) -> None:
        for store in (self.ballots, self.claims, self.sightings, self.retained_claims, self.reasons):
            for old in [t for t in store if t < term]:
                del store[old]
        self.missed_claims = {t for t in self.missed_claims if t >= term}

    def _decide_known(self, now: float) -> list[Action]:
        """Follow this term's leader if it is known: its first claim; else (this peer missed the claim: it subscribed
        after) the first peer heard acting as its controller whose claim of the term the broker kept; else, if this
        peer caught up to the term (it did not watch its election), the first peer heard acting as its controller
        among those that voted in it (if it saw any vote of it), or at all (if it saw none). A live claim of a term
        whose claims this peer got retained is not its first claim (that one went by before this peer subscribed:
        after a broker restart two peers may each have claimed the term, and the first one decided it)."""
        if self.term == 0:
            return []
        claims = self.claims.get(self.term, [])
        if claims and self.term not in self.missed_claims:
            return self._decide(*claims[0], now)
        seen = self.sightings.get(self.term, [])
        leaders = [p for p in seen if p in self.retained_claims.get(self.term, [])]
        if not leaders and self.caught_up:
            voters = set(self.ballots.get(self.term, {})) - {self.me}
            leaders = [p for p in seen if p in voters] if voters else seen
        return self._decide(leaders[0], (), now) if leaders else []

    def _leave_office(self, why: str) -> list[Action]:
        if self.role is Role.CONTROLLER:
            self.role = Role.VOTING
            return [StepDown(self.term, why)]
        return []

    def _decide(self, controller: str, members: tuple[str, ...], now: float) -> list[Action]:
        self.controller, self.last_heard, self.campaign = controller, now, self.term
        self.live.add(controller)
        if controller == self.me:
            self.role = Role.CONTROLLER
            return [TakeOffice(self.term, self.reason, members or tuple(sorted(self.live)))]
        self.role = Role.FOLLOWER
        return [FollowController(self.term, controller)]

    def _note(self, text: str, level: str = "info") -> list[Action]:
        if text == self._last_note:
            return []
        self._last_note = text
        return [Log(text, level)]
