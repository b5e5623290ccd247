"""Kill the broker too: three bridged brokers (a tree of MQTT v5 bridges, scripts.localnet.bridged_brokers), TLS only,
each with the network's logins and per-peer ACL, six real peers spread over them. The controller's broker is SIGKILLed
mid-round through the users' command; its peers move to the next broker of their list, and the run finishes with
every round once."""

from __future__ import annotations

import signal
import subprocess
import sys

from peer.records.events import read_events
from peer.records.run_dir import read_brokers, read_chaos
from peer.wire.ids import launched_peer_id
from scripts.localnet import LocalNetwork
from scripts.up.logins import make_credentials
from tests.netutil import ROOT, SMALL, assert_all_exited_zero, assert_rounds_complete, rounds, wait_until

PEERS = 6
ROUNDS = 4


def training_order_sent(run_dir, round_: int) -> bool:
    return any(e.get("kind") == "training" and e.get("round") == round_ for e in read_events(run_dir, kinds={"sent"}))


def test_the_controller_s_broker_killed_mid_round_its_peers_move_on_and_every_round_is_done_once(tmp_path):
    login = make_credentials(tmp_path / "login", [launched_peer_id(k) for k in range(1, PEERS + 1)])
    run_dir = tmp_path / "run"
    peer_args = [*SMALL, "--model", "cnn-small", "--min-peers", str(PEERS), "--max-rounds", str(ROUNDS)]
    net = LocalNetwork(
        run_dir,
        PEERS,
        [*peer_args, "--epochs", "2"],
        brokers=3,
        broker_login=login.broker_login(),
        login_dir=login.folder,
    )
    with net:
        wait_until(lambda: rounds(run_dir), 240, "round 1 to finish", net)
        wait_until(lambda: training_order_sent(run_dir, 2), 120, "round 2's training order", net, interval=0.02)
        result = subprocess.run(
            [sys.executable, "-m", "scripts.chaos", "--run-dir", str(run_dir), "kill", "broker"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        victim = result.stdout.split()[3]  # "sent SIGKILL to broker-K (pid N)"
        codes = net.wait(300)
        killed = next(b for b in net.brokers if b.name == victim)
        assert killed.proc is not None and killed.proc.wait(10) == -signal.SIGKILL
    assert_all_exited_zero(codes, net)  # the peers killed nothing: every one finished
    assert_rounds_complete(run_dir, ROUNDS)
    assert [(c.action, c.peer, c.signal) for c in read_chaos(run_dir)] == [("kill", victim, "KILL")]
    # The dead broker's peers (the controller among them) moved on to another broker of their list and said so.
    address = next(b["address"] for b in read_brokers(run_dir) if b["name"] == victim)
    homed = [p for p in net.procs if net.brokers[net.home_broker(p)].name == victim]
    assert homed
    for peer in homed:
        links = read_events(run_dir, peer, {"connected", "disconnected"})
        lost = next(i for i, e in enumerate(links) if e["event"] == "disconnected" and e["broker"] == address)
        assert links[lost]["next_broker"] != address
        assert any(e["event"] == "connected" and e["broker"] != address for e in links[lost:]), links
