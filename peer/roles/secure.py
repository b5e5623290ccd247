"""Secure aggregation in a round attempt, as two pure machines: the controller's `SecureCollector` and a chosen
trainer's `SecureTrainer` (docs/PROTOCOL.md, Secure aggregation; the cryptography is `peer.learning.secagg`).

They take messages and `now` and return actions (`peer.roles.actions`), like the controller and the follower that
hold them: the controller makes a collector per attempt instead of collecting solutions, the follower a trainer per
order it is chosen for. Nothing of an attempt outlives it: a new order (a retry, a new term, the next round) makes
new ones, with fresh keys.
"""

from __future__ import annotations

import base64
import math
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from peer.learning.secagg.errors import SecAggError
from peer.learning.secagg.masking import Advertisement, Trainer, Unmasker, UnmaskRequest, minimum_threshold
from peer.learning.secagg.masking import Roster as SecAggRoster
from peer.learning.secagg.quantize import DEFAULT_CLIP, Quantizer, flatten, unflatten, weight_of
from peer.learning.secagg.shamir import share_bytes, share_from_bytes
from peer.roles.actions import Action, Log, Publish
from peer.wire.messages import Keys, Masked, Maskers, Message, Reveal, Roster, Shares, Training, Unmask

PHASE_SHARE = 0.25  # the keys, the shares and the reveals may each take this share of the round deadline
Entropy = Callable[[int], bytes]


def attempt_context(term: int, round_: int, attempt: int, digest: str) -> bytes:
    """What every key, share and mask of one attempt is bound to: the term, round and attempt, and the model the
    order names."""
    return f"sdfl|{term}|{round_}|{attempt}|{digest}".encode()


def _attempt_of(message: Message) -> tuple:
    return (getattr(message, "term", None), getattr(message, "round", None), getattr(message, "attempt", None))


def _advertisement(row: Sequence[str]) -> Advertisement:
    peer, share_key, mask_key, seed_digest = row
    return Advertisement(peer, bytes.fromhex(share_key), bytes.fromhex(mask_key), bytes.fromhex(seed_digest))


def _row(advert: Advertisement) -> tuple[str, str, str, str]:
    return (advert.peer, advert.share_key.hex(), advert.mask_key.hex(), advert.seed_digest.hex())


@dataclass(frozen=True)
class SecureResult:
    """The unmasked round: the new global weights (float32, the model's shapes) and whose updates are in them."""

    weights: list[np.ndarray]
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    liars: tuple[str, ...]


