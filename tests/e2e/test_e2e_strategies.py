"""Server optimizers and differential privacy in a real federation: real broker, real peer processes, real signals.

The server optimizer's moments survive a SIGKILL of the controller (the next one goes on from them, as the peers'
events.jsonl show: the moments it took over are the ones the old controller sent), a DP run reports the accountant
library's epsilon in every rounds.csv row and ends before a round could overspend --dp-target-epsilon, and
scripts.bench_strategies runs its smallest configuration (20 peers, 3 rounds, every strategy on the pathological
split, tiny shards: the benchmark's machinery, not its figures; the IID split differs only in its --partition,
which tests/scripts/test_bench_strategies.py checks with the flags)."""

from __future__ import annotations

import json
import signal

import pytest

from peer.records.events import read_events
from peer.records.run_dir import read_rounds
from scripts import bench_strategies, chaos
from scripts.localnet import LocalNetwork
from tests.graphs.test_graphs import assert_sensible_png
from tests.netutil import SMALL, assert_all_exited_zero, assert_rounds_complete, elections, rounds, run_json, wait_until


def network(run_dir, peers=5, extra=(), **kw) -> LocalNetwork:
    return LocalNetwork(run_dir, peers, [*SMALL, "--min-peers", str(peers), *extra], **kw)


def test_the_next_controller_continues_the_server_optimizers_moments_after_a_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    extra = ["--server-optimizer", "adam", "--server-lr", "0.01", "--max-rounds", "5", "--epochs", "2"]
    with network(run_dir, extra=extra) as net:
        wait_until(lambda: len(rounds(run_dir)) >= 2, 180, "round 2 to finish", net)
        victim, _ = chaos.kill(run_dir, "controller", "KILL")
        codes = net.wait(240)
    assert codes[victim] == -signal.SIGKILL
    assert_all_exited_zero(codes, net, allowed_killed={victim})
    assert_rounds_complete(run_dir, 5)
    terms = elections(run_dir)
    killed_term = max(int(e["term"]) for e in terms if e["controller"] == victim)
    successor = next(e["controller"] for e in terms if int(e["term"]) > killed_term)
    assert successor != victim
    states = read_events(run_dir, kinds={"server-state"})
    sent = [e for e in states if e["peer"] == victim and e["action"] == "updated"]
    assert len(sent) >= 2, states
    # The successor held the last model the victim published and took over that model's state: the same step,
    # round and moments (the norms of m and v, float32 sums, are equal).
    taken = next(e for e in states if e["peer"] == successor and e["action"] != "updated")
    last = sent[-1]
    assert taken["action"] == "continued" and taken["source"] == victim, taken
    assert (taken["round"], taken["step"], taken["digest"]) == (last["round"], last["step"], last["digest"])
    assert taken["m_norm"] == pytest.approx(last["m_norm"], rel=1e-9) and taken["v_norm"] > 0
    assert taken["v_norm"] == pytest.approx(last["v_norm"], rel=1e-9)
    # ... and the optimizer went on counting from there, not from zero: one update a round, steps 1 to 5, whoever
    # made them (a later election on a busy machine would hand them on the same way)
    updates = [e for e in states if e["action"] == "updated"]
    assert [(e["round"], e["step"]) for e in updates] == [(n, n) for n in range(1, 6)], updates
    assert all(e["peer"] != victim for e in updates[len(sent) :])
    assert run_json(run_dir)["outcome"]["server_step"] == 5


def test_a_dp_run_reports_the_accountants_epsilon_and_ends_when_the_budget_is_spent(tmp_path):
    from peer.learning.privacy import epsilon

    run_dir = tmp_path / "run"
    z, delta = 1.0, 1e-5
    budget = (epsilon(z, 2, delta) + epsilon(z, 3, delta)) / 2  # two releases of one peer fit, a third does not
    extra = [
        *("--dp-clip", "1.0", "--dp-noise-multiplier", str(z), "--dp-delta", str(delta)),
        *("--dp-target-epsilon", f"{budget:.6f}", "--trainers", "2", "--max-rounds", "20"),
    ]
    with network(run_dir, extra=extra) as net:
        codes = net.wait(240)
    assert_all_exited_zero(codes, net)
    outcome = run_json(run_dir)["outcome"]
    assert outcome["reason"] == "privacy-budget" and outcome["rounds"] < 20
    rows = read_rounds(run_dir)
    assert [r.round for r in rows] == list(range(1, outcome["rounds"] + 1))
    # Central DP releases the peers a round's aggregate used (its trainers): the ledger, rebuilt from the records.
    released: dict[str, int] = {}
    for row in rows:
        for peer in row.trainers:
            released[peer] = released.get(peer, 0) + 1
        most = max(released.values())
        assert row.epsilon == pytest.approx(epsilon(z, most, delta), abs=1e-6)  # rounds.csv keeps 6 decimals
    assert max(released.values()) == 2 and rows[-1].epsilon <= budget < epsilon(z, 3, delta)
    assert outcome["epsilon"] == pytest.approx(rows[-1].epsilon, abs=1e-6) and outcome["dp_delta"] == delta
    assert run_json(run_dir)["settings"]["dp_target_epsilon"] == pytest.approx(budget, abs=1e-6)


def test_the_smallest_configuration_runs_every_strategy(tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench_strategies.main(
        [
            *("--peers", "20", "--rounds", "3", "--trainers", "3", "--samples", "40", "--test-samples", "40"),
            *("--epochs", "1", "--batch-size", "20", "--model", "cnn-small", "--out", str(out)),
            *("--round-deadline", "60", "--timeout-per-round", "120", "--splits", "pathological"),
            *("--", "--heartbeat", "0.5", "--election-window", "0.5"),
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    runs = {(r["split"], r["strategy"]): r for r in results["runs"]}
    assert set(runs) == {("pathological", t) for t in bench_strategies.STRATEGIES}
    for (split, strategy), run in runs.items():
        assert run["reason"] == "max-rounds", (split, strategy, run)
        assert [r for r, _ in run["accuracy"]] == [0, 1, 2, 3], (split, strategy)
        assert (run["epsilon"] is not None) == (strategy == "dp-fedavg")
    text = (out / "results.md").read_text()
    assert text.count("\n| ") == 5 and "20 peers (10 to a process), 40 training samples each" in text
    assert "load average" in text and text in capsys.readouterr().out
    assert_sensible_png(out / "strategies.png")
