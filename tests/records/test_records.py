"""peer.records.run_dir: what the writer puts in a run dir, the readers get back, file by file; old files still read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from peer.records.run_dir import (
    CHAOS_COLUMNS,
    ELECTIONS_COLUMNS,
    EVALUATIONS_COLUMNS,
    ROUNDS_COLUMNS,
    ChaosRecord,
    ElectionRecord,
    EvaluationRecord,
    PeerData,
    RoundRecord,
    RunDirError,
    RunRecorder,
    global_series,
    load_run,
    read_chaos,
    read_elections,
    read_evaluations,
    read_peer_data,
    read_rounds,
    read_run_summary,
    read_statuses,
    record_chaos,
    weighted_mean,
)

T0 = 1_790_000_000.25
ROUND = dict(
    round=1,
    term=2,
    controller="peer-1",
    trainers=["peer-2", "peer-3"],
    accuracy=0.8125,
    loss=0.5,
    duration_s=3.5,
    bytes_sent=123456,
    finished_at=T0 + 10,
    started_at=T0 + 6.5,
)
DATA = {
    "peer": "peer-2",
    "dataset": "mnist",
    "shard": "1/5",
    "partition": "skewed",
    "seed": 42,
    "source": "here",
    "num_classes": 3,
    "train_samples": 60,
    "test_samples": 9,
    "train_classes": [10, 20, 30],
    "test_classes": [3, 3, 3],
}


def test_every_csv_file_reads_back_what_was_written(tmp_path):
    controller, trainer = RunRecorder(tmp_path, "peer-1"), RunRecorder(tmp_path, "peer-2")
    controller.election(2, "peer-1", "controller-lost", ["peer-1", "peer-2", "peer-3"], at=T0)
    controller.round(**ROUND)
    trainer.evaluation(1, 2, 0.75, 0.625, 100, at=T0 + 9)
    record_chaos(tmp_path, "kill", "peer-4", "KILL", at=T0 - 1)

    warnings: list[str] = []
    assert read_elections(tmp_path, warnings) == [
        ElectionRecord(
            term=2, controller="peer-1", reason="controller-lost", time=T0, members=["peer-1", "peer-2", "peer-3"]
        )
    ]
    assert read_rounds(tmp_path, warnings) == [RoundRecord(**ROUND)]
    assert read_evaluations(tmp_path, "peer-2", warnings) == [
        EvaluationRecord(round=1, term=2, accuracy=0.75, loss=0.625, samples=100, time=T0 + 9)
    ]
    assert read_chaos(tmp_path, warnings) == [ChaosRecord(time=T0 - 1, action="kill", peer="peer-4", signal="KILL")]
    assert warnings == []


def test_every_json_file_reads_back_what_was_written(tmp_path):
    recorder = RunRecorder(tmp_path, "peer-2")
    recorder.data(DATA)
    recorder.status(peer="peer-2", role="trainer", term=2, round=1, controller="peer-1", accuracy=None)
    recorder.run({"settings": {"target_accuracy": 0.9}, "outcome": {"initial_accuracy": 0.1, "finished_at": T0}})

    assert read_peer_data(tmp_path, "peer-2") == PeerData(
        peer="peer-2",
        dataset="mnist",
        shard="1/5",
        partition="skewed",
        seed=42,
        num_classes=3,
        train_samples=60,
        test_samples=9,
        train_classes=[10, 20, 30],
        test_classes=[3, 3, 3],
    )
    status = read_statuses(tmp_path)["peer-2"]
    assert status["role"] == "trainer" and status["term"] == 2 and status["pid"] == os.getpid()
    summary = read_run_summary(tmp_path)
    assert (summary.target_accuracy, summary.initial_accuracy, summary.finished_at) == (0.9, 0.1, T0)
    assert recorder.model_path == tmp_path / "model.keras"
    assert not list(tmp_path.rglob("*.tmp"))  # the atomic writes leave no temporary file behind


def test_load_run_gathers_every_file(tmp_path):
    controller, trainer = RunRecorder(tmp_path, "peer-1"), RunRecorder(tmp_path, "peer-10")
    controller.election(1, "peer-1", "start", ["peer-2", "peer-10"], at=T0)
    controller.round(**{**ROUND, "term": 1, "trainers": ["peer-10"]})
    trainer.evaluation(0, 1, 0.5, 1.0, 10, at=T0 + 1)
    trainer.data({**DATA, "peer": "peer-10"})
    RunRecorder(tmp_path, "peer-2").evaluation(0, 1, 0.25, 2.0, 30, at=T0 + 1)
    record_chaos(tmp_path, "stop", "peer-1", "STOP", at=T0 + 20)

    history = load_run(tmp_path)
    assert history.warnings == [] and not history.is_empty
    assert list(history.peers) == ["peer-1", "peer-2", "peer-10"]  # natural order
    assert [r.round for r in history.rounds] == [1] and [e.term for e in history.elections] == [1]
    assert history.peers["peer-10"].data.dataset == "mnist" and history.peers["peer-1"].data is None
    assert history.chaos[0].action == "stop" and history.controller_of_term() == {1: "peer-1"}
    # round 0 rebuilt from the members' evaluations, weighted by their samples; round 1 from rounds.csv
    series = global_series(history)
    assert [(p.round, p.estimated) for p in series] == [(0, True), (1, False)]
    assert series[0].accuracy == pytest.approx((0.5 * 10 + 0.25 * 30) / 40)
    assert series[1].accuracy == ROUND["accuracy"]


def test_a_rounds_file_without_started_at_still_reads(tmp_path):
    old_columns = [c for c in ROUNDS_COLUMNS if c not in ("started_at", "epsilon")]
    (tmp_path / "rounds.csv").write_text(
        ",".join(old_columns) + "\n1,1,peer-1,peer-2;peer-3,0.500000,1.000000,2.0,100,1790000000.0\n"
    )
    warnings: list[str] = []
    rounds = read_rounds(tmp_path, warnings)
    assert warnings == []
    assert rounds == [
        RoundRecord(
            round=1,
            term=1,
            controller="peer-1",
            trainers=["peer-2", "peer-3"],
            accuracy=0.5,
            loss=1.0,
            duration_s=2.0,
            bytes_sent=100,
            finished_at=1790000000.0,
        )
    ]
    assert rounds[0].started_at is None


def test_a_round_without_started_at_is_written_with_an_empty_cell(tmp_path):
    row = {k: v for k, v in ROUND.items() if k != "started_at"}
    RunRecorder(tmp_path, "peer-1").round(**row)
    assert (tmp_path / "rounds.csv").read_text().splitlines()[1].endswith(",")
    assert read_rounds(tmp_path)[0].started_at is None


def test_the_later_row_of_a_round_counts(tmp_path):
    recorder = RunRecorder(tmp_path, "peer-1")
    recorder.round(**ROUND)
    recorder.round(**{**ROUND, "term": 3, "duration_s": 0.0, "started_at": None})
    assert [(r.term, r.started_at) for r in read_rounds(tmp_path)] == [(3, None)]


def test_an_unknown_column_is_refused(tmp_path):
    with pytest.raises(TypeError, match="start_at"):
        RunRecorder(tmp_path, "peer-1").round(**ROUND, start_at=T0)
    assert not (tmp_path / "rounds.csv").exists()


def test_a_rounds_file_without_epsilon_still_reads_and_a_dp_run_has_it(tmp_path):
    before = [c for c in ROUNDS_COLUMNS if c != "epsilon"]
    (tmp_path / "rounds.csv").write_text(
        ",".join(before) + "\n1,1,peer-1,peer-2,0.500000,1.000000,2.0,100,1790000000.0,1789999998.0\n"
    )
    warnings: list[str] = []
    [row] = read_rounds(tmp_path, warnings)
    assert warnings == [] and row.started_at == 1789999998.0 and row.epsilon is None
    (tmp_path / "rounds.csv").unlink()
    recorder = RunRecorder(tmp_path, "peer-1")
    recorder.round(
        round=1,
        term=1,
        controller="peer-1",
        trainers=["peer-2"],
        accuracy=0.5,
        loss=1.0,
        duration_s=1.0,
        bytes_sent=10,
        finished_at=2.0,
        started_at=1.0,
        epsilon=1.234567,
    )
    recorder.round(
        round=2,
        term=1,
        controller="peer-1",
        trainers=["peer-2"],
        accuracy=0.5,
        loss=1.0,
        duration_s=1.0,
        bytes_sent=10,
        finished_at=3.0,
        started_at=2.0,
        epsilon=None,
    )
    assert [r.epsilon for r in read_rounds(tmp_path, warnings)] == [1.234567, None] and warnings == []


def test_the_columns_are_the_documented_headers():
    documented = (Path(__file__).resolve().parents[2] / "docs" / "RECORDS.md").read_text()
    for columns in (ROUNDS_COLUMNS, ELECTIONS_COLUMNS, EVALUATIONS_COLUMNS, CHAOS_COLUMNS):
        assert f"`{','.join(columns)}`" in documented


def test_a_missing_run_dir_is_an_error():
    with pytest.raises(RunDirError, match="does not exist"):
        load_run("/nonexistent/run")


def test_missing_files_read_as_nothing(tmp_path):
    assert read_rounds(tmp_path) == [] and read_elections(tmp_path) == [] and read_chaos(tmp_path) == []
    assert read_evaluations(tmp_path, "peer-1") == [] and read_peer_data(tmp_path, "peer-1") is None
    assert read_run_summary(tmp_path) is None and read_statuses(tmp_path) == {}
    assert load_run(tmp_path).is_empty


def test_a_torn_status_file_is_left_out(tmp_path):
    RunRecorder(tmp_path, "peer-1").status(role="trainer")
    torn = tmp_path / "peers" / "peer-2" / "status.json"
    torn.parent.mkdir(parents=True)
    torn.write_text('{"role": "contr')
    assert list(read_statuses(tmp_path)) == ["peer-1"]
    assert json.loads((tmp_path / "peers" / "peer-1" / "status.json").read_text())["role"] == "trainer"


@pytest.mark.parametrize(
    "pairs, expected",
    [
        ([(0.5, 1), (1.0, 3)], 0.875),
        ([(0.9, 0), (0.3, 4)], 0.3),  # a count of 0 weighs nothing
        ([(0.9, -5), (0.3, 4)], 0.3),  # nor does a negative one
        ([], None),
        ([(0.7, 0)], None),  # nothing to weigh
    ],
)
def test_weighted_mean(pairs, expected):
    result = weighted_mean(iter(pairs))
    assert result == (pytest.approx(expected) if expected is not None else None)


# --- the checkpoint -----------------------------------------------------------------------------------------------------


def test_a_checkpoint_is_written_whole_and_read_back(tmp_path):
    from peer.records.run_dir import CHECKPOINT_DIR, read_checkpoint

    recorder = RunRecorder(tmp_path, "c")
    state = {
        "run_id": "r1",
        "round": 2,
        "term": 3,
        "trainers": ["a", "b"],
        "run_started": 10.0,
        "rounds": [{"round": 0, "term": 1, "accuracy": 0.1, "loss": 2.0, "bytes": 5}],
    }
    recorder.checkpoint(state, b"weights-2")
    recorder.checkpoint({**state, "round": 3}, b"weights-3")
    checkpoint = read_checkpoint(tmp_path)
    assert (checkpoint.run_id, checkpoint.round, checkpoint.term, checkpoint.weights) == ("r1", 3, 3, b"weights-3")
    assert checkpoint.trainers == ["a", "b"] and checkpoint.rounds[0]["accuracy"] == 0.1
    assert sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir()) == ["checkpoint.json", "weights-3.bin"]


def test_no_checkpoint_is_none_and_a_damaged_one_says_why(tmp_path):
    from peer.records.run_dir import CHECKPOINT_DIR, CheckpointError, read_checkpoint

    assert read_checkpoint(tmp_path) is None
    RunRecorder(tmp_path, "c").checkpoint({"run_id": "r", "round": 1, "term": 1}, b"abc")
    (tmp_path / CHECKPOINT_DIR / "weights-1.bin").write_bytes(b"abd")
    with pytest.raises(CheckpointError, match="does not match its digest"):
        read_checkpoint(tmp_path)
    (tmp_path / CHECKPOINT_DIR / "checkpoint.json").write_text("{")
    with pytest.raises(CheckpointError, match="cannot be read"):
        read_checkpoint(tmp_path)


def test_a_checkpoint_keeps_the_server_state_and_a_resumed_run_gets_it_back(tmp_path):
    import numpy as np

    from peer.learning.privacy import Ledger
    from peer.learning.server_optimizers import ServerOptimizer
    from peer.records.checkpoint import checkpoint_state, run_state
    from peer.records.run_dir import CHECKPOINT_DIR, CheckpointError, read_checkpoint
    from peer.roles.rounds import GlobalModel, RoundSummary, ServerMemory
    from peer.wire.weights import WeightCodec

    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(4, np.float32)]
    adam = ServerOptimizer("adam")
    _, optimizer_state = adam.apply(weights, [w + 0.5 for w in weights])
    model = GlobalModel(4, 2, weights, ("a",), "c")
    server = ServerMemory(model.digest, optimizer_state, Ledger().released(["a", "b"]).released(["a"]))
    rounds = (RoundSummary(4, 2, 0.5, 1.0, 10),)
    recorder = RunRecorder(tmp_path, "c")
    for round_ in (3, 4):  # the older round's files go
        state = checkpoint_state("r1", GlobalModel(round_, 2, weights, ("a",), "c"), rounds, 1.0, server)
        recorder.checkpoint(state, WeightCodec.parts(weights), WeightCodec.parts(optimizer_state.tensors()))
    names = sorted(p.name for p in (tmp_path / CHECKPOINT_DIR).iterdir())
    assert names == ["checkpoint.json", "server-state-4.bin", "weights-4.bin"]
    back = run_state(read_checkpoint(tmp_path))
    assert back.model.controller == "c" and back.server.digest == model.digest
    assert back.server.optimizer.step == 1 and dict(back.server.ledger.counts) == {"a": 2, "b": 1}
    assert all(np.array_equal(a, b) for a, b in zip(back.server.optimizer.tensors(), optimizer_state.tensors()))
    (tmp_path / CHECKPOINT_DIR / "server-state-4.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="server state"):
        read_checkpoint(tmp_path)
    # a checkpoint of a run without server state (or written before there was any) has none
    recorder.checkpoint(checkpoint_state("r1", model, rounds, 1.0), WeightCodec.parts(weights))
    assert run_state(read_checkpoint(tmp_path)).server is None
