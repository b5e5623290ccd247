"""Whether a decoded message is acted on, and by whom: pure rules, one function per question, no I/O.

The node asks `admit` of every message that decoded cleanly. The answer is a `Route` (which machine hears it) or
`Refused` (why not, for one log line). Messages of the controller go through the election first (a higher term makes
this peer follow it); `entitled` then says whether this peer acts on that message at all.

Before these rules, the wire session (`peer.wire.session.Inbox`) has opened the envelope (signed with the federation
secret, published on the topic of the peer it names), put chunks together, decoded the message and asked the
`ReplayGuard` whether it is fresh.

The rules, in the order they apply:
- only presence, claims, heartbeats, aggregations and finishes are ever published retained: another kind that comes
  retained (an order lying in wait on the broker for every newcomer) is refused;
- presence and announcements (init) always reach the election, unless the init names another model than ours (a
  peer started with another --model or --dataset): that peer is not counted, and its ballots are ignored;
- a heartbeat naming another model tells a peer that is not controller that the run is not for its model;
- a term can only move forward by a bounded step: never to the last encodable term, and (for a peer in a run) never
  more than MAX_TERM_STEP past its own, so no single message can strand the federation in a term it cannot leave;
- ballots (vote, claim) reach the election;
- retained messages are history, not orders: a retained claim or heartbeat says who led most recently, a retained
  aggregation is the model a late joiner starts from, and a retained finish says this run is over (topics are per
  run, so it is this run's);
- a controller's message of a term older than ours is stale; one that names this peer as its controller is our own
  echo (or an earlier life of this id, restarted): the controller acts on what it decides, not on what comes back;
- solutions and evaluations are for the controller of their term, and only it hears them (and so are secure
  aggregation's keys, masked vectors and reveals); a trainer's encrypted shares (secure aggregation) are for the
  peers of its term: the controller and the attempt's trainers;
- a server state (retained or live) is history for a controller to go on from: only a controller takes it, never
  its own, and it never moves a term (the controller checks it belongs to the model it holds);
- after the election has seen a controller's message, only a follower of that very controller in that very term
  acts on it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from peer.roles.election import Role
from peer.wire.errors import Refused
from peer.wire.messages import (
    MAX_TERM,
    Aggregation,
    Claim,
    Evaluation,
    Finish,
    Heartbeat,
    Init,
    Keys,
    Masked,
    Maskers,
    Message,
    Metrics,
    Presence,
    Reveal,
    Roster,
    ServerState,
    Shares,
    Solution,
    Training,
    Unmask,
    Vote,
)

CONTROLLER_MESSAGES = (Heartbeat, Training, Aggregation, Metrics, Finish, Roster, Maskers, Unmask)
TO_CONTROLLER_MESSAGES = (Solution, Evaluation, Keys, Masked, Reveal)
TERM_MESSAGES = (Vote, Claim, *CONTROLLER_MESSAGES)  # messages that can move this peer to a later term
# the only messages a peer publishes retained
RETAINED_KINDS = (Presence, Claim, Heartbeat, Aggregation, ServerState, Finish)
MAX_TERM_STEP = 1000  # a term further ahead of ours than this is no election we could have missed


class Route(str, enum.Enum):
    PRESENCE = "presence"  # a peer is online or gone: election and controller
    RUN_FINISHED = "run-finished"  # a retained finish: this run is over (this peer came, or came back, late)
    ANNOUNCE = "announce"  # a peer (re)joined (init): election and controller
    BALLOT = "ballot"  # a vote: election
    CLAIM = "claim"  # a live claim: election
    RETAINED_LEADER = "retained-leader"  # a retained claim or heartbeat: election
    RETAINED_MODEL = "retained-model"  # a retained aggregation: follower (the model to start from)
    FROM_CONTROLLER = "from-controller"  # heartbeat, training, aggregation, metrics, finish: election, then follower
    PEER_OTHER_MODEL = "peer-other-model"  # an init of a peer whose model is not ours: it is not counted
    RUN_OTHER_MODEL = "run-other-model"  # a controller's heartbeat naming another model: this peer cannot take part
    TO_CONTROLLER = "to-controller"  # solution, evaluation (and secure aggregation's): the controller of that term
    SHARES = "shares"  # a trainer's encrypted shares (secure aggregation): the controller and the trainers
    SERVER_STATE = "server-state"  # a controller's server state: this peer's controller, if it is one


@dataclass(frozen=True)
class View:
    """What the rules need to know of this peer, as the election has it now."""

    me: str
    term: int
    role: Role
    controller: str | None
    model: str = ""  # this peer's model fingerprint ("" before it knows it: no check)
    misfits: frozenset[str] = frozenset()  # peers that announced another model


def admit(message: Message, retained: bool, view: View) -> Route | Refused:
    if retained and not isinstance(message, RETAINED_KINDS):
        return Refused(
            f"ignored a retained {message.TYPE} from {message.sender}: no peer publishes one retained "
            "(left on the broker by hand, or planted)",
            "warning",
        )
    if isinstance(message, Presence):
        return Route.PRESENCE
    if isinstance(message, Init):
        if view.model and message.model != view.model:
            return Route.PEER_OTHER_MODEL
        return Route.ANNOUNCE
    if isinstance(message, (Vote, Claim)) and message.peer in view.misfits:
        return Refused(f"ignored a {message.TYPE} of {message.peer}: it runs another model")
    if isinstance(message, Heartbeat) and view.model and message.model != view.model:
        if view.role is Role.CONTROLLER:
            return Refused(
                f"ignored a heartbeat of {message.controller}, which runs another model "
                f"({message.model}; ours is {view.model})",
                "warning",
            )
        return Route.RUN_OTHER_MODEL
    if isinstance(message, TERM_MESSAGES) and (jump := _term_jump(message.term, view.term)):
        return jump
    if isinstance(message, Vote):
        return Route.BALLOT
    if isinstance(message, (Claim, Heartbeat)) and retained:
        return Route.RETAINED_LEADER
    if isinstance(message, Claim):
        return Route.CLAIM
    if isinstance(message, Aggregation) and retained:
        return Route.RETAINED_MODEL
    if isinstance(message, Finish) and retained:
        return Route.RUN_FINISHED
    if isinstance(message, CONTROLLER_MESSAGES):
        if message.term < view.term:
            return Refused(f"ignored a {message.TYPE} of stale term {message.term} from {message.controller}")
        if message.controller == view.me:
            return Refused(
                f"ignored a {message.TYPE} naming this peer as controller of term {message.term} "
                "(our own echo, or an earlier life of this id)"
            )
        return Route.FROM_CONTROLLER
    if isinstance(message, ServerState):
        if view.role is not Role.CONTROLLER:
            return Refused(f"ignored a server state of {message.controller}: this peer is not a controller")
        if message.controller == view.me:
            return Refused("ignored a server state naming this peer as its controller (our own, from the broker)")
        return Route.SERVER_STATE
    if isinstance(message, TO_CONTROLLER_MESSAGES):
        if view.role is not Role.CONTROLLER or message.term != view.term:
            return Refused(
                f"ignored a {message.TYPE} of term {message.term} from {message.peer}: not the controller of that term"
            )
        return Route.TO_CONTROLLER
    if isinstance(message, Shares):
        if message.term != view.term or view.role not in (Role.CONTROLLER, Role.FOLLOWER):
            return Refused(
                f"ignored the shares of term {message.term} from {message.peer}: this peer is in {view.term}"
            )
        return Route.SHARES
    return Refused(f"no rule admits a {message.TYPE}", "warning")


def _term_jump(term: int, ours: int) -> Refused | None:
    """Terms move forward one election at a time: a term past the last one (whose successor could not be encoded),
    or further ahead of ours than any run of missed elections explains, is refused, so that one message cannot
    move the federation to a term from which it can never elect again. A peer that knows no term yet (it just
    started) takes the term of the run it joins, however far that run has come."""
    if term >= MAX_TERM:
        return Refused(f"ignored term {term}: the last usable term is {MAX_TERM - 1}", "warning")
    if ours > 0 and term > ours + MAX_TERM_STEP:
        return Refused(
            f"ignored term {term}: {term - ours} terms ahead of ours ({ours}), more than the "
            f"{MAX_TERM_STEP} elections any peer could have missed",
            "warning",
        )
    return None


def entitled(
    message: Heartbeat | Training | Aggregation | Metrics | Finish | Roster | Maskers | Unmask, view: View
) -> Refused | None:
    """After the election has seen a controller's message: None if this peer acts on it (it follows that controller
    in that term), else why not."""
    if view.role is not Role.FOLLOWER or (message.term, message.controller) != (view.term, view.controller):
        return Refused(
            f"ignored a {message.TYPE} of term {message.term} from {message.controller}: this peer is "
            f"{view.role.value} of term {view.term} (controller {view.controller})"
        )
    return None
