"""Topic names: every message of a run on `<prefix>/<run_id>/<kind>/<sender>`, a chunk on `<topic>/<index>`."""

from __future__ import annotations

from peer.wire.ids import TOPIC_PREFIX_PATTERN, valid_peer_id, valid_run_id
from peer.wire.messages import MESSAGE_TYPES, Message

_KINDS = frozenset(cls.TOPIC for cls in MESSAGE_TYPES.values())  # the kind level of every topic
# Kinds only the controller subscribes to: answers to it, and the server state a new controller goes on from.
_TO_CONTROLLER = frozenset({"solution", "evaluation", "server-state"})
_NO_ECHO = frozenset({"training", "aggregation", "shares"})  # kinds a peer need not hear from itself


class Topics:
    """Topic names of one run: every message is published on `<prefix>/<run_id>/<kind>/<sender>`, where kind is its
    class's TOPIC and sender the id of the peer publishing it (`Message.sender`). A broker ACL can then let each peer
    publish only topics that name itself, and a receiver holds every message to the sender its topic names.

    A message too large for one broker message travels in chunks (`peer.wire.chunks`), chunk i on `<topic>/<i>`: each
    chunk of a retained model keeps its own retained slot."""

    def __init__(self, prefix: str = "sd", run_id: str = "default"):
        if not isinstance(prefix, str) or TOPIC_PREFIX_PATTERN.fullmatch(prefix) is None:
            raise ValueError(f"topic prefix {prefix!r}: use letters, digits, '.', '_', '-' and '/' between levels")
        if not valid_run_id(run_id):
            raise ValueError(f"run id {run_id!r}: use 1 to 64 letters, digits, '.', '_' or '-'")
        self.prefix, self.run_id = prefix, run_id
        self._head = f"{prefix}/{run_id}/"

    def __repr__(self) -> str:
        return f"Topics({self.prefix!r}, {self.run_id!r})"

    def topic(self, kind: str, sender: str) -> str:
        """The topic `sender` publishes messages of `kind` (a TOPIC: election, heartbeat, ...) on."""
        if kind not in _KINDS:
            raise ValueError(f"unknown message kind {kind!r} (one of {', '.join(sorted(_KINDS))})")
        if not valid_peer_id(sender):
            raise ValueError(f"sender {sender!r} is not a valid peer id")
        return self._head + kind + "/" + sender

    def of(self, message: Message) -> str:
        """The topic `message` is published on."""
        if isinstance(message, type) or not isinstance(message, Message):
            raise TypeError(f"Topics.of needs a message, not {message!r}; for a kind use topic(kind, sender)")
        return self.topic(message.TOPIC, message.sender)

    def presence(self, peer: str) -> str:
        return self.topic("presence", peer)

    @staticmethod
    def chunk(topic: str, index: int) -> str:
        """The topic of chunk `index` of a message published on `topic`."""
        return f"{topic}/{index}"

    @property
    def subscription(self) -> str:
        """Everything of this run, and nothing of another run under the same prefix (observers use it)."""
        return f"{self.prefix}/{self.run_id}/#"

    def subscriptions(self, controller: bool = False) -> list[tuple[str, bool]]:
        """(filter, no_local) of what a peer subscribes to: every kind but solutions, evaluations and server states,
        which only the controller of a term subscribes to (`controller=True` gives those), so each reaches one peer. A peer
        does not get its own orders and models back (no_local): that would be one more model copy per round."""
        if controller:
            # (its own server state, a model's size or two, need not come back to the controller each round)
            return [(f"{self._head}{kind}/#", kind == "server-state") for kind in sorted(_TO_CONTROLLER)]
        return [(f"{self._head}{kind}/#", kind in _NO_ECHO) for kind in sorted(_KINDS - _TO_CONTROLLER)]

    def aggregations(self) -> str:
        """The filter whose retained messages are every controller's latest model (subscribed again to fetch them)."""
        return f"{self._head}aggregation/#"

    def parse(self, topic: str) -> tuple[str, str] | None:
        """(kind, sender) of a topic of this prefix and run; None for any other topic: another prefix or run, more
        or fewer levels, an unknown kind, a sender that is not a valid peer id. A chunk's topic is not one (`locate`)."""
        located = self.locate(topic)
        if located is None or located[2] is not None:
            return None
        return located[:2]

    def locate(self, topic: str) -> tuple[str, str, int | None] | None:
        """(kind, sender, chunk index or None) of a message's or a chunk's topic of this run; else None."""
        if not isinstance(topic, str) or not topic.startswith(self._head):
            return None
        kind, slash, rest = topic[len(self._head) :].partition("/")
        sender, slash2, index = rest.partition("/")
        if not slash or kind not in _KINDS or not valid_peer_id(sender):  # a peer id has no "/"
            return None
        if not slash2:
            return kind, sender, None
        if not (index.isascii() and index.isdigit() and len(index) <= 6) or (index != "0" and index[0] == "0"):
            return None
        return kind, sender, int(index)
