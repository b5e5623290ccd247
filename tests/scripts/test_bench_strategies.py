"""scripts.bench_strategies: its reading of a run's records, its table, its flags and its report from the records (its
smallest configuration runs for real in tests/e2e/test_e2e_strategies.py)."""

from __future__ import annotations

import json

import pytest

from peer.records.run_dir import RunRecorder
from scripts import bench_strategies
from scripts.bench_strategies import Outcome, peer_flags, read_outcome, table
from tests.graphs.test_graphs import assert_sensible_png


def record(run_dir, accuracies, epsilons=None, reason="max-rounds", initial=0.1, settings=None, finished=True):
    recorder = RunRecorder(run_dir, "p1")
    for number, accuracy in enumerate(accuracies, start=1):
        recorder.round(
            round=number,
            term=1,
            controller="p1",
            trainers=["p2"],
            accuracy=accuracy,
            loss=1.0,
            duration_s=1.0,
            bytes_sent=1,
            finished_at=100.0 + 60 * number,
            started_at=40.0 + 60 * number,
            epsilon=(epsilons or {}).get(number),
        )
    if finished:
        outcome = {"reason": reason, "initial_accuracy": initial, "duration_s": 70.0 * len(accuracies)}
        recorder.run({"settings": settings or {}, "outcome": outcome})


def test_the_rounds_to_each_accuracy_and_the_last_come_from_the_records(tmp_path):
    record(tmp_path / "a", [0.5, 0.81, 0.79, 0.86, 0.84])
    record(tmp_path / "b", [0.3, 0.4], epsilons={1: 3.0, 2: 4.5})
    a = read_outcome(Outcome("iid", "fedavg", str(tmp_path / "a")))
    b = read_outcome(Outcome("pathological", "dp-fedavg", str(tmp_path / "b")))
    assert a.accuracy[0] == (0, 0.1) and a.rounds_to(0.8) == 2 and a.rounds_to(0.85) == 4 and a.last == (5, 0.84)
    assert b.rounds_to(0.8) is None and b.epsilon == 4.5 and b.reason == "max-rounds"
    text = table([a, b])
    assert a.best == (4, 0.86) and a.mean_of_last(3) == (3, 5, pytest.approx((0.79 + 0.86 + 0.84) / 3))
    assert "| iid | FedAvg | 2 | 4 | 84.00% (round 5) | 86.00% (round 4) | 76.00% (rounds 1-5) | – |" in text
    assert (
        "| pathological | DP-FedAvg | not reached | not reached | 40.00% (round 2) | 40.00% (round 2) | "
        "35.00% (rounds 1-2) | 4.5 |" in text
    )
    gone = read_outcome(Outcome("iid", "fedadam", str(tmp_path / "never-ran")))
    assert gone.best is None and gone.mean_of_last(10) is None
    assert gone.accuracy == [] and "| no round | no round | no round |" in table([gone])
    assert "did not finish" in table([gone])


def test_the_results_are_made_again_from_the_records_of_an_interrupted_benchmark(tmp_path, capsys):
    settings = dict(min_peers=20, train_samples=600, trainers=10, epochs=5, batch_size=10, model="fedavg-cnn")
    record(tmp_path / "iid-fedavg", [0.78, 0.82, 0.86], settings=dict(settings, max_rounds=3, seed=42))
    record(tmp_path / "iid-dp-fedavg", [0.69, 0.77], epsilons={1: 5.6e3, 2: 1.1e4}, finished=False)  # stopped
    (tmp_path / "unrelated").mkdir()
    assert bench_strategies.main(["--report", str(tmp_path)]) == 0
    text = (tmp_path / "results.md").read_text()
    assert text.startswith("20 peers, 600 training samples each, 10 trainers a round, E=5, B=10, --model fedavg-cnn")
    assert "not measured" in text and text in capsys.readouterr().out
    assert (
        "| iid | FedAvg | 2 | 3 | 86.00% (round 3) | 86.00% (round 3) | 82.00% (rounds 1-3) | – | 210 s, max-rounds |"
        in text
    )
    # the unfinished run: the rounds it recorded, its seconds from their span (round 1's start to round 2's end)
    assert (
        "| iid | DP-FedAvg | not reached | not reached | 77.00% (round 2) | 77.00% (round 2) | 73.00% (rounds 1-2) | "
        "1.1e+04 | 120 s, did not finish |" in text
    )
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    assert [(r["strategy"], r["load"]) for r in runs] == [("fedavg", None), ("dp-fedavg", None)]
    assert_sensible_png(tmp_path / "strategies.png")


def test_a_report_of_a_folder_without_runs_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no run of the benchmark in"):
        bench_strategies.main(["--report", str(tmp_path)])


def test_each_strategy_and_split_is_its_flags():
    class Args:
        model, seed, peers, trainers, epochs, batch_size, rounds = "fedavg-cnn", 42, 100, 10, 5, 10, 50
        samples, test_samples, round_deadline = 600, 0, 900.0
        mu, server_lr, tau, dp_clip, dp_noise = 0.01, 0.01, 1e-3, 1.0, 0.01

    flags = peer_flags("pathological", "fedadam", Args)
    assert flags[flags.index("--partition") + 1] == "shards" and "--train-samples" not in flags  # 100 x 600
    assert flags[-6:] == ["--server-optimizer", "adam", "--server-lr", "0.01", "--tau", "0.001"]
    Args.peers = 20
    flags = peer_flags("iid", "dp-fedavg", Args)
    assert flags[flags.index("--partition") + 1] == "iid"
    assert flags[flags.index("--train-samples") + 1] == "600" and flags[-4:] == [
        "--dp-clip",
        "1.0",
        "--dp-noise-multiplier",
        "0.01",
    ]
    assert peer_flags("iid", "fedprox", Args)[-2:] == ["--proximal-mu", "0.01"]
