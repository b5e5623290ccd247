"""EventTail: following a run's events.jsonl files as they grow, each event once, a line being written only once
it is whole, a peer's file that appears later included."""

from __future__ import annotations

from peer.records.events import EventLog, EventTail


def test_each_event_once_in_order_of_time_and_a_half_written_line_when_it_is_whole(tmp_path):
    tail = EventTail(tmp_path, kinds={"start", "round"})
    assert tail.new() == []
    EventLog(tmp_path, "peer-2", clock=lambda: 2.0).write("start", term=0)
    EventLog(tmp_path, "peer-1", clock=lambda: 1.0).write("start", term=0)
    EventLog(tmp_path, "peer-1", clock=lambda: 1.5).write("vote", term=1)  # not asked for
    assert [(e["peer"], e["t"]) for e in tail.new()] == [("peer-1", 1.0), ("peer-2", 2.0)]
    assert tail.new() == []
    path = tmp_path / "peers" / "peer-1" / "events.jsonl"
    with path.open("a") as out:
        out.write('{"t": 3.0, "peer": "peer-1", "event": "round", "round": 1')  # the writer is mid-line
    assert tail.new() == []
    with path.open("a") as out:
        out.write(', "term": 1}\n')
    assert [e["round"] for e in tail.new()] == [1]
    EventLog(tmp_path, "peer-3", clock=lambda: 4.0).write("start", term=0)  # a peer that joins later
    assert [e["peer"] for e in tail.new()] == ["peer-3"]


def test_a_torn_line_is_skipped_and_a_file_written_anew_is_read_from_its_start(tmp_path):
    tail = EventTail(tmp_path)
    path = tmp_path / "peers" / "peer-1" / "events.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text('{"t": 1.0, "peer": "peer-1", "event": "sta')  # killed mid-line...
    EventLog(tmp_path, "peer-1", clock=lambda: 2.0).write("start", term=0)  # ...and started again
    assert [e["t"] for e in tail.new()] == []  # the torn start and the new line are one line: it does not parse
    EventLog(tmp_path, "peer-1", clock=lambda: 3.0).write("exit", term=0, code=0)
    assert [e["event"] for e in tail.new()] == ["exit"]
    path.write_text('{"t": 9.0, "peer": "peer-1", "event": "start"}\n')  # the run dir used again
    assert [e["t"] for e in tail.new()] == [9.0]
