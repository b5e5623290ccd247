"""End to end at scale: 30 peers, 10 to a process (peer.host), a real mosquitto, Fashion-MNIST. The process hosting
the controller is SIGKILLed after the first round, so ten peers die at once; the others elect one new controller
and finish the run. Asserts: one controller per term, every round exactly once, every surviving peer exits 0, and
every peer's log names only that peer. Ten random peers evaluate each round's model (--evaluators), and every
peer the last one."""

from __future__ import annotations

import re
import signal
import time
from collections import Counter

from peer.records.events import read_events
from scripts.localnet import LocalNetwork
from tests.netutil import (
    SMALL,
    assert_all_exited_zero,
    assert_rounds_complete,
    controller_now,
    elections,
    read_csv,
    rounds,
    run_json,
    statuses,
    wait_until,
)

PEERS, PER_PROCESS, ROUNDS, TRAINERS, EVALUATORS = 30, 10, 3, 10, 10


def test_thirty_peers_ten_to_a_process_survive_the_loss_of_the_controllers_process(tmp_path):
    run_dir = tmp_path / "run"
    flags = [
        *SMALL,
        "--min-peers",
        str(PEERS),
        "--max-rounds",
        str(ROUNDS),
        "--trainers",
        str(TRAINERS),
        "--min-solutions",
        "5",
        "--evaluators",
        str(EVALUATORS),
    ]
    with LocalNetwork(run_dir, PEERS, flags, peers_per_process=PER_PROCESS) as net:
        assert len(net.processes()) == PEERS // PER_PROCESS
        wait_until(lambda: rounds(run_dir), 150, "the first round", net)
        victim = controller_now(run_dir)
        assert victim is not None
        killed = net.host_of(victim)
        assert len(killed) == PER_PROCESS and victim in killed
        killed_at = time.time()
        net.signal(victim, signal.SIGKILL)
        codes = net.wait(150)
    assert {codes[p] for p in killed} == {-signal.SIGKILL}
    assert_all_exited_zero(codes, net, allowed_killed=set(killed))

    # One controller per term; the second term began because its controller was lost, and is led by a survivor.
    terms = elections(run_dir)
    assert sorted(Counter(e["term"] for e in terms).values()) == [1] * len(terms), terms
    assert terms[0]["reason"] == "start" and len(terms[0]["members"].split(";")) == PEERS
    later = [e for e in terms if int(e["term"]) > 1]
    assert later and later[0]["reason"] == "controller-lost" and later[-1]["controller"] not in killed
    # (the reason says how they knew: the broker's Last Will; a bound only against a hang, not a speed test)
    assert float(later[0]["time"]) - killed_at < 60, "the survivors took too long to elect a new controller"

    rows = assert_rounds_complete(run_dir, ROUNDS)
    assert all(len(r["trainers"].split(";")) >= 5 for r in rows)
    assert run_json(run_dir)["outcome"]["final_accuracy"] > run_json(run_dir)["outcome"]["initial_accuracy"]

    # Every surviving peer agrees on the last controller; every log line of a peer is that peer's own.
    survivors = {p: s for p, s in statuses(run_dir).items() if p not in killed}
    assert len(survivors) == PEERS - PER_PROCESS
    assert {s["controller"] for s in survivors.values()} == {later[-1]["controller"]}
    evaluated: dict[int, set[str]] = {}
    for index in range(1, PEERS + 1):
        peer = f"peer-{index}"
        named = set(re.findall(r" peer=(\S+) ", net.peer_log(peer)))
        assert named == {peer}, (peer, named)
        for row in read_csv(run_dir / "peers" / peer / "evaluations.csv"):
            evaluated.setdefault(int(row["round"]), set()).add(peer)
    # Round 1 (whose controller died in round 2, after its metrics) was evaluated by the ten named peers; the last
    # round's model by every surviving peer but the controller.
    assert len(evaluated[1]) == EVALUATORS, evaluated[1]
    assert evaluated[ROUNDS] == set(survivors) - {later[-1]["controller"]}


def fitting(net: LocalNetwork, peers: list[str]) -> bool:
    """One of `peers` is in the middle of a fit (chosen to train, no solution sent yet)."""
    logs = "".join(net.peer_log(p) for p in peers)
    return logs.count("chosen to train") > logs.count("solution sent")


def test_a_host_stopped_by_sigterm_mid_fit_lets_each_of_its_peers_leave_cleanly(tmp_path):
    """SIGTERM (docker stop, up.sh down, Ctrl-C) to a process hosting two peers while one of them fits: each says so
    in its own log, the fit ends, and each leaves the broker cleanly, so the others count it gone at once (no
    keepalive to wait out) and finish the run. (CI saw such a host abort, exit -6: its main thread stopped waiting
    for a peer still in TensorFlow.)"""
    run_dir = tmp_path / "run"
    flags = [
        *SMALL,
        "--min-peers",
        "6",
        "--max-rounds",
        "3",
        "--trainers",
        "4",
        "--keepalive",
        "30",
        "--train-samples",
        "3000",
        "--epochs",
        "2",
    ]  # fits of seconds, to be caught in the middle of
    with LocalNetwork(run_dir, 6, flags, peers_per_process=2) as net:
        wait_until(lambda: rounds(run_dir), 150, "the first round", net)
        controller = controller_now(run_dir)
        hosts = [net.host_of(p) for p in sorted(net.procs) if controller not in net.host_of(p)]
        # The host's first peer: the one its main thread waits for first (and, before the fix, stopped waiting for).
        stopped = wait_until(
            lambda: next((h for h in hosts if fitting(net, h[:1])), None), 60, "a host's first peer fitting", net
        )
        stopped_at = time.time()
        net.signal(stopped[0], signal.SIGTERM)
        codes = net.wait(150)
    assert {codes[p] for p in stopped} == {130}, codes  # as `python -m peer` stopped by a signal; not -6
    assert_all_exited_zero(codes, net, allowed_killed=set(stopped))
    assert_rounds_complete(run_dir, 3)
    for peer in stopped:
        assert "stopped by signal" in net.peer_log(peer), net.peer_log(peer)[-2000:]
    # Counted gone by its goodbye, not by the broker: a keepalive of 30 s would have kept a silent one "alive" for
    # 45 s, which no load makes a goodbye take (the controller's own peer-gone event; its file: `peer` is the one gone).
    gone = [
        e["t"]
        for e in read_events(run_dir, peer=controller)
        if e["event"] == "peer-gone" and e.get("peer") == stopped[0]
    ]
    assert gone, net.peer_log(controller)[-3000:]
    assert gone[0] - stopped_at < 30, (gone[0], stopped_at)
