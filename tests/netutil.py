"""Helpers for the end-to-end tests: a real broker and real peer processes (scripts/localnet.py), and readers for
what they leave behind. Nothing here fakes the broker or the peers."""

from __future__ import annotations

import csv
import json
import re
import time
from pathlib import Path

from scripts.chaos import current_controller, live_statuses, read_statuses
from scripts.localnet import LocalNetwork

ROOT = Path(__file__).resolve().parent.parent
SHARED_MNIST = ROOT.parent / "shared" / "data" / "mnist"
FASHION = Path("/usr/share/datasets/fashion-mnist")

# Small, fast settings: a few hundred samples a peer, short timeouts, so a run takes seconds, not minutes.
SMALL = [
    "--dataset",
    "fashion-mnist",
    "--train-samples",
    "500",
    "--test-samples",
    "200",
    "--heartbeat",
    "0.5",
    "--election-window",
    "0.5",
    "--keepalive",
    "2",
    "--round-deadline",
    "20",
    "--target-accuracy",
    "1.0",
]


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def wait_until(predicate, timeout: float, what: str, net: LocalNetwork | None = None, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    detail = ""
    if net is not None:
        detail = "\n".join(
            f"--- {p} (exit {proc.poll()})\n" + "\n".join(net.peer_log(p).splitlines()[-25:])
            for p, proc in net.procs.items()
        )
    raise AssertionError(f"timed out after {timeout}s waiting for {what}\n{detail}")


def controller_now(run_dir: Path) -> str | None:
    return current_controller(live_statuses(run_dir))


def statuses(run_dir: Path) -> dict[str, dict]:
    return read_statuses(run_dir)


def rounds(run_dir: Path) -> list[dict]:
    return read_csv(run_dir / "rounds.csv")


def elections(run_dir: Path) -> list[dict]:
    return read_csv(run_dir / "elections.csv")


def run_json(run_dir: Path) -> dict:
    return json.loads((run_dir / "run.json").read_text())


def log_matches(net: LocalNetwork, peer: str, pattern: str) -> list[re.Match]:
    return list(re.finditer(pattern, net.peer_log(peer)))


def assert_all_exited_zero(codes: dict, net: LocalNetwork, allowed_killed: set[str] = frozenset()) -> None:
    bad = {p: c for p, c in codes.items() if c != 0 and p not in allowed_killed}
    if bad:
        detail = "\n".join(
            f"--- {p} (exit {c})\n" + "\n".join(net.peer_log(p).splitlines()[-40:]) for p, c in bad.items()
        )
        raise AssertionError(f"peers did not exit 0: {bad}\n{detail}")


def assert_rounds_complete(run_dir: Path, max_rounds: int) -> list[dict]:
    """rounds.csv holds every round 1..max_rounds exactly once, in order."""
    rows = rounds(run_dir)
    assert [int(r["round"]) for r in rows] == list(range(1, max_rounds + 1)), rows
    return rows


def assert_rounds_complete_but_reevaluated(run_dir: Path, max_rounds: int) -> list[dict]:
    """Every round 1..max_rounds, in order, once, except a re-evaluation: when the broker goes away the controller
    may be counted gone or silent, and if the last round's metrics went with the broker, the new controller evaluates
    that round again and records it a second time (the later row counts, docs/RECORDS.md): a later term, and no
    training (0 s)."""
    rows = rounds(run_dir)
    assert sorted({int(r["round"]) for r in rows}) == list(range(1, max_rounds + 1)), rows
    assert [int(r["round"]) for r in rows] == sorted(int(r["round"]) for r in rows), rows
    for earlier, later in zip(rows, rows[1:]):
        if later["round"] == earlier["round"]:
            assert int(later["term"]) > int(earlier["term"]) and float(later["duration_s"]) == 0.0, rows
    return rows


def fresh_stamper(incarnation: int | None = None, clock=time.time):
    """A Stamper as a newly started process has one: a fresh incarnation, the wall clock."""
    from peer.wire.envelope import Stamper, new_incarnation

    return Stamper(new_incarnation(time.time_ns()) if incarnation is None else incarnation, clock)
