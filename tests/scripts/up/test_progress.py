"""The launcher's progress lines and verdict: peers killed on purpose (with those sharing their container) are no
failure, and peers that exit alike are one line."""

from __future__ import annotations

from peer.records.events import EventLog, record_exit
from scripts import chaos
from scripts.up import progress
from tests.scripts.up.test_compose import make_network


def test_a_kill_counts_for_every_peer_of_the_killed_container(tmp_path, capsys):
    net = make_network(tmp_path, peers=[f"peer-{k}" for k in range(1, 7)], total=6, per_process=3)
    net.run_dir.mkdir()
    chaos.record(net.run_dir, "kill", "peer-2", "KILL")
    assert net.killed_on_purpose() == {"peer-1", "peer-2", "peer-3"}
    codes = {"peer-1": 137, "peer-2": 137, "peer-3": 137, "peer-4": 0, "peer-5": 1, "peer-6": None}
    assert progress.verdict(codes, net.killed_on_purpose()) == {"peer-5": 1, "peer-6": None}
    assert make_network(tmp_path, peers=["peer-1", "peer-2", "peer-3"]).killed_on_purpose() == {"peer-2"}
    # The launcher's progress says it once for the three, and apart for a peer that exited otherwise.
    lines = progress.Progress(net, 0)
    lines.update(
        {
            "peer-1": "exited 137",
            "peer-2": "exited 137",
            "peer-3": "exited 137",
            "peer-4": "running",
            "peer-5": "exited 1",
        }
    )
    lines.update({"peer-1": "exited 137", "peer-4": "exited 0"})
    said = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if " exited " in line]
    assert said == ["peer-1..peer-3 exited 137 (killed on purpose)", "peer-5 exited 1", "peer-4 exited 0"]
    assert (
        progress.spans(["peer-10", "peer-2", "peer-1", "peer-3", "peer-4", "peer-7", "peer-8"])
        == "peer-1..peer-4, peer-7, peer-8, peer-10"
    )
    assert progress.spans(["peer-1", "x"]) == "peer-1, x"


def write(run_dir, peer: str, at: float, event: str, **fields) -> None:
    EventLog(run_dir, peer, clock=lambda: at).write(event, **fields)


def said(capsys) -> list[str]:
    return [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines()]


def test_the_progress_lines_come_from_the_peers_events_of_this_run(tmp_path, capsys):
    net = make_network(tmp_path, peers=["peer-1", "peer-2", "peer-3"], max_rounds=2)
    write(net.run_dir, "peer-1", 50.0, "start", term=0)  # an earlier run's, in the same run dir
    write(net.run_dir, "peer-1", 50.5, "round", term=1, round=1, accuracy=0.1, duration_s=1.0, finished_at=50.5)
    lines = progress.Progress(net, 100.0)
    for peer, at in (("peer-1", 101.0), ("peer-2", 101.5)):
        write(net.run_dir, peer, at, "start", term=0)
    lines.update()
    write(net.run_dir, "peer-3", 102.0, "start", term=0)
    write(net.run_dir, "peer-2", 103.0, "office", term=1, reason="start", members=["peer-1", "peer-2", "peer-3"])
    row = dict(round=1, controller="peer-2", accuracy=0.81234, duration_s=2.25, finished_at=105.0)
    write(net.run_dir, "peer-2", 105.0, "round", term=1, **row)
    write(net.run_dir, "peer-2", 105.1, "round", term=1, **row)  # the same row again: said once
    lines.update()
    outcome = dict(reason="max-rounds", rounds=2, final_accuracy=0.9, terms=1)
    write(net.run_dir, "peer-2", 108.0, "finish", term=1, **outcome)
    lines.update()
    lines.update()
    text = said(capsys)
    assert text[:3] == ["peers joined 2/3", "peers joined 3/3", "term 1: peer-2 is controller (start)"]
    assert text[3].startswith("round 1/2: accuracy 0.8123 (2.2 s; ")
    assert text[4].startswith("finished (max-rounds): 2 rounds, final accuracy 0.9000, 1 term(s), ")
    assert len(text) == 5


def test_the_end_report_says_each_failed_peer_s_reason_once_for_the_peers_that_failed_alike(tmp_path, capsys):
    reason = "dataset 'mnist': not in the Keras cache.\nHow to get it: MNIST: ..."
    for peer in ("peer-1", "peer-2", "peer-3"):
        record_exit(tmp_path, peer, 2, reason)
    # a peer that could not even record its exit (its run dir unwritable): the error line of its log
    log = tmp_path / "peers" / "peer-4" / "peer.log"
    log.parent.mkdir(parents=True)
    log.write_text("usage: python -m peer [-h] ...\npython -m peer: error: the run dir /x is not writable\n")
    # a peer killed before it said anything: its last lines
    (tmp_path / "peers" / "peer-5").mkdir()
    (tmp_path / "peers" / "peer-5" / "peer.log").write_text("one\ntwo\n")
    failed = {"peer-1": 2, "peer-2": 2, "peer-3": 2, "peer-4": 2, "peer-5": -9}
    progress.report_end(tmp_path, failed, interrupted=False)
    out = capsys.readouterr().out
    assert ": peer-1..peer-3 failed (exit 2): dataset 'mnist': not in the Keras cache.\n" in out
    assert "\n    How to get it: MNIST: ...\n" in out and out.count("How to get it") == 1
    assert "peer-4 failed (exit 2): the run dir /x is not writable" in out
    assert "peer-5 failed (exit -9); its last lines:\n    one\n    two" in out
    assert "no round finished" in out
