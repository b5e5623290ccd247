"""scripts.bench_scale's reading of a run's typed events (events.jsonl) and its table (the runs themselves are the
benchmark's, not a test's)."""

from __future__ import annotations

import pytest

from peer.records.events import EventLog
from scripts.bench_scale import Result, measure, table

T0 = 1_790_000_000.0


def write(run_dir, peer: str, events: list[tuple[float, str, dict]]) -> None:
    """`peer`'s events.jsonl as its node writes it: (seconds after T0, event, fields)."""
    clock = iter([T0 + at for at, _, _ in events])
    log = EventLog(run_dir, peer, clock=lambda: next(clock))
    for _, name, fields in events:
        log.write(name, **fields)
    log.close()


def test_election_failover_and_fits_come_from_the_peers_events(tmp_path):
    write(
        tmp_path,
        "a",
        [
            (0.0, "vote", {"term": 1, "reason": "start", "patience": 1}),
            (1.0, "office", {"term": 1, "reason": "start", "members": ["a", "b", "c"]}),
            (2.0, "sent", {"term": 1, "kind": "training", "round": 1, "trainers": ["b", "c"], "attempt": 1}),
        ],
    )
    write(
        tmp_path,
        "b",
        [
            (0.2, "vote", {"term": 1, "reason": "start", "patience": 1}),
            (1.3, "follow", {"term": 1, "controller": "a"}),
            (3.0, "job-done", {"term": 1, "kind": "fit", "round": 1, "attempt": 1, "seconds": 0.8, "error": None}),
            (7.0, "sent", {"term": 1, "kind": "solution", "round": 3}),  # not a training order
            (9.5, "sent", {"term": 2, "kind": "training", "round": 4, "trainers": ["c"], "attempt": 1}),
        ],
    )
    write(
        tmp_path,
        "c",
        [
            (1.1, "follow", {"term": 1, "controller": "a"}),
            (3.5, "job-done", {"term": 1, "kind": "fit", "round": 1, "attempt": 1, "seconds": 1.5, "error": None}),
            (4.0, "job-done", {"term": 1, "kind": "evaluate", "round": 1, "attempt": 1, "seconds": 0.3, "error": None}),
            (6.0, "job-done", {"term": 1, "kind": "fit", "round": 2, "attempt": 1, "seconds": 9.0, "error": "boom"}),
        ],
    )
    with (tmp_path / "peers" / "c" / "events.jsonl").open("a") as torn:  # a peer killed mid-line
        torn.write('{"t": 12.0, "peer": "c", "event": "vot')
    election, all_know, failover, fits = measure(tmp_path, killed_at=T0 + 8.0, killed_term=1)
    assert election == pytest.approx(1.0, abs=1e-3) and all_know == pytest.approx(1.3, abs=1e-3)
    assert failover == pytest.approx(1.5, abs=1e-3)
    assert fits == {("b", 1, 1): 0.8, ("c", 1, 1): 1.5}  # evaluations and failed fits are not fits
    # no training order of a later term after the kill: no failover figure, not a made-up one
    assert measure(tmp_path, killed_at=T0 + 10.0, killed_term=1)[2] is None
    assert measure(tmp_path / "empty", killed_at=None, killed_term=None) == (None, None, None, {})


def test_the_table_shows_what_was_not_measured_as_n_a():
    result = Result(
        peers=5,
        processes=3,
        rounds=0,
        round_s=None,
        overhead_s=None,
        election_s=1.0,
        all_know_s=1.0,
        failover_s=None,
        killed=2,
        pss_mb=1024.0,
        broker_pss_mb=5.0,
        broker_cpu_s=0.5,
        wall_s=10.0,
        one_controller_per_term=True,
    )
    text = table([result])
    assert "n/a" in text and "1.00" in text and "5.0" in text and text.splitlines()[0].startswith("peers")
