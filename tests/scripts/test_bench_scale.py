"""scripts.bench_scale's reading of a run's logs and its table (the runs themselves are the benchmark's, not a
test's)."""

from __future__ import annotations

from datetime import datetime

import pytest

from scripts.bench_scale import Result, measure, table

T0 = datetime(2026, 1, 2, 3, 4, 5).timestamp()


def line(at: float, peer: str, role: str, term: int, text: str) -> str:
    stamp = datetime.fromtimestamp(T0 + at).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]
    return f"{stamp} INFO    peer={peer} role={role} term={term} round=0 phase=- | {text}"


class Logs:
    def __init__(self, logs: dict[str, list[str]]):
        self.logs = logs

    def peer_log(self, peer: str) -> str:
        return "\n".join(self.logs.get(peer, []))


def test_election_failover_and_fits_come_from_the_peers_own_lines():
    net = Logs(
        {
            "a": [
                line(0.0, "a", "voting", 1, "election for term 1 (start): voting 0.5"),
                line(1.0, "a", "controller", 1, "controller of term 1 (start), members a,b,c"),
                line(2.0, "a", "controller", 1, "round 1: training order to b,c (quorum 2)"),
            ],
            "b": [
                line(0.2, "b", "voting", 1, "election for term 1 (start): voting 0.1"),
                line(1.3, "b", "trainer", 1, "term 1: controller is a"),
                line(3.0, "b", "trainer", 1, "round 1: trained 500 samples in 0.8s (loss 1.0), solution sent"),
                line(9.5, "b", "controller", 2, "round 4: training order to c (quorum 1)"),
            ],
            "c": [
                line(1.1, "c", "trainer", 1, "term 1: controller is a"),
                line(3.5, "c", "trainer", 1, "round 1: trained 500 samples in 1.5s (loss 1.0), solution sent"),
            ],
        }
    )
    election, all_know, failover, fits = measure(net, ["a", "b", "c"], killed_at=T0 + 8.0, killed_term=1)
    assert election == pytest.approx(1.0, abs=1e-3) and all_know == pytest.approx(1.3, abs=1e-3)
    assert failover == pytest.approx(1.5, abs=1e-3)
    assert fits == {("b", 1, 1): 0.8, ("c", 1, 1): 1.5}
    # no training order of a later term after the kill: no failover figure, not a made-up one
    assert measure(net, ["a", "b", "c"], killed_at=T0 + 10.0, killed_term=1)[2] is None


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
