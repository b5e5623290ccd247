"""Log lines: one line per event, each stamped with the peer's id, role, term, round and phase, so a person following
`docker compose logs -f` can follow an election and a round; and a quota, so a flood of bad messages (or a full disk)
cannot flood the log."""

from __future__ import annotations

import logging
import time
from typing import Protocol

QUIET_S = 10.0  # the same kind of warning (a malformed message, a failed write) at most once per this
LOG_FORMAT = (
    "%(asctime)s %(levelname)-7s peer=%(peer)s role=%(role)s term=%(term)s round=%(round)s "
    "phase=%(phase)s | %(message)s"
)


class PeerState(Protocol):
    """What a log line says of the peer (`peer.node.loop.Peer` has it)."""

    @property
    def role_name(self) -> str: ...

    @property
    def term(self) -> int: ...

    @property
    def current_round(self) -> int: ...

    @property
    def phase(self) -> str | None: ...


class LogContext(logging.Filter):
    """Stamps every log line with the peer's id, role, term, round and phase, so one line tells the whole state.
    Installed before the dataset loads (the peer does not exist yet: role `starting`)."""

    def __init__(self, peer_id: str):
        super().__init__()
        self.peer_id = peer_id
        self.peer: PeerState | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        peer = self.peer
        record.peer = self.peer_id
        if peer is None:
            record.role, record.term, record.round, record.phase = "starting", 0, 0, "-"
        else:
            record.role, record.term, record.round = peer.role_name, peer.term, peer.current_round
            record.phase = peer.phase or "-"
        return True


def configure_logging(peer_id: str, level: str) -> logging.Logger:
    """The "peer" logger of a process that runs one peer: every line to stderr, stamped."""
    context = LogContext(peer_id)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(context)
    log = logging.getLogger("peer")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return log


class _HostLines(logging.Filter):
    """Lines of a host process itself (the dataset loader, say) name the host; a hosted peer's own lines already
    carry its state (its logger's `LogContext`), which this leaves alone."""

    def __init__(self, name: str):
        super().__init__()
        self.host = name

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "peer"):
            record.peer, record.role, record.term, record.round, record.phase = self.host, "host", 0, 0, "-"
        return True


def configure_host_logging(host: str, peers: list[str], level: str) -> dict[str, logging.Logger]:
    """A process hosting several peers (`peer.host`): one handler for the process (stderr), one logger per peer
    (`peer.<id>`) whose filter stamps its lines."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_HostLines(host))
    root = logging.getLogger("peer")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    loggers = {}
    for peer in peers:
        log = logging.getLogger(f"peer.{peer}")
        log.filters[:] = [LogContext(peer)]
        loggers[peer] = log
    return loggers


def attach(log: logging.Logger, peer: PeerState) -> None:
    """From now on `log`'s lines describe `peer`: on the handler of a process's one peer; on the logger of each peer
    hosted with others."""
    for context in [*log.filters, *(f for handler in log.handlers for f in handler.filters)]:
        if isinstance(context, LogContext):
            context.peer = peer


class Quota:
    """One log line per kind of trouble per QUIET_S, with the count of those it kept quiet: a flood of bad messages
    (or a full disk) must not flood the log."""

    def __init__(self, log: logging.Logger, clock=time.monotonic):
        self.log, self.clock = log, clock
        self.last: dict[str, float] = {}
        self.quiet: dict[str, int] = {}

    def warn(self, kind: str, level: int, text: str, *args) -> None:
        now = self.clock()
        if now - self.last.get(kind, -QUIET_S) < QUIET_S:
            self.quiet[kind] = self.quiet.get(kind, 0) + 1
            return
        self.last[kind] = now
        kept = self.quiet.pop(kind, 0)
        self.log.log(level, text + (f" ({kept} more like it in the last {QUIET_S:.0f}s)" if kept else ""), *args)
