"""Killing brokers on purpose (scripts.chaos, ./up.sh kill broker): the controller's broker found from its events,
or a broker named; a real mosquitto signalled by the pid brokers.json gives; every signal in chaos.csv; status says
each broker's state and who is on it."""

from __future__ import annotations

import os
import time

import pytest

from peer.records.events import EventLog
from peer.records.run_dir import read_chaos, write_brokers, write_json
from scripts import chaos
from scripts.localnet import Broker, broker_name, find_mosquitto

pytestmark = pytest.mark.skipif(find_mosquitto() is None, reason="needs the mosquitto broker")


def status(run_dir, peer: str, role: str, term: int = 1) -> None:
    write_json(run_dir / "peers" / peer / "status.json", {"peer": peer, "pid": os.getpid(), "role": role, "term": term})


def connected(run_dir, peer: str, address: str) -> None:
    log = EventLog(run_dir, peer)
    log.write("connected", term=1, broker=address)
    log.close()


def wait_for(predicate, timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def network(tmp_path):
    brokers = [Broker(name=broker_name(k)).start() for k in (1, 2)]
    write_brokers(tmp_path, [b.record() for b in brokers])
    status(tmp_path, "peer-1", "follower")
    status(tmp_path, "peer-2", "controller")
    connected(tmp_path, "peer-1", brokers[0].address)
    connected(tmp_path, "peer-2", brokers[1].address)
    yield tmp_path, brokers
    for broker in brokers:
        broker.close()


def test_kill_broker_signals_the_controller_s_broker_and_records_it(network):
    run_dir, brokers = network
    lines = chaos.format_status(run_dir).splitlines()
    assert any(line.split()[:3] == ["broker-2", brokers[1].address, "running"] and "peer-2" in line for line in lines)
    name, pid = chaos.kill_broker(run_dir, None, "STOP")
    assert (name, pid) == ("broker-2", brokers[1].proc.pid)
    assert wait_for(
        lambda: any(
            line.startswith("broker-2") and " stopped " in line for line in chaos.format_status(run_dir).splitlines()
        )
    )
    chaos.kill_broker(run_dir, "2", "CONT")
    chaos.kill_broker(run_dir, "broker-2", "KILL")
    assert brokers[1].proc.wait(30) == -9
    assert [(c.action, c.peer, c.signal) for c in read_chaos(run_dir)] == [
        ("stop", "broker-2", "STOP"),
        ("cont", "broker-2", "CONT"),
        ("kill", "broker-2", "KILL"),
    ]
    assert any(line.startswith("broker-2") and " gone " in line for line in chaos.format_status(run_dir).splitlines())
    assert brokers[0].proc.poll() is None  # the other broker is untouched


def test_what_cannot_be_killed_is_said_in_one_line(network, tmp_path_factory):
    run_dir, brokers = network
    with pytest.raises(chaos.ChaosError, match=r"no broker 'broker-9'; this network's brokers: broker-1, broker-2"):
        chaos.kill_broker(run_dir, "broker-9")
    brokers[0].stop()
    with pytest.raises(chaos.ChaosError, match="broker-1 is not running"):
        chaos.kill_broker(run_dir, "1")
    with pytest.raises(chaos.ChaosError, match="no brokers.json"):
        chaos.kill_broker(tmp_path_factory.mktemp("empty"), None)
    # The controller disconnected (its last word): it has no broker to kill right now.
    log = EventLog(run_dir, "peer-2")
    log.write("disconnected", term=1, broker=brokers[1].address, reason="lost", next_broker=brokers[0].address)
    log.close()
    with pytest.raises(chaos.ChaosError, match="controller peer-2 is not connected"):
        chaos.kill_broker(run_dir, None)
