"""What the pure machines ask the peer to do: the one action vocabulary of the election, the controller and the
follower. Every input of a machine returns a list of these, in the order decided, and the node (`peer.node.loop`)
carries them out: it is the only place that publishes, writes records, starts learning jobs, saves the model, prints
or exits. At the end, `JobDone`: the one event that comes back from carrying an action out (a learning job's result).

Reading a machine's output is reading its behaviour: a test asserts on these values, not on side effects.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from peer.roles.rounds import GlobalModel, RoundSummary, ServerMemory
from peer.wire.messages import Message

# --- the election's decisions ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CastVote:
    term: int
    vote: float
    round: int
    reason: str
    patience: float = 1.0  # how many times the configured timings this term waits (worth a word in the log if > 1)


@dataclass(frozen=True)
class SendClaim:
    term: int
    vote: float
    round: int
    reason: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class TakeOffice:
    term: int
    reason: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class FollowController:
    term: int
    controller: str


@dataclass(frozen=True)
class StepDown:
    term: int  # the term this peer was controller of
    reason: str


@dataclass(frozen=True)
class Unconfirmed:
    """`peer` was not heard from since this peer (re)connected: it died while the broker could not say so (no Last
    Will outlives a broker restart). The node counts it gone."""

    peer: str


@dataclass(frozen=True)
class Announce:
    """Announce this peer (an init naming its term) so that every peer answers with its own: a peer whose campaign
    found no majority learns from the answers which term the others are in (they may have gone on without it)."""


# --- the roles' decisions ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Publish:
    message: Message
    retain: bool = False
    expiry: int | None = None  # seconds the broker keeps it (retained messages that must not outlive the run)


@dataclass(frozen=True)
class Log:
    """One log line; the node stamps it with the peer's id, role, term, round and phase."""

    text: str
    level: str = "info"  # debug | info | warning | error


@dataclass(frozen=True)
class StartJob:
    """Fit or evaluate these weights on the learner thread; the result comes back as a `jobs.JobDone` event."""

    kind: str  # "fit" | "evaluate"
    term: int
    round: int
    attempt: int
    weights: list[np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class AdoptModel:
    """This peer now holds this global model (the node writes it into the model store: its only writer)."""

    model: GlobalModel
    note: str = ""  # why, for the log ("retained by the broker"); empty: nothing to say


@dataclass(frozen=True)
class FetchModel:
    """This peer lacks the global model an order names: have the broker send the retained aggregations again (they
    come back as retained models, through `Follower.on_retained_model`)."""

    round: int
    digest: str


@dataclass(frozen=True)
class FinishRound:
    """The round's metrics are known: remember them (model store) so any peer can resume the run."""

    summary: RoundSummary
    run_started: float | None = None


@dataclass(frozen=True)
class RecordRound:
    """A rounds.csv row (columns: docs/RECORDS.md)."""

    row: dict


@dataclass(frozen=True)
class RecordElection:
    term: int
    controller: str
    reason: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class RecordEvaluation:
    round: int
    term: int
    accuracy: float
    loss: float
    samples: int


@dataclass(frozen=True)
class RecordRun:
    """run.json: the settings and the outcome of a finished run."""

    summary: dict


@dataclass(frozen=True)
class SaveCheckpoint:
    """The run's state after a finished round (checkpoint/ in the run dir), from which `--resume` goes on."""

    model: GlobalModel
    rounds: tuple[RoundSummary, ...]
    run_started: float | None
    server: ServerMemory | None = None  # the server optimizer's state and the privacy ledger, if the run keeps them


@dataclass(frozen=True)
class RecordEvent:
    """A typed line of events.jsonl (docs/RECORDS.md) for what no other action records, e.g. where a controller's
    server state came from."""

    name: str
    fields: dict = field(default_factory=dict)


@dataclass(frozen=True)
class SaveModel:
    """Save these weights as the run's final Keras model (model.keras)."""

    weights: list[np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class Print:
    """Text for the person at the terminal (stdout), e.g. the run summary table."""

    text: str


# Exit codes of `python -m peer`, in one place.
EXIT_OK = 0  # the run finished (or had finished before this peer came)
EXIT_USAGE = 2  # a bad setting, a missing dataset, an unwritable run dir: said in one line at start
EXIT_REFUSED = 3  # the broker refused the login
EXIT_GAVE_UP = 4  # waited --wait-timeout for peers, or no peer could evaluate the model: the run cannot go on
EXIT_DUPLICATE = 5  # another process already runs with this peer id

# Finish reasons that mean the run failed (its peers exit EXIT_GAVE_UP); the others (max-rounds, target-accuracy)
# are a run that ended as asked.
GIVE_UP_REASONS = ("too-few-peers", "no-evaluations", "no-solutions", "forged-finish")


@dataclass(frozen=True)
class Exit:
    """This peer is done: the node leaves the loop with this exit code."""

    code: int


Action = (
    CastVote
    | SendClaim
    | TakeOffice
    | FollowController
    | StepDown
    | Unconfirmed
    | Announce
    | Publish
    | Log
    | StartJob
    | AdoptModel
    | FetchModel
    | FinishRound
    | RecordRound
    | RecordElection
    | RecordEvaluation
    | RecordRun
    | SaveCheckpoint
    | RecordEvent
    | SaveModel
    | Print
    | Exit
)


# --- what comes back to the machines -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobDone:
    """A learning job ended (posted by the learner thread): `result` is (weights, samples, loss) for a fit and
    (accuracy, loss, samples) for an evaluation; `error` says why there is none."""

    job: StartJob
    result: tuple | None
    error: str | None
    seconds: float
