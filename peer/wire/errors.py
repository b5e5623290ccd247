"""What the wire says when it will not take something: `ProtocolError` for a payload (or a message to encode) that
does not follow the protocol, `Refused` for a message that is well formed but not acted on, with the reason."""

from __future__ import annotations

from dataclasses import dataclass


class ProtocolError(ValueError):
    """A payload that does not follow the protocol."""


def require(condition: bool, message: str) -> None:
    """ProtocolError(message) unless `condition` holds."""
    if not condition:
        raise ProtocolError(message)


@dataclass(frozen=True)
class Refused:
    """A payload, chunk or message not acted on: `reason` is one log line; `level` how loud it is (a forgery is a
    warning, a stale copy routine: debug); `kind` names the kind of trouble, so that a flood of one kind is logged
    at a bounded rate (empty: the reason's start names it)."""

    reason: str
    level: str = "debug"
    kind: str = ""
