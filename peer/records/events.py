"""events.jsonl: what happened to one peer, as typed facts for programs (benchmarks, the launcher, the graphs).

One JSON object a line, `{"t": <wall seconds>, "peer": <id>, "event": <name>, ...fields}`, appended by the peer's
node as it carries out what its machines decided (docs/RECORDS.md lists every event and its fields). The log says the
same for people; a program reads this file and never parses log prose. Standard library only, like `run_dir`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from peer.records.run_dir import PEERS_DIR, peer_dir

EVENTS_FILE = "events.jsonl"


class EventLog:
    """The writer of one peer's events.jsonl (its only writer). A line is written whole with one call, so a peer
    killed at any moment leaves at most a torn last line, which the reader skips."""

    def __init__(self, run_dir: str | Path, peer_id: str, clock: Callable[[], float] = time.time):
        self.path = peer_dir(run_dir, peer_id) / EVENTS_FILE
        self.peer_id, self.clock = peer_id, clock
        self._out: IO[str] | None = None

    def write(self, event: str, **fields: Any) -> None:
        """Append one event (OSError if the disk refuses: the caller decides what that means)."""
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self.path, "a", encoding="utf-8", buffering=1)
        out = self._out
        line = json.dumps(
            {"t": round(self.clock(), 6), "peer": self.peer_id, "event": event, **fields},
            separators=(",", ":"),
            default=_plain,
        )
        out.write(line + "\n")

    def close(self) -> None:
        if self._out is not None:
            self._out.close()
            self._out = None


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, set, frozenset)):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    return str(value)


def _parse(line: bytes | str, kinds: set[str] | None) -> dict | None:
    """One line as an event, or None: a line that does not parse (torn by a kill), or not of `kinds`."""
    try:
        event = json.loads(line)
    except ValueError:
        return None
    if not isinstance(event, dict) or not isinstance(event.get("t"), (int, float)):
        return None
    return event if kinds is None or event.get("event") in kinds else None


class EventTail:
    """The events written since the last call, over every peer's events.jsonl (a peer's that appears later
    included), in order of time: for a program that follows a run as it goes (the launcher's progress lines)
    without reading every file whole each time. A line still being written waits for its end."""

    def __init__(self, run_dir: str | Path, kinds: set[str] | None = None):
        self.folder, self.kinds = Path(run_dir) / PEERS_DIR, kinds
        self._read: dict[Path, int] = {}  # bytes of each file already read, up to a line's end

    def new(self) -> list[dict]:
        events = []
        for path in sorted(self.folder.glob(f"*/{EVENTS_FILE}")):
            done = self._read.get(path, 0)
            try:
                with open(path, "rb") as events_file:
                    if os.fstat(events_file.fileno()).st_size < done:
                        done = 0  # written anew (the run dir reused): from its start
                    events_file.seek(done)
                    data = events_file.read()
            except OSError:
                continue
            whole = data.rfind(b"\n") + 1
            self._read[path] = done + whole
            events += [e for line in data[:whole].splitlines() if (e := _parse(line, self.kinds)) is not None]
        return sorted(events, key=lambda e: e["t"])


def read_events(run_dir: str | Path, peer: str | None = None, kinds: set[str] | None = None) -> list[dict]:
    """Every peer's events (or `peer`'s alone; only `kinds` if given), in order of time. A line that does not parse
    (torn by a kill) is skipped; a missing file is no event."""
    folder = Path(run_dir) / PEERS_DIR
    paths = [folder / peer / EVENTS_FILE] if peer else sorted(folder.glob(f"*/{EVENTS_FILE}"))
    events = []
    for path in paths:
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            continue
        events += [event for line in lines if (event := _parse(line, kinds)) is not None]
    return sorted(events, key=lambda e: e["t"])


def record_exit(run_dir: str | Path, peer_id: str, code: int, reason: str) -> None:
    """The `exit` event of a peer that stops on an error of its own before or after its loop (a missing dataset, a
    model that does not load, a crash), with `reason`, the error as the peer printed it: a launcher prints it for
    the peer instead of its log. Best effort: the run dir may be what failed."""
    log = EventLog(run_dir, peer_id)
    try:
        log.write("exit", term=0, code=code, reason=reason)
    except OSError:
        pass
    finally:
        log.close()
