"""What the launcher says while a network runs and when it ends: one line per step (peers joined, elections, rounds,
exits, the finish) from the peers' typed events, and an end report (each failed peer's reason, where the records
are, how to draw them). Never from log prose, but for the one line a peer prints when it cannot start at all."""

from __future__ import annotations

import re
import shlex
import time
from pathlib import Path

from peer.records.events import EventTail, read_events
from peer.records.run_dir import peer_log, read_rounds
from scripts.up.common import ROOT, say
from scripts.up.network import Network

ERROR_LINE = re.compile(r"^python -m peer(?:\.host)?: error: (.*)$")


class Progress:
    """One line per step of the run, from the peers' typed events (events.jsonl: `start`, `office`, `round`,
    `finish`, those written since the launch) and the states of their processes or containers: peers joined,
    elections, rounds, exits, the finish."""

    def __init__(self, net: Network, started: float):
        self.net, self.started = net, started  # `started`: when the peers started, for the lines' "N s since"
        self.launched = started  # events older than this are an earlier run's
        self.events = EventTail(net.run_dir, kinds={"start", "office", "round", "finish"})
        self.joined: set[str] = set()
        self.rounds_seen: set[tuple] = set()
        self.exited: set[str] = set()
        self.finished = False

    def update(self, states: dict[str, str] | None = None) -> None:
        joined = set(self.joined)
        for event in self.events.new():
            if event["t"] < self.launched - 1:  # an earlier run's, in a run dir used again (--resume)
                continue
            if event["event"] == "start" and event["peer"] in self.net.peers:
                joined.add(event["peer"])
                continue
            if len(joined) > len(self.joined):
                self._joined(joined)
            if event["event"] == "office":
                say(f"term {event.get('term')}: {event['peer']} is controller ({event.get('reason')})")
            elif event["event"] == "round":
                self._round(event)
            elif event["event"] == "finish" and not self.finished:
                self._finished(event)
        if len(joined) > len(self.joined):
            self._joined(joined)
        exits: dict[str, list[str]] = {}  # one line for the peers that exit alike (a host's K peers do at once)
        for peer, state in (states or {}).items():
            if peer not in self.exited and state.startswith(("exited", "dead")):
                self.exited.add(peer)
                code = state.split()[-1]
                why = " (killed on purpose)" if code != "0" and peer in self.net.killed_on_purpose() else ""
                exits.setdefault(f"exited {code}{why}", []).append(peer)
        for what, peers in exits.items():
            say(f"{spans(peers)} {what}")

    def _joined(self, joined: set[str]) -> None:
        self.joined = joined
        say(f"peers joined {len(joined)}/{len(self.net.peers)}")

    def _round(self, row: dict) -> None:
        key = (row.get("round"), row.get("term"), row.get("finished_at"))
        if key in self.rounds_seen:
            return
        self.rounds_seen.add(key)
        say(
            f"round {row.get('round')}/{self.net.max_rounds}: accuracy {number(row.get('accuracy'))} "
            f"({number(row.get('duration_s'), 1)} s; {time.time() - self.started:.0f} s since the peers started)"
        )

    def _finished(self, outcome: dict) -> None:
        self.finished = True
        say(
            f"finished ({outcome.get('reason')}): {outcome.get('rounds')} rounds, final accuracy "
            f"{number(outcome.get('final_accuracy'))}, {outcome.get('terms')} term(s), "
            f"{time.time() - self.started:.0f} s since the peers started"
        )


def number(value, digits: int = 4) -> str:
    return format(value, f".{digits}f") if isinstance(value, (int, float)) else "n/a"


def spans(peers: list[str]) -> str:
    """peer-1, peer-2, peer-3, peer-7 as `peer-1..peer-3, peer-7`: a hundred peers in one short line."""
    if not all(re.fullmatch(r"peer-\d+", p) for p in peers):
        return ", ".join(peers)
    numbers = sorted(int(p.rsplit("-", 1)[1]) for p in peers)
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    return ", ".join(
        f"peer-{r[0]}" + (f"..peer-{r[-1]}" if len(r) > 2 else f", peer-{r[-1]}" if len(r) == 2 else "") for r in runs
    )


def verdict(codes: dict[str, int | None], killed: set[str]) -> dict[str, int | None]:
    """The peers whose exit is a failure of the run: not 0, and not killed on purpose (`killed`)."""
    return {p: c for p, c in codes.items() if c != 0 and not (p in killed and c is not None)}


def graphs_command(run_dir: Path, tool: str = "graphs") -> str:
    python = ".venv/bin/python" if (ROOT / ".venv" / "bin" / "python").exists() else "python3"
    command = f"{python} -m {tool} {'--run-dir ' if tool == 'graphs.live' else ''}{shlex.quote(str(run_dir))}"
    return command if Path.cwd() == ROOT else f"cd {shlex.quote(str(ROOT))} && {command}"


def failure_reason(run_dir: Path, peer: str) -> str | None:
    """Why `peer` stopped, in its own words: the reason of its last `exit` event (events.jsonl), else the last
    `python -m peer: error:` (or peer.host's) line of its log; None if it said neither (a crash, a kill)."""
    for event in reversed(read_events(run_dir, peer, kinds={"exit"})):
        if isinstance(event.get("reason"), str) and event["reason"]:
            return event["reason"]
    log = peer_log(run_dir, peer)
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    for index in range(len(lines) - 1, -1, -1):
        match = ERROR_LINE.match(lines[index])
        if match:
            return "\n".join([match[1], *lines[index + 1 :]])  # (an error may run on, "How to get it: ...")
    return None


def report_end(run_dir: Path, failed: dict[str, int | None], interrupted: bool) -> None:
    """What became of the run: each failed peer's reason (one line for the peers that failed alike, a host's K or N
    peers without their dataset), where the records are and how to draw them."""
    alike: dict[tuple[int | None, str | None], list[str]] = {}
    for peer, code in sorted(failed.items()):
        alike.setdefault((code, failure_reason(run_dir, peer)), []).append(peer)
    for (code, reason), peers in alike.items():
        if reason:
            first, *rest = reason.splitlines() or [""]
            say(f"{spans(peers)} failed (exit {code}): {first}" + "".join(f"\n    {line}" for line in rest))
            continue
        for peer in peers:
            log = peer_log(run_dir, peer)
            lines = log.read_text(errors="replace").splitlines()[-4:] if log.exists() else []
            say(f"{peer} failed (exit {code}); its last lines:" + "".join(f"\n    {line}" for line in lines))
    if read_rounds(run_dir):
        say(f"records: {run_dir} (layout: docs/RECORDS.md)")
        say(f"graphs:  {graphs_command(run_dir)}")
        say(f"page:    {graphs_command(run_dir, 'graphs.live')} (the live page, of the finished run)")
    elif failed or interrupted:
        say(f"no round finished; logs in {peer_log(run_dir, '<id>')}")
