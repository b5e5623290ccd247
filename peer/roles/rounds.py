"""The controller's bookkeeping of a round, as pure functions and small state objects (no I/O, no clock).

The rules that say when a round's solutions or evaluations are complete, when a round closes with a quorum at its
deadline, and when it must be repeated; the sample-weighted global metric; and the model store every peer keeps.
How solutions become a model is `peer.learning.aggregation`'s.
"""

from __future__ import annotations

import enum
import functools
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from peer.learning.metrics import weighted_mean
from peer.learning.privacy import Ledger
from peer.learning.server_optimizers import OptimizerState
from peer.wire.weights import WeightCodec


def choose_trainers(candidates: Iterable[str], count: int, rng: random.Random) -> tuple[str, ...]:
    """`count` distinct peers chosen at random (fewer if fewer are available), in a stable order for logs."""
    pool = sorted(set(candidates))
    return tuple(sorted(rng.sample(pool, min(count, len(pool)))))


def choose_evaluators(candidates: Iterable[str], count: int, rng: random.Random) -> tuple[str, ...]:
    """`count` peers chosen at random to evaluate a model, or () (every peer) when `count` is 0 or would name them
    all: an empty list on the wire means everyone, so a round that asks everybody does not list a hundred ids."""
    pool = set(candidates)
    if count <= 0 or count >= len(pool):
        return ()
    return choose_trainers(pool, count, rng)


class RoundOutcome(str, enum.Enum):
    WAIT = "wait"
    CLOSE = "close"  # aggregate what arrived
    RETRY = "retry"  # too few solutions: choose trainers again and repeat the round


@dataclass
class SolutionCollector:
    """Solutions for one attempt of one round of one term."""

    term: int
    round: int
    attempt: int
    trainers: tuple[str, ...]
    quorum: int
    deadline: float
    shapes: tuple[tuple[int, ...], ...] | None = None  # the global model's tensor shapes, when known
    received: dict[str, tuple[list[np.ndarray], int]] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)

    def offer(
        self, term: int, round_: int, attempt: int, peer: str, weights: list[np.ndarray], samples: int
    ) -> str | None:
        """Accept a solution, or say why not (a reason for the log)."""
        if (term, round_, attempt) != (self.term, self.round, self.attempt):
            return (
                f"it is for term {term} round {round_} attempt {attempt}, not {self.term}/{self.round}/{self.attempt}"
            )
        if peer not in self.trainers:
            return f"{peer} was not chosen"
        if peer in self.received:
            return f"{peer} already sent one"
        if samples <= 0:
            return "it reports no samples"
        if self.shapes is not None and tuple(tuple(w.shape) for w in weights) != self.shapes:
            return "its tensors do not have the global model's shapes"
        self.received[peer] = (weights, samples)
        return None

    def trainer_lost(self, peer: str) -> None:
        if peer in self.trainers and peer not in self.received:
            self.lost.add(peer)

    @property
    def outstanding(self) -> set[str]:
        return set(self.trainers) - set(self.received) - self.lost

    def outcome(self, now: float) -> RoundOutcome:
        if len(self.received) == len(self.trainers):
            return RoundOutcome.CLOSE
        if now < self.deadline and self.outstanding:
            return RoundOutcome.WAIT
        return RoundOutcome.CLOSE if len(self.received) >= self.quorum else RoundOutcome.RETRY

    def contributions(self) -> list[tuple[str, list[np.ndarray], int]]:
        """(peer, weights, samples) of every solution received, in peer order: what the aggregation takes."""
        return [(peer, *self.received[peer]) for peer in sorted(self.received)]


