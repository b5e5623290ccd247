"""Kill the broker too: three bridged brokers (a tree of MQTT v5 bridges, scripts.localnet.bridged_brokers), mutual TLS
only (every peer, bridge and the recorder presents a certificate of the network's CA naming its login), each with the
network's per-peer ACL, six real peers spread over them. The controller's broker is SIGKILLed
mid-round through the users' command; its peers move to the next broker of their list, and the run finishes with
every round once. A recorder (python -m graphs.record, the observer's read-only login) follows the run from the wire
over the same brokers, and its records equal the peers' own."""

from __future__ import annotations

import signal
import subprocess
import sys

from graphs import draw_all
from peer.records.events import read_events
from peer.records.run_dir import read_brokers, read_chaos, read_elections, read_evaluations, read_rounds
from peer.wire.ids import launched_peer_id
from scripts.localnet import LocalNetwork, home_broker
from scripts.up.logins import OBSERVER, make_credentials
from tests.netutil import ROOT, SMALL, assert_all_exited_zero, assert_rounds_complete, rounds, wait_until

PEERS = 6
ROUNDS = 4


def training_order_sent(run_dir, round_: int) -> bool:
    return any(e.get("kind") == "training" and e.get("round") == round_ for e in read_events(run_dir, kinds={"sent"}))


def start_recorder(net: LocalNetwork, recorded) -> subprocess.Popen:
    """python -m graphs.record on every broker at once, as the observer: its certificate names it (no password), over
    TLS. (On one broker it would miss what crosses no bridge while the bridges form again after the kill.)"""
    assert net.certs is not None and net.secret_file is not None
    brokers = ",".join(b.address for b in reversed(net.brokers))
    cmd = [sys.executable, "-m", "graphs.record", "--broker", brokers, "--every-broker", "--run-id", net.run_id,
           "--run-dir", str(recorded), "--secret-file", str(net.secret_file), *net.tls_args(OBSERVER),
           "--timeout", "400"]  # fmt: skip
    return subprocess.Popen(cmd, cwd=ROOT, env=net.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_the_controller_s_broker_killed_mid_round_its_peers_move_on_and_every_round_is_done_once(tmp_path):
    login = make_credentials(tmp_path / "login", [launched_peer_id(k) for k in range(1, PEERS + 1)])
    run_dir, recorded = tmp_path / "run", tmp_path / "recorded"
    peer_args = [*SMALL, "--model", "cnn-small", "--min-peers", str(PEERS), "--max-rounds", str(ROUNDS)]
    net = LocalNetwork(
        run_dir,
        PEERS,
        [*peer_args, "--epochs", "2"],
        brokers=3,
        broker_login=login.broker_login(),  # their password file and ACL; no peer is given a password:
        tls=True,  # under mutual TLS a client's certificate is its login
        mutual_tls=True,
    )
    recorder = None
    try:
        run_dir.mkdir(parents=True)
        net.start_brokers()  # the brokers first, so that the recorder hears the run from its start
        recorder = start_recorder(net, recorded)
        net.start()
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
        said, _ = recorder.communicate(timeout=60)  # it stops at the run's finish
        assert recorder.returncode == 0, said
    finally:
        net.stop()  # whatever happened, no broker, peer or recorder is left behind
        if recorder is not None and recorder.poll() is None:
            recorder.kill()
            recorder.wait()
    assert_all_exited_zero(codes, net)  # the peers killed nothing: every one finished
    assert_rounds_complete(run_dir, ROUNDS)
    assert [(c.action, c.peer, c.signal) for c in read_chaos(run_dir)] == [("kill", victim, "KILL")]
    # The dead broker's peers (the controller among them) moved on to another broker of their list and said so.
    address = next(b["address"] for b in read_brokers(run_dir) if b["name"] == victim)
    homed = [p for p in net.procs if net.brokers[home_broker(p, len(net.brokers))].name == victim]
    assert homed
    for peer in homed:
        links = read_events(run_dir, peer, {"connected", "disconnected"})
        lost = next(i for i, e in enumerate(links) if e["event"] == "disconnected" and e["broker"] == address)
        assert links[lost]["next_broker"] != address
        assert any(e["event"] == "connected" and e["broker"] != address for e in links[lost:]), links

    # One run, one set of records: what the recorder wrote from the wire is what the peers wrote.
    def round_rows(folder):
        return [
            (r.round, r.term, r.controller, r.trainers, r.accuracy, r.loss, r.bytes_sent) for r in read_rounds(folder)
        ]

    assert round_rows(recorded) == round_rows(run_dir)
    elected = [(e.term, e.controller, e.reason, e.members) for e in read_elections(run_dir)]
    assert [(e.term, e.controller, e.reason, e.members) for e in read_elections(recorded)] == elected
    for k in range(1, PEERS + 1):
        peer = launched_peer_id(k)
        own = [(e.round, e.term, e.accuracy, e.loss, e.samples) for e in read_evaluations(run_dir, peer)]
        assert [(e.round, e.term, e.accuracy, e.loss, e.samples) for e in read_evaluations(recorded, peer)] == own
    assert draw_all(recorded)  # and the graphs are drawn from its records alone
    # Mutual TLS: each peer was known to the brokers by its certificate's name (it sent no login), the bridges by theirs.
    logs = "".join(path.read_text() for path in (run_dir / "brokers").glob("*.log"))
    for k in range(1, PEERS + 1):
        assert f"u'peer-{k}'" in logs, logs[-2000:]
    assert "u'bridge'" in logs
