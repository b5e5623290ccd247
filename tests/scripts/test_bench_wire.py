"""The wire benchmark's arithmetic and reading, without a broker or peers: $SYS values, the peers' job-done events,
per-round figures, the model's size and the table."""

from __future__ import annotations

import numpy as np
import pytest

from peer.wire.weights import WeightCodec
from scripts.bench_wire import (
    TABLE_COLUMNS,
    JobTimes,
    Result,
    RoundTime,
    SysBroker,
    accuracy_difference,
    accuracy_table,
    config_args,
    count_parameters,
    format_table,
    job_times,
    main,
    parse_sys_value,
    per_round,
    round_times,
    table_row,
)


def done(peer: str, kind: str, round_: int, seconds: float, error: str | None = None) -> dict:
    """A `job-done` event as a peer's node writes it to events.jsonl."""
    return {
        "t": 0.0,
        "peer": peer,
        "event": "job-done",
        "term": 1,
        "kind": kind,
        "round": round_,
        "attempt": 1,
        "seconds": seconds,
        "error": error,
        "samples": 500,
        "loss": 1.0,
    }


EVENTS = [
    done("peer-2", "fit", 1, 2.3),
    done("peer-2", "evaluate", 1, 0.4),
    done("peer-2", "fit", 2, 1.1),
    done("peer-3", "fit", 1, 3.0),
    done("peer-3", "evaluate", 1, 0.7),
    done("peer-3", "evaluate", 0, 0.9),
    done("peer-3", "fit", 2, 9.9, error="RuntimeError: out of memory"),  # a failed fit times nothing
    {"t": 0.0, "peer": "peer-1", "event": "sent", "term": 1, "kind": "training", "round": 3},
    done("peer-4", "evaluate", 3, 0.5),
]


def test_sys_values_are_whole_numbers_under_the_broker_tree():
    assert parse_sys_value("$SYS/broker/publish/bytes/sent", b"20021") == ("publish/bytes/sent", 20021)
    assert parse_sys_value("$SYS/broker/bytes/received", b"0\n") == ("bytes/received", 0)
    assert parse_sys_value("$SYS/broker/load/bytes/sent/1min", b"2182.42") is None  # a load average
    assert parse_sys_value("$SYS/broker/version", b"mosquitto version 2.0.11") is None
    assert parse_sys_value("sd/run/metrics/peer-1", b"12") is None
    assert parse_sys_value("$SYS/broker/bytes/sent", b"\xff\xfe") is None


def test_the_bench_broker_publishes_its_sys_tree_every_second(tmp_path):
    broker = SysBroker(port=1)
    try:
        broker._write_conf()
        lines = broker.conf.read_text().splitlines()
    finally:
        broker.close()
    assert lines.count("sys_interval 1") == 1 and "listener 1 127.0.0.1" in lines


def test_per_round_is_the_growth_between_the_short_and_the_long_run():
    short = {"publish/bytes/received": 1_598_017, "publish/bytes/sent": 7_987_868}
    long = {"publish/bytes/received": 5_689_027, "publish/bytes/sent": 28_441_979}
    growth = per_round(short, long, 1, 4)
    assert growth == {
        "publish/bytes/received": (5_689_027 - 1_598_017) / 3,
        "publish/bytes/sent": (28_441_979 - 7_987_868) / 3,
    }
    with pytest.raises(ValueError):
        per_round(short, long, 4, 4)


def test_fit_and_evaluation_seconds_are_read_per_round_from_every_peer_s_events():
    jobs = job_times(EVENTS)
    assert jobs[1] == JobTimes(fits=[2.3, 3.0], evaluations=[0.4, 0.7])
    assert jobs[2] == JobTimes(fits=[1.1])
    assert jobs[0] == JobTimes(evaluations=[0.9])


def test_the_overhead_is_the_duration_beyond_the_slowest_fit_and_evaluation():
    times = round_times({1: 4.5, 2: 2.0, 3: 1.5}, job_times(EVENTS))
    assert times[0] == RoundTime(1, 4.5, 3.0, 0.7) and times[0].overhead_s == pytest.approx(0.8)
    assert times[1] == RoundTime(2, 2.0, 1.1, None) and times[1].overhead_s == pytest.approx(0.9)  # no evaluation
    assert times[2].slowest_fit_s is None and times[2].overhead_s is None  # no fit


