"""Whether a decoded message is acted on, and by whom: pure rules, one function per question, no I/O.

The node asks `admit` of every message that decoded cleanly. The answer is a `Route` (which machine hears it) or
`Refused` (why not, for one log line). Messages of the controller go through the election first (a later term makes
this peer follow it, if a majority stands behind that term); `entitled` then says whether this peer acts on that
message at all. Who may send a message is always checked before what it says.

Before these rules, the wire session (`peer.wire.session.Inbox`) has opened the envelope (signed with the federation
secret, published on the topic of the peer it names), put chunks together (only of kinds that carry weights, only
from senders `may_chunk` entitles), decoded the message and asked the `ReplayGuard` whether it is fresh.

The rules, in the order they apply:
1. only presence, claims, heartbeats, aggregations, server states and finishes are ever published retained: another
   kind that comes retained (an order lying in wait on the broker for every newcomer) is refused;
2. presence and announcements (init) speak for their sender alone (the topic names it), so they always reach the
   election; an init naming another model than ours (a peer started with another --model or --dataset) makes its
   sender a stranger: not counted, its ballots ignored;
3. a term past the last usable one (whose successor could not be encoded) is refused, from anyone;
4. ballots (vote, claim) of members reach the election, which alone decides what a term is worth: one peer's vote
   or claim moves nobody (a majority must stand behind a term);
5. retained messages are history, not orders: a retained claim or heartbeat says who led a term, a retained
   aggregation is the model a late joiner starts from, and a retained finish says this run is over (topics are per
   run, so it is this run's);
6. a controller's message that names this peer as its controller is our own echo (or an earlier life of this id,
   restarted): the controller acts on what it decides, not on what comes back; one of a term older than ours is
   stale: nobody acts on it, only the election hears who sent it (`Route.EARLIER_CONTROLLER`);
7. solutions and evaluations are for the controller of their term, and only it hears them (and so are secure
   aggregation's keys, masked vectors and reveals); a trainer's encrypted shares (secure aggregation) are for the
   peers of its term: the controller and the attempt's trainers; a server state (retained or live) is history for a
   controller to go on from: only a controller takes it, never its own, and it never moves a term (the controller
   checks it belongs to the model it holds); a solution or evaluation of a term later than ours is for no one here,
   but the election hears that its sender stands in that term (`Route.LATER_ANSWER`);
8. after the election has seen a controller's message (`entitled`): only a follower of that very controller in that
   very term acts on it, and only then is what it says looked at (a heartbeat naming another model than ours tells
   this peer the run is not for it; the same heartbeat from anyone else is ignored).
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
RETAINED_KINDS = (Presence, Claim, Heartbeat, Aggregation, ServerState, Finish)  # the only kinds published retained


class Route(str, enum.Enum):
    PRESENCE = "presence"  # a peer is online or gone: election and controller
    RETAINED_PRESENCE = (
        "retained-presence"  # who was online when this peer subscribed: counted until it fails to answer
    )
    RUN_FINISHED = "run-finished"  # a retained finish: this run is over (this peer came, or came back, late)
    ANNOUNCE = "announce"  # a peer (re)joined (init): election and controller
    BALLOT = "ballot"  # a vote: election
    CLAIM = "claim"  # a live claim: election
    RETAINED_LEADER = "retained-leader"  # a retained claim or heartbeat: election
    RETAINED_MODEL = "retained-model"  # a retained aggregation: follower (the model to start from)
    FROM_CONTROLLER = "from-controller"  # heartbeat, training, aggregation, metrics, finish: election, then follower
    # A controller's message of a term older than ours: stale, nobody acts on it, but the election hears who sent it
    # (a peer alone in a term that came to nothing goes back to the controller the others still follow).
    EARLIER_CONTROLLER = "earlier-controller"
    # A solution or evaluation of a term later than ours: not for this peer, but the election hears that its sender
    # stands in that term (a controller cut off while the others elected anew learns so).
    LATER_ANSWER = "later-answer"
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
    trainers: frozenset[str] = frozenset()  # as controller: the trainers whose solutions it waits for now


def admit(message: Message, retained: bool, view: View) -> Route | Refused:
    if retained and not isinstance(message, RETAINED_KINDS):
        return Refused(
            f"ignored a retained {message.TYPE} from {message.sender}: no peer publishes one retained "
            "(left on the broker by hand, or planted)",
            "warning",
        )
    if isinstance(message, Presence):
        return Route.RETAINED_PRESENCE if retained else Route.PRESENCE
    if isinstance(message, Init):
        if view.model and message.model != view.model:
            return Route.PEER_OTHER_MODEL
        return Route.ANNOUNCE
    if isinstance(message, TERM_MESSAGES) and message.term >= MAX_TERM:
        return Refused(
            f"ignored a {message.TYPE} of term {message.term} from {message.sender}: the last usable term is "
            f"{MAX_TERM - 1}",
            "warning",
            "term-range",
        )
    if isinstance(message, (Vote, Claim)) and message.peer in view.misfits:
        return Refused(f"ignored a {message.TYPE} of {message.peer}: it runs another model")
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
        if message.controller == view.me:
            return Refused(
                f"ignored a {message.TYPE} naming this peer as controller of term {message.term} "
                "(our own echo, or an earlier life of this id)"
            )
        if message.term < view.term:
            return Route.EARLIER_CONTROLLER
        return Route.FROM_CONTROLLER
    if isinstance(message, ServerState):
        if view.role is not Role.CONTROLLER:
            return Refused(f"ignored a server state of {message.controller}: this peer is not a controller")
        if message.controller == view.me:
            return Refused("ignored a server state naming this peer as its controller (our own, from the broker)")
        return Route.SERVER_STATE
    if isinstance(message, (Solution, Evaluation)) and message.term > view.term:
        return Route.LATER_ANSWER
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


def entitled(
    message: Heartbeat | Training | Aggregation | Metrics | Finish | Roster | Maskers | Unmask, view: View
) -> Route | Refused:
    """After the election has seen a controller's message: `Route.FROM_CONTROLLER` if this peer acts on it (it
    follows that controller in that term), `Route.RUN_OTHER_MODEL` if that controller's heartbeat names another
    model than ours (the run is not for this peer), else why not. The sender first, then what it says."""
    if view.role is not Role.FOLLOWER or (message.term, message.controller) != (view.term, view.controller):
        return Refused(
            f"ignored a {message.TYPE} of term {message.term} from {message.controller}: this peer is "
            f"{view.role.value} of term {view.term} (controller {view.controller})"
        )
    if isinstance(message, Heartbeat) and view.model and message.model != view.model:
        return Route.RUN_OTHER_MODEL
    return Route.FROM_CONTROLLER


def may_chunk(kind: str, sender: str, retained: bool, view: View) -> Refused | None:
    """Whether this peer takes chunks of a `kind` message from `sender` at all (None: it does), decided before a
    chunk costs any memory. Models travel from the controller to its followers (training orders and aggregations;
    a retained aggregation, the model a late joiner starts from, from any member) and from the trainers this
    controller waits for (solutions); nothing else is ever chunked."""
    if kind == "solution":
        if view.role is Role.CONTROLLER and sender in view.trainers:
            return None
        return Refused(
            f"ignored chunks of a solution from {sender}: not a trainer this peer waits for", "warning", "chunk-sender"
        )
    if kind in ("training", "aggregation"):
        if retained and kind == "aggregation" and sender not in view.misfits:
            return None
        if view.role is Role.FOLLOWER and sender == view.controller:
            return None
        return Refused(
            f"ignored chunks of {'an aggregation' if kind == 'aggregation' else 'a training order'} from {sender}: "
            f"not the controller this peer follows ({view.controller})",
            "warning",
            "chunk-sender",
        )
    return Refused(f"ignored chunks of a {kind} from {sender}: only models are chunked", "warning", "chunk-sender")
