"""End to end: a real mosquitto and five real peer processes federate to the finish, on Fashion-MNIST and on the
real MNIST digits. Asserts outcomes: one controller everybody agrees on, accuracy rose, every peer got the finish
and exited 0, the records and graphs exist."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import pytest

from scripts.localnet import LocalNetwork
from tests.netutil import (
    ROOT,
    SHARED_MNIST,
    SMALL,
    assert_all_exited_zero,
    assert_rounds_complete,
    elections,
    log_matches,
    read_csv,
    run_json,
    statuses,
)

PEERS = 5


def federate(run_dir, extra):
    with LocalNetwork(run_dir, PEERS, [*SMALL, "--min-peers", str(PEERS), "--max-rounds", "3", *extra]) as net:
        codes = net.wait(240)
        assert_all_exited_zero(codes, net)
    return net


def check_run(run_dir, net):
    [election] = elections(run_dir)
    controller = election["controller"]
    assert election["term"] == "1" and election["reason"] == "start"
    assert sorted(election["members"].split(";")) == [f"peer-{i}" for i in range(1, PEERS + 1)]

    # Every peer agrees on the one controller, and every other peer received the finish.
    final = statuses(run_dir)
    assert len(final) == PEERS and {s["controller"] for s in final.values()} == {controller}
    assert {s["term"] for s in final.values()} == {1}
    for peer in final:
        followed = {m[1] for m in log_matches(net, peer, r"term 1: controller is (\S+)")}
        if peer == controller:
            assert log_matches(net, peer, r"controller of term 1 \(start\)") and not followed
        else:
            assert followed == {controller}, (peer, followed)
            assert log_matches(net, peer, rf"finish received from {controller} \(max-rounds\) after round 3")

    rows = assert_rounds_complete(run_dir, 3)
    assert {r["term"] for r in rows} == {"1"} and {r["controller"] for r in rows} == {controller}
    for row in rows:
        trainers = row["trainers"].split(";")
        assert controller not in trainers and 1 <= len(trainers) <= 3
        assert int(row["bytes_sent"]) > 0 and float(row["duration_s"]) > 0

    outcome = run_json(run_dir)["outcome"]
    assert outcome["reason"] == "max-rounds" and outcome["rounds"] == 3
    assert outcome["final_accuracy"] > outcome["initial_accuracy"] + 0.1, outcome
    assert float(rows[-1]["accuracy"]) == pytest.approx(outcome["final_accuracy"], abs=1e-5)
    assert zipfile.is_zipfile(run_dir / "model.keras")

    for peer in final:
        data = json.loads((run_dir / "peers" / peer / "data.json").read_text())
        assert data["train_samples"] == 500 and sum(data["train_classes"]) == 500
        evaluations = read_csv(run_dir / "peers" / peer / "evaluations.csv")
        if peer != controller:  # the controller never trains and never evaluates
            assert [int(e["round"]) for e in evaluations] == [0, 1, 2, 3]
        else:
            assert evaluations == []
    return controller


def test_five_peers_federate_fashion_mnist_to_the_finish_and_the_graphs_draw(tmp_path):
    run_dir = tmp_path / "run"
    net = federate(run_dir, [])
    check_run(run_dir, net)

    # The graph tool, on the records of this real run.
    result = subprocess.run(
        [sys.executable, "-m", "graphs", str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    expected = {
        "accuracy_all_peers.png",
        "global_accuracy_loss.png",
        "round_durations.png",
        "election_timeline.png",
        "class_distribution.png",
    }
    expected |= {f"accuracy_peer_peer-{i}.png" for i in range(1, PEERS + 1)}
    written = {p.name for p in (run_dir / "graphs").glob("*.png")}
    missing = expected - written
    # the controller never evaluated, so it may have no accuracy graph of its own
    assert len(missing) <= 1 and all(name.startswith("accuracy_peer_") for name in missing), missing
    for path in (run_dir / "graphs").glob("*.png"):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_five_peers_federate_the_real_mnist_digits(tmp_path):
    run_dir = tmp_path / "run"
    net = federate(run_dir, ["--dataset", "mnist", "--data-dir", str(SHARED_MNIST)])
    check_run(run_dir, net)
    data = json.loads((run_dir / "peers" / "peer-1" / "data.json").read_text())
    assert data["dataset"] == "mnist" and "test set split" in data["source"]
