"""End to end, the wire at its leanest: a real mosquitto (its own $SYS counters are the measure) and real peers.

Per round, the broker delivers the fewest model copies that still let every peer evaluate the global model:
N-1 aggregations and T solutions (training orders carry no weights; solutions reach only the controller; nobody gets
its own model back). Here the models also travel as float16, in chunks through a broker whose message limit is
smaller than the model."""
from __future__ import annotations

import re
import subprocess
import time

from scripts.localnet import Broker, LocalNetwork
from tests.netutil import SMALL, assert_all_exited_zero, assert_rounds_complete, log_matches, run_json

PEERS, TRAINERS, ROUNDS = 4, 2, 3
LIMIT = 65536          # the broker's message_size_limit here: a cnn-small model (113 KB as float16) takes 2 chunks


def broker_counter(broker: Broker, name: str) -> int:
    """One of the broker's $SYS counters (published every sys_interval second, retained)."""
    out = subprocess.run(["mosquitto_sub", "-p", str(broker.port), "-t", f"$SYS/broker/{name}", "-C", "1", "-W", "5"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[0])


def model_bytes(net: LocalNetwork, dtype_bytes: int) -> int:
    """The weights' bytes on the wire, from the parameter count every peer logs as it starts."""
    [match] = log_matches(net, "peer-1", r"model .*?([\d,]+) parameters")[:1]
    return int(match[1].replace(",", "")) * dtype_bytes


def test_each_round_delivers_n_minus_1_plus_t_model_copies_as_float16_chunks(tmp_path):
    run_dir = tmp_path / "run"
    broker = Broker(log_path=tmp_path / "broker.log", settings={"sys_interval": "1", "message_size_limit": str(LIMIT)})
    with broker:
        before = broker_counter(broker, "publish/bytes/sent")
        args = [*SMALL, "--train-samples", "300", "--test-samples", "100", "--min-peers", str(PEERS),
                "--trainers", str(TRAINERS), "--min-solutions", str(TRAINERS), "--max-rounds", str(ROUNDS),
                "--wire-dtype", "float16", "--max-message-bytes", str(LIMIT)]
        with LocalNetwork(run_dir, PEERS, args, broker=broker) as net:
            codes = net.wait(240)
            assert_all_exited_zero(codes, net)
        time.sleep(1.5)    # the next $SYS publication counts everything up to the last peer's exit
        delivered = broker_counter(broker, "publish/bytes/sent") - before
    rows = assert_rounds_complete(run_dir, ROUNDS)
    outcome = run_json(run_dir)["outcome"]
    assert outcome["final_accuracy"] > outcome["initial_accuracy"] + 0.1, outcome

    model = model_bytes(net, 2)
    # round 0 (the initial model, evaluated by everyone) and each round: N-1 aggregations; each round: T solutions.
    copies = (PEERS - 1) * (ROUNDS + 1) + TRAINERS * ROUNDS
    print(f"delivered {delivered} bytes = {delivered / model:.2f} model copies of {model} bytes; goal {copies}")
    control = 400_000     # votes, claims, heartbeats, inits, evaluations, metrics, envelopes: a few hundred KB here
    assert delivered <= 1.1 * copies * model + control, (delivered, copies, model, delivered / model)
    assert delivered >= copies * model                # (the count cannot be too low either: every copy arrived)
    # The models went in chunks (the broker would have refused them whole), and nobody dropped one.
    for peer in net.procs:
        assert not log_matches(net, peer, r"chunks missing|digest mismatch|dropped a malformed"), peer
    assert "exceeds" not in (tmp_path / "broker.log").read_text().lower()
    # The controller counts what it publishes: each round about (T + 1) models, all float16.
    for row in rows:
        assert (TRAINERS + 1) * model <= int(row["bytes_sent"]) <= 1.2 * (TRAINERS + 1) * model + 50_000, row