class SecureCollector:
    """The controller's side of one attempt: keys -> roster -> shares -> maskers -> masked vectors -> unmask ->
    reveals -> the sum. `advance(now)` moves it on; `failed` (a reason) or `result` says when it is over."""

    def __init__(
        self,
        me: str,
        order: Training,
        global_weights: Sequence[np.ndarray],
        quorum: int,
        caps: Mapping[str, int],
        now: float,
        round_deadline: float,
        clip: float = DEFAULT_CLIP,
    ):
        self.me, self.order = me, order
        self.key = (order.term, order.round, order.attempt)
        self.context = attempt_context(order.term, order.round, order.attempt, order.digest)
        self.origin = [np.asarray(w, np.float32) for w in global_weights]
        self.length = sum(int(w.size) for w in self.origin)
        self.quorum = max(2, quorum)
        self.caps = dict(caps)
        self.quantizer = Quantizer(clip)
        self.step_s = round_deadline * PHASE_SHARE
        self.expiry = max(1, math.ceil(round_deadline))  # a request older than a round is of a round gone by
        self.deadline = now + round_deadline  # for the masked vectors, as for solutions
        self.phase = "keys"
        self.phase_ends = now + self.step_s
        self.adverts: dict[str, Advertisement] = {}
        self.roster: SecAggRoster | None = None
        self.weight_bound = 0
        self.sharers: set[str] = set()
        self.unmasker: Unmasker | None = None
        self.samples: dict[str, int] = {}
        self.lost: set[str] = set()
        self.requests: list[Message] = []  # what this attempt published, to send again after a broker outage
        self.failed: str | None = None
        self.result: SecureResult | None = None

    # --- inputs ---------------------------------------------------------------------------------------------------

    def offer(self, message: Message) -> str | None:
        """Take a trainer's keys, shares, masked vector or reveal; or say why not (a reason for the log)."""
        if _attempt_of(message) != self.key:
            return "it is of another attempt"
        if self.failed or self.result:
            return "the attempt is over"
        sender = message.sender
        if isinstance(message, Keys):
            return self._keys(message)
        if isinstance(message, Shares):
            if self.roster is None or sender not in self.roster.peers:
                return f"{sender} is not in the roster"
            if {recipient for recipient, _ in message.ciphertexts} != set(self.roster.peers) - {sender}:
                return f"the shares of {sender} are not one for every other member of the roster"
            self.sharers.add(sender)  # the controller cannot read them: it only learns who shared
            return None
        if isinstance(message, Masked):
            return self._masked(message)
        if isinstance(message, Reveal):
            return self._reveal(message)
        return f"no secure aggregation step takes a {message.TYPE}"

    def trainer_lost(self, peer: str) -> None:
        self.lost.add(peer)

    def advance(self, now: float) -> list[Action]:
        """Publish the next request when its phase is complete (or its time is up with enough in), or fail."""
        try:
            if self.phase == "keys":
                return self._after_keys(now)
            if self.phase == "shares":
                return self._after_shares(now)
            if self.phase == "masked":
                return self._after_masked(now)
            if self.phase == "reveal":
                return self._after_reveals(now)
        except SecAggError as err:
            self.failed = str(err)
        return []

    # --- steps ----------------------------------------------------------------------------------------------------

    def _keys(self, message: Keys) -> str | None:
        if self.phase != "keys":
            return "the roster is fixed"
        if message.peer not in self.order.trainers:
            return f"{message.peer} was not chosen"
        if self.caps.get(message.peer, 0) <= 0:
            return f"{message.peer} announced no training samples: its weight cannot be bounded"
        try:
            advert = _advertisement((message.peer, message.share_key, message.mask_key, message.seed_digest))
        except (SecAggError, ValueError) as err:
            return str(err)
        if message.peer in self.adverts and self.adverts[message.peer] != advert:
            return f"{message.peer} sent other keys already"
        self.adverts[message.peer] = advert
        return None

    def _masked(self, message: Masked) -> str | None:
        if self.unmasker is None:
            return "no maskers were named yet"
        cap = self.caps.get(message.peer, 0)
        if message.samples <= 0 or message.samples > cap:
            return f"it declares {message.samples} samples, not 1 to the {cap} it announced"
        if len(message.weights) != 1:
            return "a masked vector is one tensor"
        why_not = self.unmasker.offer_masked(message.peer, message.weights[0])
        if why_not is None:
            self.samples[message.peer] = message.samples
        return why_not

    def _reveal(self, message: Reveal) -> str | None:
        if self.unmasker is None or self.unmasker.request is None:
            return "no unmask request went out"
        try:
            shares = {owner: share_from_bytes(bytes.fromhex(value)) for owner, value in message.shares}
        except (SecAggError, ValueError) as err:
            return str(err)
        return self.unmasker.offer_reveal(message.peer, shares)

    def _waiting_on(self, have: set[str], expected: Sequence[str]) -> bool:
        return bool(set(expected) - have - self.lost)

    def _after_keys(self, now: float) -> list[Action]:
        if self._waiting_on(set(self.adverts), self.order.trainers) and now < self.phase_ends:
            return []
        members = sorted(self.adverts)
        if len(members) < self.quorum:
            raise SecAggError(f"keys from {len(members)} trainers, {self.quorum} needed")
        threshold = max(minimum_threshold(len(members)), min(self.quorum, len(members)))
        self.roster = SecAggRoster.of(self.context, threshold, self.adverts.values())
        self.weight_bound = sum(self.caps[p] for p in members)
        message = Roster(
            self.order.term,
            self.me,
            self.order.round,
            self.order.attempt,
            threshold,
            self.quantizer.clip,
            self.weight_bound,
            tuple(_row(a) for a in self.roster.members),
        )
        self.phase, self.phase_ends = "shares", now + self.step_s
        return self._publish(message, f"roster of {len(members)} trainers ({','.join(members)}), threshold {threshold}")

    def _after_shares(self, now: float) -> list[Action]:
        assert self.roster is not None
        if self._waiting_on(self.sharers, self.roster.peers) and now < self.phase_ends:
            return []
        maskers = tuple(p for p in self.roster.peers if p in self.sharers)
        self.unmasker = Unmasker(self.roster, maskers, self.length)  # SecAggError below the threshold
        message = Maskers(self.order.term, self.me, self.order.round, self.order.attempt, self.unmasker.maskers)
        self.phase = "masked"
        return self._publish(message, f"{len(maskers)} trainers shared their keys; they mask their updates now")

    def _after_masked(self, now: float) -> list[Action]:
        assert self.unmasker is not None
        if self._waiting_on(set(self.unmasker.masked), self.unmasker.maskers) and now < self.deadline:
            return []
        request = self.unmasker.close()  # SecAggError below the threshold
        message = Unmask(
            self.order.term, self.me, self.order.round, self.order.attempt, request.survivors, request.dropped
        )
        self.phase, self.phase_ends = "reveal", now + self.step_s
        dropped = f", without {','.join(request.dropped)}" if request.dropped else ""
        return self._publish(message, f"{len(request.survivors)} masked updates in{dropped}; asking for the shares")

    def _after_reveals(self, now: float) -> list[Action]:
        unmasker = self.unmasker
        assert unmasker is not None and unmasker.request is not None
        answered_all = not self._waiting_on(set(unmasker.reveals), unmasker.request.survivors)
        if not answered_all and now < self.phase_ends:
            return []
        unmasked = unmasker.total()  # SecAggError with too few answers or too many liars
        weight = sum(self.samples[p] for p in unmasked.survivors) / self.weight_bound
        mean = self.quantizer.decode(unmasked.total, weight)
        update = unflatten(mean, [w.shape for w in self.origin])
        weights = [(o.astype(np.float64) + u).astype(np.float32) for o, u in zip(self.origin, update)]
        self.result = SecureResult(weights, unmasked.survivors, unmasked.dropped, unmasked.liars)
        self.phase = "done"
        return []

    def _publish(self, message: Message, note: str) -> list[Action]:
        self.requests.append(message)
        return [Publish(message, expiry=self.expiry), Log(f"round {self.order.round}: {note}")]

    def resend(self) -> list[Action]:
        """Every request of this attempt again (after a broker outage): trainers answer a repeat as the first time."""
        return [Publish(m, expiry=self.expiry) for m in self.requests]