@dataclass
class EvaluationCollector:
    """Every live peer's evaluation of one global model; done when all expected peers answered, left, or the
    deadline passed. `optional` peers (members that missed an answer before) are heard, not waited for."""

    term: int
    round: int
    expected: set[str]
    deadline: float
    received: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # peer -> (accuracy, loss, samples)
    optional: set[str] = field(default_factory=set)

    def __post_init__(self):
        self.expected = set(self.expected)  # ours to shrink as peers leave, not the caller's
        self.optional = set(self.optional) - self.expected

    def offer(
        self, term: int, round_: int, peer: str, accuracy: float, loss: float, samples: int, cap: int | None = None
    ) -> str | None:
        """Accept an evaluation of a peer this round waits for, once; `cap` (the test samples the peer announced)
        bounds the weight it declares, so no peer can outweigh the rest by claiming more than it holds."""
        if (term, round_) != (self.term, self.round):
            return f"it is for term {term} round {round_}, not {self.term}/{self.round}"
        if peer not in self.expected and peer not in self.optional:
            return f"{peer} is not a member this round waits for"
        if peer in self.received:
            return f"{peer} already sent one"
        self.received[peer] = (accuracy, loss, samples if cap is None else min(samples, cap))
        return None

    def peer_lost(self, peer: str) -> None:
        self.expected.discard(peer)
        self.optional.discard(peer)

    @property
    def missing(self) -> set[str]:
        """The expected peers whose evaluation has not come."""
        return self.expected - set(self.received)

    def done(self, now: float) -> bool:
        return self.expected <= set(self.received) or now >= self.deadline

    def result(self) -> tuple[float, float, int] | None:
        """(accuracy, loss, samples), sample-weighted over the evaluations received; None if none arrived."""
        evaluations = list(self.received.values())
        accuracy = weighted_mean((a, n) for a, _, n in evaluations)
        if accuracy is None:
            return None
        loss = weighted_mean((loss, n) for _, loss, n in evaluations)
        return accuracy, loss if loss is not None else 0.0, sum(n for _, _, n in evaluations)

    def median_accuracy(self) -> float | None:
        """The lower median of the peers' accuracies, each peer one voice whatever it declares: no minority moves
        it past what the honest majority measured (the stop decision needs it beside the weighted mean)."""
        accuracies = sorted(a for a, _, _ in self.received.values())
        return accuracies[(len(accuracies) - 1) // 2] if accuracies else None


def implausible_finish(
    reason: str, round_: int, finished: Mapping[int, RoundSummary], max_rounds: int, target_accuracy: float
) -> str | None:
    """Why a finish (`reason`, after `round_`) cannot be true as a peer knows the run, or None. Every peer knows the
    round limit and the target (the run's settings) and the metrics of every round the controller published: a finish
    for the round limit before the last round, or for the target after a round whose metrics fall short of it, is a
    lie. A give-up (too few peers, no solutions, no evaluations) cannot be checked from outside."""
    if reason == "max-rounds" and round_ < max_rounds:
        return f"round {round_} is not the last ({max_rounds})"
    if reason == "target-accuracy":
        summary = finished.get(round_)
        if summary is None or summary.accuracy < target_accuracy:
            reached = "unknown" if summary is None else f"{summary.accuracy:.4f}"
            return f"round {round_}'s published accuracy ({reached}) is below the target {target_accuracy}"
    return None


@dataclass(frozen=True)
class GlobalModel:
    round: int
    term: int
    weights: list[np.ndarray]
    trainers: tuple[str, ...] = ()  # whose solutions were averaged into it
    controller: str = ""  # who published it in `term` ("" when unknown: the initial model, an old checkpoint)

    @functools.cached_property
    def digest(self) -> str:
        """Its name by content (`WeightCodec.digest`), which training orders give instead of the weights; computed
        once, when first asked."""
        return WeightCodec.digest(self.weights)


@dataclass
class RoundSummary:
    round: int
    term: int
    accuracy: float
    loss: float
    bytes: int


@dataclass(frozen=True)
class ServerMemory:
    """What a controller goes on training with besides the model: the server optimizer's state and the privacy
    ledger after the aggregation of the global model whose digest is `digest`."""

    digest: str
    optimizer: OptimizerState
    ledger: Ledger = field(default_factory=Ledger)


@dataclass
class ModelStore:
    """What every peer keeps so that any of them can take over as controller: the latest global model and the
    metrics of every finished round."""

    latest: GlobalModel | None = None
    finished: dict[int, RoundSummary] = field(default_factory=dict)
    run_started: float | None = None
    server: ServerMemory | None = None  # from the checkpoint a run resumed from (a controller's own is its own)

    def is_newer(self, round_: int, term: int) -> bool:
        """A model of (round_, term) is newer than ours: a later round, or the same round re-published in a later
        term (or the same one again)."""
        return self.latest is None or (round_, term) >= (self.latest.round, self.latest.term)

    def offer(
        self, round_: int, term: int, weights: list[np.ndarray], trainers: tuple[str, ...] = (), controller: str = ""
    ) -> bool:
        """Keep the model if it is newer than ours."""
        if not self.is_newer(round_, term):
            return False
        self.latest = GlobalModel(round_, term, weights, tuple(trainers), controller)
        return True

    def finish_round(self, summary: RoundSummary, run_started: float | None = None) -> None:
        self.finished[summary.round] = summary
        if self.run_started is None:
            self.run_started = run_started

    @property
    def last_finished(self) -> RoundSummary | None:
        return self.finished[max(self.finished)] if self.finished else None
