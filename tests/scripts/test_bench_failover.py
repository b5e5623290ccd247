"""The failover benchmark's measurement, from records alone: a run dir written with peer.records, no network."""

from __future__ import annotations

from peer.records.events import EventLog, read_events
from peer.records.run_dir import RunRecorder, load_run, record_chaos
from scripts.bench_failover import BrokerKill, Failover, delivered_bytes, measure, measure_broker_kill

T0 = 1_790_000_000.0


def round_row(number: int, term: int, controller: str, started_at: float | None, finished_at: float) -> dict:
    return dict(
        round=number,
        term=term,
        controller=controller,
        trainers=["peer-3"],
        accuracy=0.5,
        loss=1.0,
        duration_s=finished_at - (started_at or finished_at),
        bytes_sent=10,
        finished_at=finished_at,
        started_at=started_at,
    )


def test_a_kill_is_measured_from_elections_and_the_next_terms_first_training_order(tmp_path):
    one, two = RunRecorder(tmp_path, "peer-1"), RunRecorder(tmp_path, "peer-2")
    one.election(1, "peer-1", "start", ["peer-2", "peer-3"], at=T0)
    one.round(**round_row(1, 1, "peer-1", T0 + 1, T0 + 4))
    record_chaos(tmp_path, "kill", "peer-1", "KILL", at=T0 + 5)
    two.election(3, "peer-2", "controller-lost", ["peer-3"], at=T0 + 6.5)  # term 2 produced no controller
    two.round(**round_row(1, 3, "peer-2", None, T0 + 7))  # a re-evaluation: no training order
    two.round(**round_row(2, 3, "peer-2", T0 + 7.25, T0 + 12))
    two.round(**round_row(3, 3, "peer-2", T0 + 12.5, T0 + 15))

    failover = measure(load_run(tmp_path), "peer-1", T0 + 5)
    assert failover == Failover("peer-1", T0 + 5, term=1, elected_at=T0 + 6.5, resumed_at=T0 + 7.25)
    assert (failover.election_s, failover.failover_s) == (1.5, 2.25)


def test_nothing_after_the_kill_yet(tmp_path):
    RunRecorder(tmp_path, "peer-1").election(4, "peer-1", "start", [], at=T0)
    failover = measure(load_run(tmp_path), "peer-1", T0 + 5)
    assert failover.term == 4 and failover.election_s is None and failover.failover_s is None


def test_a_peer_elected_after_the_kill_is_not_taken_for_the_victim(tmp_path):
    RunRecorder(tmp_path, "peer-2").election(1, "peer-2", "start", [], at=T0)
    RunRecorder(tmp_path, "peer-1").election(2, "peer-1", "controller-lost", [], at=T0 + 20)  # came back later
    failover = measure(load_run(tmp_path), "peer-1", T0 + 5)
    assert failover.term == 1 and failover.elected_at == T0 + 20


def events_at(tmp_path, peer: str, *lines: tuple[float, str, dict]) -> None:
    log = EventLog(tmp_path, peer, clock=iter([t for t, _, _ in lines]).__next__)
    for _, name, fields in lines:
        log.write(name, term=1, **fields)
    log.close()


def test_a_broker_kill_is_measured_to_the_next_training_order_and_each_move_of_its_peers(tmp_path):
    a, b = "127.0.0.1:1001", "127.0.0.1:1002"
    events_at(
        tmp_path,
        "peer-1",  # the controller, on the broker killed at T0 + 10
        (T0, "connected", {"broker": a}),
        (T0 + 5, "sent", {"kind": "training", "round": 2}),
        (T0 + 10.01, "disconnected", {"broker": a, "reason": "lost", "next_broker": b}),
        (T0 + 10.4, "connected", {"broker": b}),
        (T0 + 10.5, "sent", {"kind": "training", "round": 2, "attempt": 2}),
        (T0 + 20, "sent", {"kind": "training", "round": 3}),
    )
    events_at(tmp_path, "peer-2", (T0, "connected", {"broker": b}), (T0 + 11, "connected", {"broker": b}))
    events_at(
        tmp_path,
        "peer-3",  # was on the broker, left it before the kill: not one of its peers
        (T0, "connected", {"broker": a}),
        (T0 + 1, "disconnected", {"broker": a, "reason": "x", "next_broker": b}),
        (T0 + 2, "connected", {"broker": b}),
        (T0 + 12, "exit", {"code": 0, "received_messages": 3, "received_bytes": 700}),
    )
    kill = measure_broker_kill(read_events(tmp_path), "broker-1", a, T0 + 10)
    assert kill == BrokerKill("broker-1", a, T0 + 10, resumed_at=T0 + 10.5, moved={"peer-1": T0 + 10.4})
    assert round(kill.failover_s, 6) == 0.5
    assert delivered_bytes(tmp_path) == 700
    nothing_yet = measure_broker_kill(read_events(tmp_path), "broker-1", a, T0 + 30)
    assert nothing_yet.resumed_at is None and nothing_yet.failover_s is None and nothing_yet.moved == {}
