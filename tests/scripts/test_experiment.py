"""Tests for `python -m scripts.experiment`: one federation per partition, compared in one graph, CSV and summary.

The end-to-end run is real (mosquitto and peer processes on Fashion-MNIST) but small, and shared by the tests that
inspect its outputs, so the file stays well under a minute and a half.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.experiment import main

ROOT = Path(__file__).resolve().parents[2]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PARTITIONS = ["iid", "skewed"]
ROUNDS = 2
SMALL_PEER_ARGS = ["--min-peers", "3", "--trainers", "2", "--train-samples", "300", "--test-samples", "100"]

needs_federation = pytest.mark.skipif(
    not (shutil.which("mosquitto") or Path("/usr/sbin/mosquitto").exists())
    or not Path("/usr/share/datasets/fashion-mnist").is_dir(),
    reason="needs mosquitto and the Fashion-MNIST IDX files",
)


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.experiment",
            "--out",
            str(out),
            "--partitions",
            ",".join(PARTITIONS),
            "--peers",
            "3",
            "--rounds",
            str(ROUNDS),
            # Bounds against a hang only: runs of seconds take minutes beside a CPU-heavy job on two cores.
            "--timeout",
            "400",
            "--",
            *SMALL_PEER_ARGS,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    return out, proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as stream:
        return list(csv.DictReader(stream))


@needs_federation
def test_every_partition_runs_to_the_end(experiment):
    out, proc = experiment
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for label in PARTITIONS:
        assert (out / label / "run.json").is_file()
        assert (out / label / "rounds.csv").is_file()
    # the table names every partition with its round count
    table = proc.stdout[proc.stdout.index("partition") :]
    for label in PARTITIONS:
        line = next(line for line in table.splitlines() if line.startswith(label + " "))
        assert line.split()[1:3] == ["ok", str(ROUNDS)]


@needs_federation
def test_comparison_png_is_a_real_picture(experiment):
    out, _ = experiment
    head = (out / "comparison.png").read_bytes()[:24]
    assert head[:8] == PNG_SIGNATURE
    assert head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert width >= 400 and height >= 250


@needs_federation
def test_csv_has_every_partition_and_round(experiment):
    out, _ = experiment
    rows = read_csv(out / "comparison.csv")
    assert rows and list(rows[0]) == ["partition", "round", "accuracy"]
    for label in PARTITIONS:
        rounds = sorted(int(row["round"]) for row in rows if row["partition"] == label)
        assert rounds == list(range(ROUNDS + 1)), label
    assert all(0.0 <= float(row["accuracy"]) <= 1.0 for row in rows)


@needs_federation
def test_summary_agrees_with_csv_and_run_records(experiment):
    out, _ = experiment
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] is True
    assert summary["settings"]["dataset"] == "fashion-mnist"
    runs = {run["label"]: run for run in summary["runs"]}
    assert list(runs) == PARTITIONS
    csv_rows = read_csv(out / "comparison.csv")
    for label, run in runs.items():
        assert run["ok"] and run["error"] is None and run["rounds"] == ROUNDS
        assert set(run["exit_codes"].values()) == {0}
        from_csv = [(int(r["round"]), float(r["accuracy"])) for r in csv_rows if r["partition"] == label]
        assert [(p["round"], p["accuracy"]) for p in run["accuracy"]] == from_csv
        outcome = json.loads((out / label / "run.json").read_text())["outcome"]
        assert run["final_accuracy"] == from_csv[-1][1]
        assert math.isclose(run["final_accuracy"], outcome["final_accuracy"], abs_tol=1e-4)  # rounds.csv rounds
        assert math.isclose(run["initial_accuracy"], from_csv[0][1])
        # identical settings apart from the partition, which each peer recorded
        data = json.loads((out / label / "peers" / "peer-1" / "data.json").read_text())
        assert data["partition"] == label and data["seed"] == 42


@needs_federation
def test_a_failed_run_is_reported_and_the_rest_still_run(tmp_path, capsys):
    # far too short for any federation to finish: both runs time out, and the second is still attempted
    code = main(
        [
            "--out",
            str(tmp_path),
            "--partitions",
            "iid,skewed",
            "--peers",
            "3",
            "--rounds",
            "1",
            "--timeout",
            "2",
            "--",
            *SMALL_PEER_ARGS,
        ]
    )
    assert code == 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["ok"] is False
    assert [run["label"] for run in summary["runs"]] == ["iid", "skewed"]
    assert all(not run["ok"] and "timed out" in run["error"] for run in summary["runs"])
    output = capsys.readouterr().out
    assert "FAILED" in output and "timed out" in output
    assert (tmp_path / "comparison.png").is_file()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--partitions", "iid,nonsense"], "unknown partition 'nonsense'"),
        (["--partitions", "iid,,skewed"], "empty item"),
        (["--partitions", "iid:0.3"], "only dirichlet takes a parameter"),
        (["--partitions", "dirichlet:zero"], "is not a number"),
        (["--partitions", "dirichlet:0"], "alpha must be a positive number"),
        (["--partitions", "dirichlet,dirichlet:0.5"], "given twice"),
        (["--peers", "1"], "--peers must be at least 2"),
        (["--rounds", "0"], "--rounds must be at least 1"),
        (["--timeout", "0"], "--timeout must be a positive"),
        (["--peers", "many"], "invalid int value"),
        (["--", "--partition", "skewed"], "use --partitions"),
        (["--", "--max-rounds=3"], "use --rounds"),
        (["--", "--run-dir", "x"], "use --out"),
        (["--", "--epochs", "0"], "epochs"),
        (["--", "--no-such-flag"], "rejected"),
    ],
)
def test_bad_arguments_explain_themselves(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--out", str(out), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists(), "nothing may run or be written when the command line is wrong"


def test_help_exits_zero(capsys):
    assert main(["--help"]) == 0
    assert "--partitions" in capsys.readouterr().out
