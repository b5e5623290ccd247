"""Tests for `python -m graphs`: the pictures of a recorded run, and what survives a partial or damaged run dir."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from graphs import draw_all, plot_comparison
from graphs.__main__ import main
from peer.records.run_dir import global_series, load_run

ROOT = Path(__file__).resolve().parents[2]
SAMPLE_RUN = Path(__file__).resolve().parents[1] / "fixtures" / "run_sample"
PEERS = [f"peer-{n}" for n in range(1, 6)]
RUN_WIDE_FILES = [
    "accuracy_all_peers.png",
    "global_accuracy_loss.png",
    "round_durations.png",
    "election_timeline.png",
    "class_distribution.png",
]
EVERY_FILE = sorted([f"accuracy_peer_{peer}.png" for peer in PEERS] + RUN_WIDE_FILES)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVALUATIONS_HEADER = "round,term,accuracy,loss,samples,time\n"
ROUNDS_HEADER = "round,term,controller,trainers,accuracy,loss,duration_s,bytes_sent,finished_at\n"


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG spec requires to come first."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE, f"{path.name} is not a PNG"
    assert head[12:16] == b"IHDR", f"{path.name} does not start with IHDR"
    return struct.unpack(">II", head[16:24])


def assert_sensible_png(path: Path) -> None:
    width, height = png_size(path)
    assert width >= 400 and height >= 250, f"{path.name} is {width}x{height}"
    assert path.stat().st_size > 5_000, f"{path.name} is only {path.stat().st_size} bytes"


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(SAMPLE_RUN, copy)
    return copy


def written_names(stdout: str) -> list[str]:
    return sorted(Path(line).name for line in stdout.splitlines() if line.strip())


def test_cli_draws_every_promised_file_from_a_full_run(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert written_names(out) == EVERY_FILE
    graphs_dir = run_dir / "graphs"
    assert sorted(p.name for p in graphs_dir.iterdir()) == EVERY_FILE
    for path in graphs_dir.iterdir():
        assert_sensible_png(path)
    assert sorted(p.name for p in graphs_dir.glob("accuracy_peer_*.png")) == [f"accuracy_peer_{p}.png" for p in PEERS]


def test_module_runs_as_a_subprocess_with_out_dir(run_dir: Path, tmp_path: Path) -> None:
    out_dir = tmp_path / "pictures"
    result = subprocess.run(
        [sys.executable, "-m", "graphs", str(run_dir), "--out", str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert written_names(result.stdout) == EVERY_FILE
    assert all(Path(line).parent == out_dir for line in result.stdout.splitlines())
    assert not (run_dir / "graphs").exists()


def test_draw_all_defaults_to_graphs_dir_and_returns_paths(run_dir: Path) -> None:
    messages: list[str] = []
    written = draw_all(run_dir, notify=messages.append)
    assert sorted(p.name for p in written) == EVERY_FILE
    assert all(p.parent == run_dir / "graphs" and p.is_file() for p in written)
    assert messages == []


def test_partial_run_with_rounds_and_one_peer_draws_what_it_can(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    partial = tmp_path / "partial"
    (partial / "peers" / "peer-2").mkdir(parents=True)
    shutil.copy(SAMPLE_RUN / "rounds.csv", partial / "rounds.csv")
    shutil.copy(SAMPLE_RUN / "peers" / "peer-2" / "evaluations.csv", partial / "peers" / "peer-2")
    assert main([str(partial)]) == 0
    captured = capsys.readouterr()
    assert written_names(captured.out) == sorted(
        ["accuracy_peer_peer-2.png", "accuracy_all_peers.png", "global_accuracy_loss.png", "round_durations.png"]
    )
    for line in captured.out.splitlines():
        assert_sensible_png(Path(line))
    # round 0 is not drawn as global: one peer's score of the initial model is not the federation's
    assert [p.round for p in global_series(load_run(partial))] == [1, 2, 3, 4]
    skipped = [line for line in captured.err.splitlines() if line.startswith("skipped")]
    assert len(skipped) == 2
    assert any("election_timeline.png" in line and "elections.csv" in line for line in skipped)
    assert any("class_distribution.png" in line and "data.json" in line for line in skipped)


def test_run_killed_mid_write_skips_the_torn_pieces(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "run.json").unlink()
    with (run_dir / "rounds.csv").open("a") as rounds:
        rounds.write("5,2,peer-5,peer-1;peer-2;peer-4;peer-5,0.92")
    data = run_dir / "peers" / "peer-4" / "data.json"
    data.write_text(data.read_text()[:40])
    assert main([str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert written_names(captured.out) == EVERY_FILE
    assert "rounds.csv:6: skipped malformed row" in captured.err
    assert "peer-4" in captured.err and "not valid JSON" in captured.err
    assert "Traceback" not in captured.err


@pytest.mark.parametrize("make_dir", [False, True], ids=["missing", "empty"])
def test_missing_or_empty_run_dir_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], make_dir: bool
) -> None:
    target = tmp_path / "run"
    if make_dir:
        (target / "peers" / "peer-1").mkdir(parents=True)
    assert main([str(target)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(target) in lines[0]
    assert ("no records" if make_dir else "does not exist") in lines[0]


def test_malformed_rows_are_skipped_with_a_warning(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "rounds.csv").write_text(
        ROUNDS_HEADER
        + "1,1,peer-3,peer-1;peer-2,0.73,0.92,13.9,1000,1790003617.0\n"
        + "2,1,peer-3,peer-1;peer-2,not-a-number,0.50,12.7,1000,1790003630.0\n"
        + "\n"
        + "3,1,peer-3\n"
        + "4,2,peer-5,peer-1;peer-2,0.91,0.27,15.8,1000,1790003661.0,extra\n"
        + "5,2,,peer-1,0.92,0.26,15.0,1000,1790003675.0\n"
        + "-1,2,peer-5,peer-1,0.92,0.26,15.0,1000,1790003675.0\n"
        + "6,2,peer-5,peer-1;peer-2,0.93,0.25,14.1,1000,1790003690.0\n"
    )
    with (run_dir / "peers" / "peer-1" / "evaluations.csv").open("a") as evaluations:
        evaluations.write("7,two,0.5,0.5,100,1790003700.0\n")
    records = load_run(run_dir)
    assert [r.round for r in records.rounds] == [1, 6]
    assert [e.round for e in records.peers["peer-1"].evaluations] == [0, 1, 2, 3, 4]
    rounds_warnings = [w for w in records.warnings if "rounds.csv" in w]
    assert [w.split(":")[1] for w in rounds_warnings] == ["3", "5", "6", "7", "8"]
    assert any("peer-1" in w and "evaluations.csv:8" in w for w in records.warnings)

    assert main([str(run_dir)]) == 0
    captured = capsys.readouterr()
    assert written_names(captured.out) == EVERY_FILE
    assert sum(line.startswith("warning:") for line in captured.err.splitlines()) == 6


def test_csv_with_a_foreign_header_is_skipped_whole(run_dir: Path) -> None:
    (run_dir / "elections.csv").write_text("when,who\n1790003600.0,peer-3\n")
    records = load_run(run_dir)
    assert records.elections == []
    assert any("elections.csv" in w and "header lacks" in w for w in records.warnings)


def test_later_evaluation_of_a_round_counts(tmp_path: Path) -> None:
    peer_dir = tmp_path / "peers" / "peer-1"
    peer_dir.mkdir(parents=True)
    (peer_dir / "evaluations.csv").write_text(
        EVALUATIONS_HEADER + "0,1,0.10,2.30,100,10.0\n3,1,0.80,0.60,100,20.0\n3,2,0.82,0.55,100,30.0\n"
    )
    evaluations = load_run(tmp_path).peers["peer-1"].evaluations
    assert [(e.round, e.term, e.accuracy) for e in evaluations] == [(0, 1, 0.10), (3, 2, 0.82)]


def test_sample_run_reads_as_recorded() -> None:
    records = load_run(SAMPLE_RUN)
    assert records.warnings == []
    assert list(records.peers) == PEERS
    assert [(r.round, r.term, r.controller) for r in records.rounds] == [
        (1, 1, "peer-3"),
        (2, 1, "peer-3"),
        (3, 2, "peer-5"),
        (4, 2, "peer-5"),
    ]
    assert [(e.term, e.controller, e.reason) for e in records.elections] == [
        (1, "peer-3", "start"),
        (2, "peer-5", "controller-lost"),
    ]
    assert [(c.action, c.peer) for c in records.chaos][0] == ("kill", "peer-3")
    assert records.summary is not None and records.summary.target_accuracy == 0.95
    assert records.peers["peer-3"].evaluations[-1].round == 3
    assert all(len(p.data.train_classes) == 10 for p in records.peers.values() if p.data)


def test_global_series_takes_round_zero_from_run_json(run_dir: Path) -> None:
    records = load_run(run_dir)
    points = global_series(records)
    assert [p.round for p in points] == [0, 1, 2, 3, 4]
    assert points[0].accuracy == records.summary.initial_accuracy
    assert points[0].loss is not None and not any(p.estimated for p in points)
    assert [p.accuracy for p in points[1:]] == [r.accuracy for r in records.rounds]


def test_global_series_rebuilds_rounds_from_complete_peer_evaluations(run_dir: Path) -> None:
    recorded = {r.round: r.accuracy for r in load_run(run_dir).rounds}
    (run_dir / "rounds.csv").unlink()
    (run_dir / "run.json").unlink()
    points = global_series(load_run(run_dir))
    assert [p.round for p in points] == [0, 1, 2, 3, 4] and all(p.estimated for p in points)
    for point in points[1:]:
        assert point.accuracy == pytest.approx(recorded[point.round], abs=1e-4)

    # without peer-1's evaluations no round has every member on record, so none is passed off as global
    shutil.rmtree(run_dir / "peers" / "peer-1")
    assert global_series(load_run(run_dir)) == []


def test_plot_comparison_writes_a_valid_png(tmp_path: Path) -> None:
    path = plot_comparison(
        {
            "iid": [(0, 0.10), (1, 0.85), (2, 0.93), (3, 0.95)],
            "dirichlet 0.5": [(0, 0.10), (2, 0.86), (1, 0.74), (3, 0.91)],
            "shards 2": [(0, 0.09), (1, 0.55), (2, 0.72), (3, 0.80)],
        },
        tmp_path / "compare" / "partitions.png",
        "Global accuracy by partition",
    )
    assert path == tmp_path / "compare" / "partitions.png"
    assert_sensible_png(path)
    assert_sensible_png(plot_comparison({}, tmp_path / "empty.png", "Nothing yet"))


# --- strategies: labels and the comparison of several runs ----------------------------------------------------------


def test_a_strategy_label_says_how_a_run_trained() -> None:
    from graphs import strategy_label

    assert strategy_label({}) == "FedAvg"
    assert strategy_label({"aggregation": "fedavg", "server_optimizer": "sgd", "server_lr": 1.0}) == "FedAvg"
    assert strategy_label({"server_optimizer": "adam", "server_lr": 0.01}) == "FedAdam lr 0.01"
    assert strategy_label({"server_optimizer": "yogi", "server_lr": 0.1, "proximal_mu": 0.5}) == (
        "FedProx mu 0.5 + FedYogi lr 0.1"
    )
    assert (
        strategy_label(
            {"aggregation": "median", "server_optimizer": "momentum", "server_lr": 1.0, "server_momentum": 0.9}
        )
        == "median + FedAvgM lr 1 m 0.9"
    )
    assert strategy_label({"dp_clip": 1.0, "dp_noise_multiplier": 1.1, "dp_delta": 1e-5}, 3.21) == (
        "DP-FedAvg (central DP C 1 z 1.1, eps 3.21 at delta 1e-05)"
    )
    assert strategy_label({"dp_clip": 2, "dp_noise_multiplier": 0.5, "dp_local": True}).endswith("(local DP C 2 z 0.5)")


def test_cli_compares_several_runs_on_one_plot(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from graphs import COMPARISON, draw_comparison

    runs = []
    for name, extra in (
        ("fedavg", {}),
        ("fedadam", {"server_optimizer": "adam", "server_lr": 0.01}),
        ("dp", {"dp_clip": 1.0, "dp_noise_multiplier": 1.0, "dp_delta": 1e-5}),
    ):
        copy = tmp_path / name
        shutil.copytree(SAMPLE_RUN, copy)
        summary = json.loads((copy / "run.json").read_text())
        summary["settings"] |= extra
        (copy / "run.json").write_text(json.dumps(summary))
        runs.append(copy)
    assert main([*map(str, runs), "--out", str(tmp_path / "out")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "out" / COMPARISON)
    assert_sensible_png(tmp_path / "out" / COMPARISON)
    # a run dir that does not exist is said in one line; runs with nothing drawable are an error too
    assert main([str(runs[0]), str(tmp_path / "gone")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty-a").mkdir()
    (tmp_path / "empty-b").mkdir()
    with pytest.raises(Exception, match="finished round"):
        draw_comparison([tmp_path / "empty-a", tmp_path / "empty-b"], tmp_path / "x.png")


def test_a_dp_runs_global_graph_draws_the_privacy_spent(run_dir: Path) -> None:
    from graphs import GLOBAL_ACCURACY_LOSS
    from graphs.draw import draw_global_accuracy_loss

    rows = (run_dir / "rounds.csv").read_text().splitlines()
    (run_dir / "rounds.csv").write_text(
        "\n".join([rows[0] + ",started_at,epsilon"] + [f"{row},,{1.5 * n}" for n, row in enumerate(rows[1:], 1)]) + "\n"
    )
    history = load_run(run_dir)
    assert [r.epsilon for r in history.rounds] == [1.5 * n for n in range(1, len(rows))] and not history.warnings
    path = draw_global_accuracy_loss(history, run_dir / "out")
    assert path.name == GLOBAL_ACCURACY_LOSS
    assert_sensible_png(path)
