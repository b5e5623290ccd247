"""The FedAvg paper's protocol at 100 peers on this machine: does the federation stay live under real training?

    python -m scripts.bench_paper [--peers 100] [--per-process 10] [--rounds 20] [--workers 1] [-- extra peer flags]

McMahan et al. 2017 on Fashion-MNIST: 100 peers of 600 training samples each (iid), 10 trainers a round, 5 local
epochs, batch 10, the paper's CNN (`--model fedavg-cnn`, 1,663,370 parameters), every other peer evaluating every
round's model on its 100 test samples; the peers 10 to a process (`peer.host`), one learning service for the machine.
Measured, from the run's records and events and the processes themselves:

- round 1: from the launch to round 1's training order and to its metrics;
- rounds: `duration_s` of rounds.csv (training order to metrics), median and range;
- terms: the elections of the run (one is the goal) and their reasons;
- disconnects: every `disconnected` event of every peer (a keepalive the peer starved would show here);
- memory: the broker's peak RSS, and the peak PSS of everything else (peers and learning service), sampled every 0.5 s;
- accuracy after each round.

A benchmark, not a test: it prints what it measured and asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from peer.records.events import read_events
from peer.records.run_dir import read_elections, read_rounds
from scripts.bench_floor import pss_kb, tree
from scripts.localnet import LocalNetwork, split_peer_args


def rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def main(argv: list[str] | None = None) -> int:
    own, extra = split_peer_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_paper", description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--per-process", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=1, help="learning jobs the machine runs at once")
    parser.add_argument("--run-dir", help="keep the records here (default: a temporary folder)")
    args = parser.parse_args(own)
    peer_args = [
        "--dataset", "fashion-mnist", "--model", "fedavg-cnn", "--min-peers", str(args.peers),
        "--trainers", "10", "--min-solutions", "10", "--epochs", "5", "--batch-size", "10",
        "--max-rounds", str(args.rounds), "--target-accuracy", "1.0", "--round-deadline", "600", *extra,
    ]  # fmt: skip
    run_dir = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="fl-bench-paper-"))
    print(
        f"bench_paper: {args.peers} peers, {args.per_process} to a process, {args.rounds} rounds; records in "
        f"{run_dir}; load before {__import__('os').getloadavg()[0]:.2f}",
        flush=True,
    )
    net = LocalNetwork(
        run_dir,
        peers=args.peers,
        peer_args=peer_args,
        peers_per_process=args.per_process,
        learning_workers=args.workers,
    )
    launched = time.time()
    peaks = {"broker_rss": 0, "rest_pss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.5):
            broker = net.broker.proc.pid if net.broker and net.broker.proc else None
            if broker:
                peaks["broker_rss"] = max(peaks["broker_rss"], rss_kb(broker))
            roots = [p.pid for p in net.processes()]
            if net.learning and net.learning.proc:
                roots.append(net.learning.proc.pid)
            pids = tree(roots) - ({broker} if broker else set())
            peaks["rest_pss"] = max(peaks["rest_pss"], sum(pss_kb(pid) for pid in pids))

    with net:
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        codes = net.wait(args.rounds * 600 + 600)
        done.set()
        sampler.join()
    wall = time.time() - launched
    rows = read_rounds(run_dir)
    elections = read_elections(run_dir)
    events = read_events(run_dir, kinds={"disconnected", "sent"})
    disconnects = [e for e in events if e["event"] == "disconnected"]
    order1 = min(
        (e["t"] for e in events if e["event"] == "sent" and e.get("kind") == "training" and e.get("round") == 1),
        default=None,
    )
    first = next((r for r in rows if r.round == 1), None)
    durations = [r.duration_s for r in rows if r.round > 0]
    print(f"exit codes: {dict(Counter(codes.values()))}")
    print(
        f"wall {wall:.0f} s; round 1 order {order1 - launched:.1f} s after launch" if order1 else "no round 1 order",
        end="",
    )
    print(f", round 1 done {first.finished_at - launched:.1f} s after launch" if first else "")
    if durations:
        print(
            f"rounds {len(durations)}: median {statistics.median(durations):.1f} s, min {min(durations):.1f}, "
            f"max {max(durations):.1f}"
        )
    print(f"terms: {len(elections)} ({', '.join(f'{e.term}:{e.reason}' for e in elections)})")
    print(f"disconnects: {len(disconnects)} ({dict(Counter(e.get('reason') for e in disconnects))})")
    print(
        f"broker peak RSS {peaks['broker_rss'] / 1024:.0f} MB; peers and learning service peak PSS "
        f"{peaks['rest_pss'] / 1024**2:.2f} GB"
    )
    print("accuracy: " + " ".join(f"{r.round}:{r.accuracy:.3f}" for r in rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