def test_the_parameter_count_comes_from_a_weights_blob_of_float32_or_float16_values():
    tensors = [np.zeros((3, 3, 1, 16)), np.zeros(16), np.zeros(())]
    for dtype in ("float32", "float16"):
        assert count_parameters(WeightCodec.encode(tensors, dtype)) == 144 + 16 + 1
    assert count_parameters(b"\x01\x00\x00\x00\x01\x01\x05\x00\x00\x00" + b"\x00" * 7) is None  # truncated
    assert count_parameters(b"") is None


def result(**changes) -> Result:
    values = dict(
        model="cnn-small",
        dtype="float32",
        peers=5,
        trainers=4,
        model_bytes=226_856,
        published_per_round=1_363_670.0,
        delivered_per_round=6_818_037.0,
        wire_sent_per_round=0.0,
        wire_received_per_round=0.0,
        controller_bytes_per_round=1_363_527,
        s_per_round=1.5449,
        overhead_per_round=0.2449,
        overhead_without_evaluation=False,
        clean=True,
        runs=[],
        rounds=[],
    )
    return Result(**{**values, **changes})


def test_copies_and_the_goal_ratio():
    r = result()
    assert r.goal_copies == 8
    assert r.copies_per_round == pytest.approx(6_818_037 / 226_856)
    assert r.goal_ratio == pytest.approx(6_818_037 / 226_856 / 8)
    assert result(model_bytes=None).goal_ratio is None


def test_a_table_row_marks_an_overhead_without_evaluation_and_an_unclean_run():
    assert table_row(result()) == [
        "cnn-small",
        "float32",
        "226,856",
        "1,363,670",
        "6,818,037",
        "30.05",
        "3.76",
        "1.54",
        "0.24",
    ]
    row = table_row(result(overhead_without_evaluation=True, clean=False, model_bytes=None))
    assert row[0] == "cnn-small (unclean)" and row[2] == "n/a" and row[5] == "n/a" and row[-1] == "0.24*"


def test_the_table_is_markdown_with_figures_aligned_right():
    text = format_table(TABLE_COLUMNS, [table_row(result()), table_row(result(model="seed-cnn", dtype="float16"))])
    lines = text.splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].startswith("| model ") and "| goal ratio |" in lines[0]
    assert lines[1].startswith("|-----------|---------|") and lines[1].endswith(":|")  # text left, figures right
    assert lines[3].startswith("| seed-cnn  | float16 |")


def test_the_accuracy_difference_is_float16_minus_float32_of_the_means():
    assert accuracy_difference({"float32": [0.80, 0.81], "float16": [0.797, None]}) == pytest.approx(-0.008)
    assert accuracy_difference({"float32": [0.80]}) is None
    assert accuracy_difference({"float32": [0.80], "float16": [None]}) is None


def test_the_accuracy_table_gives_every_run_the_mean_and_the_spread():
    lines = accuracy_table({"float32": [0.8258, 0.8300], "float16": [0.8281]}).splitlines()
    assert [cell.strip() for cell in lines[2].split("|")[1:-1]] == ["float32", "0.8258, 0.8300", "0.8279", "0.0042"]
    assert [cell.strip() for cell in lines[3].split("|")[1:-1]] == ["float16", "0.8281", "0.8281", "n/a"]


def test_a_configuration_is_passed_as_flags_or_for_legacy_code_in_the_environment():
    assert config_args("seed-cnn", "float16", legacy=False) == (["--model", "seed-cnn", "--wire-dtype", "float16"], {})
    assert config_args("seed-cnn", "float32", legacy=True) == ([], {"FL_MODEL": "seed-cnn"})


def test_the_command_refuses_what_it_cannot_run(capsys):
    for argv, reason in (
        (["--legacy", "--dtypes", "float16"], "float32 only"),
        (["--models", "resnet"], "choose from"),
        (["--rounds", "4", "1"], "SHORT < LONG"),
        (["--trainers", "5"], "--trainers < --peers"),
    ):
        with pytest.raises(SystemExit) as stop:
            main(argv)
        assert stop.value.code == 2 and reason in capsys.readouterr().err
