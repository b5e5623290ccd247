"""Failover benchmark: kill the controller at random moments and measure how long training stops.

    python -m scripts.bench_failover [--kills 20] [--peers 5] [-- extra peer flags]

Runs a local network (scripts/localnet.py: real mosquitto, real peers) on small Fashion-MNIST shards with a round
limit it never reaches. Each time, after a random pause, it SIGKILLs the current controller (scripts/chaos.py), and
measures from the run's records (peer.records)
- election: from the kill to the new controller taking office (elections.csv), and
- failover: from the kill to the first training order of the new controller (`started_at` of the first round a
  later term finished, rounds.csv; so each kill waits for that round to finish),
then restarts the killed peer under the same id so the network keeps its size (with `--signal STOP` the controller
hangs instead, is noticed by its missing heartbeats, and gets SIGCONT afterwards). Prints every kill and the median
and max. A benchmark, not a test: it prints figures and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from peer.node.signals import StopSignals
from peer.records.run_dir import RunHistory, load_run, read_rounds
from scripts import chaos
from scripts.localnet import LocalNetwork, split_peer_args

DEFAULT_PEER_ARGS = [
    "--dataset",
    "fashion-mnist",
    "--train-samples",
    "300",
    "--test-samples",
    "100",
    "--max-rounds",
    "100000",
    "--target-accuracy",
    "1.0",
    "--round-deadline",
    "30",
]
MEASURE_TIMEOUT_S = 120  # a new controller's first round: the election, then up to one --round-deadline


@dataclass(frozen=True)
class Failover:
    """One controller kill as the records tell it; a time the records do not hold yet is None."""

    peer: str
    killed_at: float
    term: int | None  # the term the killed peer led
    elected_at: float | None  # the next controller took office (elections.csv)
    resumed_at: float | None  # the next controller's first training order (rounds.csv started_at)

    @property
    def election_s(self) -> float | None:
        return None if self.elected_at is None else self.elected_at - self.killed_at

    @property
    def failover_s(self) -> float | None:
        return None if self.resumed_at is None else self.resumed_at - self.killed_at


def measure(history: RunHistory, peer: str, killed_at: float) -> Failover:
    """What followed the kill of `peer` at `killed_at`: the term it led then (its latest election before the kill,
    else the term in office), the first election of a later term and the first training order of a later term."""
    before = [e for e in history.elections if e.time <= killed_at]
    led = [e.term for e in before if e.controller == peer]
    term = max(led) if led else max((e.term for e in before), default=None)
    if term is None:
        return Failover(peer, killed_at, None, None, None)
    elected = [e.time for e in history.elections if e.term > term]
    orders = [r.started_at for r in history.rounds if r.term > term and r.started_at is not None]
    return Failover(peer, killed_at, term, min(elected, default=None), min(orders, default=None))


def resumed(run_dir: Path, peer: str, killed_at: float) -> Failover | None:
    """The kill's measurement once the records hold the new controller's first training order, else None."""
    failover = measure(load_run(run_dir), peer, killed_at)
    return failover if failover.resumed_at is not None else None


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def main(argv: list[str] | None = None) -> int:
    with StopSignals():  # SIGTERM ends the run like Ctrl-C: the network is stopped on the way out
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv, extra = split_peer_args(argv)
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_failover", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=20, help="controller kills to measure (default 20)")
    parser.add_argument("--peers", type=int, default=5, help="network size (default 5)")
    parser.add_argument(
        "--pause",
        type=float,
        nargs=2,
        default=(1.0, 5.0),
        metavar=("MIN", "MAX"),
        help="random pause before each kill, seconds (default 1 5)",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the random pauses")
    parser.add_argument(
        "--signal",
        choices=("KILL", "STOP"),
        default="KILL",
        type=str.upper,
        help="KILL (the broker sends its Last Will at once) or STOP (a hang: only heartbeats tell)",
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="records folder (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.kills < 1 or args.peers < 3:
        parser.error("need --kills >= 1 and --peers >= 3 (a controller and a trainer must survive each kill)")
    rng = random.Random(args.seed)
    run_dir = args.run_dir or Path(tempfile.mkdtemp(prefix="fl-bench-")) / "run"
    peer_args = [*DEFAULT_PEER_ARGS, "--min-peers", str(args.peers), *extra]
    print(f"bench_failover: {args.peers} peers, {args.kills} kills, records in {run_dir}", flush=True)
    print(f"peer flags: {' '.join(peer_args)}", flush=True)

    failovers, elections = [], []
    with LocalNetwork(run_dir, args.peers, peer_args) as net:
        if not wait_for(lambda: read_rounds(run_dir), 180):
            print("bench_failover: the network never finished a round", file=sys.stderr)
            return 1
        for index in range(1, args.kills + 1):
            time.sleep(rng.uniform(*args.pause))
            victim = wait_for(lambda: chaos.current_controller(chaos.live_statuses(run_dir)), 60)
            if victim is None:
                print("bench_failover: no controller for 60 s", file=sys.stderr)
                return 1
            killed_at = time.time()
            net.signal(victim, chaos.SIGNALS[args.signal])
            chaos.record(run_dir, chaos.ACTIONS[args.signal], victim, args.signal, at=killed_at)
            measured = wait_for(lambda: resumed(run_dir, victim, killed_at), MEASURE_TIMEOUT_S)
            if measured is None:
                print(
                    f"kill {index:>2}: {victim}: no round of a later term within {MEASURE_TIMEOUT_S} s", file=sys.stderr
                )
                return 1
            failovers.append(measured.failover_s)
            if measured.election_s is not None:
                elections.append(measured.election_s)
            election = measured.election_s if measured.election_s is not None else float("nan")
            print(
                f"kill {index:>2}: {victim:<8} election {election:6.2f} s   failover {measured.failover_s:6.2f} s",
                flush=True,
            )
            if args.signal == "STOP":
                net.signal(victim, chaos.SIGNALS["CONT"])
                chaos.record(run_dir, "cont", victim, "CONT")
            else:
                net.procs[victim].wait(10)
                net.start_peer_by_id(victim)  # the same id comes back, on its shard, as a user restarting it would
            # let it rejoin before the next kill, so every kill meets a full network
            wait_for(
                lambda: (
                    chaos.read_statuses(run_dir).get(victim, {}).get("role") == "follower"
                    and chaos.alive(chaos.read_statuses(run_dir)[victim])
                ),
                120,
            )

    print()
    for name, values in (
        ("election (kill -> new controller in office)", elections),
        ("failover (kill -> next training order)", failovers),
    ):
        if values:
            print(
                f"{name}: n={len(values)}  median {statistics.median(values):.2f} s  "
                f"mean {statistics.mean(values):.2f} s  max {max(values):.2f} s  min {min(values):.2f} s"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