class SecureTrainer:
    """A chosen trainer's side of one attempt: its keys at once, its shares on the roster, its masked update once
    its fit is done and the maskers are named, its shares on the unmask request. Every answer is kept and sent again
    as it was when the same request comes again."""

    def __init__(
        self,
        me: str,
        order: Training,
        global_weights: Sequence[np.ndarray],
        expiry: int | None = None,
        entropy: Entropy = secrets.token_bytes,
    ):
        """`expiry`: seconds the broker keeps an answer that waits for the controller (the round deadline)."""
        self.me, self.order, self.expiry = me, order, expiry
        self.key = (order.term, order.round, order.attempt)
        self.origin = flatten(global_weights)
        self.trainer = Trainer(me, attempt_context(order.term, order.round, order.attempt, order.digest), entropy)
        advert = self.trainer.advertisement
        self.keys = Keys(
            order.term,
            order.round,
            order.attempt,
            me,
            advert.share_key.hex(),
            advert.mask_key.hex(),
            advert.seed_digest.hex(),
        )
        self.roster: Roster | None = None
        self.early: dict[str, Shares] = {}  # shares that came before the roster, one per sender
        self.maskers: tuple[str, ...] | None = None
        self.fitted: tuple[list[np.ndarray], int, float] | None = None
        self.answers: list[Message] = [self.keys]

    def start(self) -> list[Action]:
        return [Publish(self.keys, expiry=self.expiry)]

    def on_message(self, message: Message) -> list[Action]:
        """A roster, the maskers, an unmask request (from the controller) or another trainer's shares."""
        if _attempt_of(message) != self.key:
            return []
        try:
            if isinstance(message, Roster):
                return self._roster(message)
            if isinstance(message, Shares):
                return self._shares(message)
            if isinstance(message, Maskers):
                self.maskers = self.maskers or message.maskers
                if message.maskers != self.maskers:
                    raise SecAggError("a second, different set of maskers")
                return self._mask_if_ready()
            if isinstance(message, Unmask):
                return self._reveal(message)
        except SecAggError as err:
            return [
                Log(f"round {self.order.round}: refused the {message.TYPE} from {message.sender}: {err}", "warning")
            ]
        return []

    def on_fit(self, weights: list[np.ndarray], samples: int, loss: float) -> list[Action]:
        self.fitted = (weights, samples, loss)
        return self._mask_if_ready()

    def resend(self) -> list[Action]:
        return [Publish(m, expiry=self.expiry) for m in self.answers]

    def _roster(self, message: Roster) -> list[Action]:
        if self.roster is not None:
            if message != self.roster:
                raise SecAggError("a second, different roster")
            return [Publish(m, expiry=self.expiry) for m in self.answers if isinstance(m, Shares)]
        roster = SecAggRoster.of(self.trainer.context, message.threshold, [_advertisement(r) for r in message.keys])
        if self.me not in roster.peers:
            return [
                Log(f"round {self.order.round}: not in the roster (my keys came late); this attempt goes on without me")
            ]
        ciphertexts = self.trainer.share(roster)
        self.roster = message
        shares = Shares(
            self.order.term,
            self.order.round,
            self.order.attempt,
            self.me,
            tuple((peer, base64.b64encode(c).decode()) for peer, c in sorted(ciphertexts.items())),
        )
        self.answers.append(shares)
        out: list[Action] = [Publish(shares, expiry=self.expiry)]
        for early in self.early.values():
            out += self._shares(early)
        self.early.clear()
        return out + self._mask_if_ready()

    def _shares(self, message: Shares) -> list[Action]:
        if message.peer not in self.order.trainers:
            return []
        if self.roster is None:  # held until the roster comes: one per trainer of the order
            self.early.setdefault(message.peer, message)
            return []
        mine = [c for recipient, c in message.ciphertexts if recipient == self.me]
        if not mine:
            return []
        try:
            self.trainer.receive(message.peer, base64.b64decode(mine[0]))
        except SecAggError as err:
            return [Log(f"round {self.order.round}: refused the shares of {message.peer}: {err}", "warning")]
        return []

    def _mask_if_ready(self) -> list[Action]:
        if self.fitted is None or self.maskers is None or self.roster is None:
            return []
        if any(isinstance(m, Masked) for m in self.answers):
            return []
        if self.me not in self.maskers:
            return [Log(f"round {self.order.round}: not named a masker; this attempt goes on without me")]
        weights, samples, loss = self.fitted
        counted = min(samples, self.roster.weight_bound)
        quantizer = Quantizer(self.roster.clip)
        update = flatten(weights) - self.origin
        encoded = quantizer.encode(update, weight_of(counted, self.roster.weight_bound))
        vector = self.trainer.mask(encoded, self.maskers)
        masked = Masked(self.order.term, self.order.round, self.order.attempt, self.me, counted, loss, [vector])
        self.answers.append(masked)
        return [
            Publish(masked, expiry=self.expiry),
            Log(f"round {self.order.round}: masked update sent ({counted} samples)"),
        ]

    def _reveal(self, message: Unmask) -> list[Action]:
        answer = self.trainer.reveal(UnmaskRequest(message.survivors, message.dropped))
        reveal = Reveal(
            self.order.term,
            self.order.round,
            self.order.attempt,
            self.me,
            tuple((owner, share_bytes(share).hex()) for owner, share in sorted(answer.items())),
        )
        if reveal not in self.answers:
            self.answers.append(reveal)
        return [
            Publish(reveal, expiry=self.expiry),
            Log(f"round {self.order.round}: shares revealed for the unmasking"),
        ]
