"""The secure aggregation benchmark on a tiny round: it unmasks the right sum, counts its bytes as documented and
prints its table."""

from __future__ import annotations

import json

import pytest

from scripts.bench_secagg import COLUMNS, format_table, main, payload_bytes, run_once


def test_payload_bytes_add_up_as_documented():
    up, delivered, plain = payload_bytes(3, 10, 1)
    assert up == 96 + 2 * 80 + 40 + 3 * 32
    assert delivered == 3 * 96 + 9 * 128 + 3 * 160 * 3 + 2 * 40 + 2 * 96
    assert plain == 3 * 40


@pytest.mark.parametrize("dropped", [0, 1])
def test_a_small_round_unmasks_within_the_bound(dropped):
    figures = run_once(4, 300, dropped)
    assert figures.threshold == 3 and figures.dropped == dropped
    assert figures.max_error <= figures.error_bound
    assert figures.trainer_s > 0 and figures.controller_s > 0


def test_too_many_dropped_is_refused_in_one_line():
    with pytest.raises(SystemExit, match="fewer than the threshold"):
        run_once(4, 10, 2)


def test_main_prints_the_table_and_writes_json(tmp_path, capsys):
    out = tmp_path / "figures.json"
    assert main(["--trainers", "2,3", "--params", "50", "--dropped", "0", "--json", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["trainers", "model"] and len(table) == 4
    rows = json.loads(out.read_text())
    assert [r["trainers"] for r in rows] == [2, 3] and all(r["params"] == 50 for r in rows)
    assert len(format_table([]).splitlines()) == 2 and COLUMNS[0] == "trainers"


def test_main_refuses_bad_counts(capsys):
    with pytest.raises(SystemExit):
        main(["--trainers", "1"])
    with pytest.raises(SystemExit):
        main(["--params", "ten"])
    assert "bench_secagg" in capsys.readouterr().err
