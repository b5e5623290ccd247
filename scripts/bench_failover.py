"""Failover benchmark: kill the controller (or its broker) at random moments and measure how long training stops.

    python -m scripts.bench_failover [--kills 20] [--peers 5] [-- extra peer flags]
    python -m scripts.bench_failover --target broker [--kills 10] [--peers 6] [--brokers 3]

Runs a local network (scripts/localnet.py: real mosquitto, real peers) on small Fashion-MNIST shards with a round
limit it never reaches. Each time, after a random pause, it SIGKILLs the current controller (scripts/chaos.py), and
measures from the run's records (peer.records)
- election: from the kill to the new controller taking office (elections.csv), and
- failover: from the kill to the first training order of the new controller (`started_at` of the first round a
  later term finished, rounds.csv; so each kill waits for that round to finish),
then restarts the killed peer under the same id so the network keeps its size (with `--signal STOP` the controller
hangs instead, is noticed by its missing heartbeats, and gets SIGCONT afterwards). Prints every kill and the median
and max. A benchmark, not a test: it prints figures and asserts nothing about them.

`--target broker` runs B bridged brokers (scripts.localnet.bridged_brokers, default 3) and 6 peers spread over them
(cnn-small). Each time, after a random pause, it SIGKILLs the broker the controller is connected to (scripts.chaos:
the controller's last `connected` event) and measures, from the peers' events.jsonl, the time from the kill to the
next training order of the run (the first `sent` event of kind training after it: the order the controller sends
again once it is on another broker, or the next round's), and the moves (each peer of the dead broker connected to
another one); then it starts the killed broker again on its port, so every kill meets B brokers. Then the bytes the
brokers delivered to the peers per round with 1 and with B brokers (the peers' `exit` events: `received_bytes`,
every publication delivered, copies included), from a run of SHORT and one of LONG rounds of each, without kills:
(bytes(LONG) - bytes(SHORT)) / (LONG - SHORT), so start-up and finish drop out. A bridge must add no delivery.
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
from peer.records.events import read_events
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
BROKER_PEER_ARGS = [*DEFAULT_PEER_ARGS, "--model", "cnn-small"]  # the default timings, as for controller kills
BYTES_ROUNDS = (1, 4)  # SHORT and LONG: the runs the bytes per round are the difference of


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


@dataclass(frozen=True)
class BrokerKill:
    """One broker kill as the peers' events tell it; a time they do not hold yet is None."""

    broker: str
    address: str
    killed_at: float
    resumed_at: float | None  # the first training order sent after the kill
    moved: dict[str, float]  # each peer that was on the killed broker -> when it connected to another

    @property
    def failover_s(self) -> float | None:
        return None if self.resumed_at is None else self.resumed_at - self.killed_at


def measure_broker_kill(events: list[dict], broker: str, address: str, killed_at: float) -> BrokerKill:
    """What followed the kill of `broker` (at `address`) at `killed_at`, from every peer's events: the first
    training order sent after it, and when each peer connected to it then moved to another broker."""
    orders = [e["t"] for e in events if e["event"] == "sent" and e.get("kind") == "training" and e["t"] > killed_at]
    on_it: dict[str, bool] = {}  # peer -> connected to the broker at the kill
    moved: dict[str, float] = {}
    for e in events:
        if e["event"] not in ("connected", "disconnected"):
            continue
        peer = e["peer"]
        if e["t"] <= killed_at:
            on_it[peer] = e["event"] == "connected" and e.get("broker") == address
        elif on_it.get(peer) and e["event"] == "connected" and e.get("broker") != address and peer not in moved:
            moved[peer] = e["t"]
    return BrokerKill(broker, address, killed_at, min(orders, default=None), moved)


def delivered_bytes(run_dir: Path) -> int:
    """The bytes the brokers delivered to every peer of the run (their `exit` events)."""
    return sum(int(e.get("received_bytes") or 0) for e in read_events(run_dir, kinds={"exit"}))


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    return None


def summarize(*series: tuple[str, list[float]]) -> None:
    """One line per named series of seconds that has any: n, median, mean, max, min."""
    for name, values in series:
        if values:
            print(
                f"{name}: n={len(values)}  median {statistics.median(values):.2f} s  "
                f"mean {statistics.mean(values):.2f} s  max {max(values):.2f} s  min {min(values):.2f} s"
            )


def main(argv: list[str] | None = None) -> int:
    with StopSignals():  # SIGTERM ends the run like Ctrl-C: the network is stopped on the way out
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv, extra = split_peer_args(argv)
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_failover", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--target",
        choices=("controller", "broker"),
        default="controller",
        help="what to kill: the controller (default) or the broker it is connected to",
    )
    parser.add_argument("--kills", type=int, default=None, help="kills to measure (default 20; 10 of brokers)")
    parser.add_argument("--peers", type=int, default=None, help="network size (default 5; 6 with --target broker)")
    parser.add_argument("--brokers", type=int, default=3, help="bridged brokers with --target broker (default 3)")
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
    if args.target == "broker":
        args.kills = 10 if args.kills is None else args.kills
        args.peers = 6 if args.peers is None else args.peers
        if args.kills < 1 or args.peers < 3 or args.brokers < 2 or args.signal != "KILL":
            parser.error("--target broker needs --kills >= 1, --peers >= 3, --brokers >= 2 and --signal KILL")
        return broker_kills(args, extra)
    args.kills = 20 if args.kills is None else args.kills
    args.peers = 5 if args.peers is None else args.peers
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
    summarize(
        ("election (kill -> new controller in office)", elections),
        ("failover (kill -> next training order)", failovers),
    )
    return 0


def broker_kills(args: argparse.Namespace, extra: list[str]) -> int:
    rng = random.Random(args.seed)
    base = Path(args.run_dir) if args.run_dir else Path(tempfile.mkdtemp(prefix="fl-bench-"))
    peer_args = [*BROKER_PEER_ARGS, "--min-peers", str(args.peers), *extra]
    print(
        f"bench_failover: {args.brokers} bridged brokers, {args.peers} peers, {args.kills} broker kills, records in "
        f"{base}",
        flush=True,
    )
    print(f"peer flags: {' '.join(peer_args)}", flush=True)
    run_dir = base / "kills"
    kills: list[BrokerKill] = []
    with LocalNetwork(run_dir, args.peers, peer_args, brokers=args.brokers) as net:
        if not wait_for(lambda: read_rounds(run_dir), 240):
            print("bench_failover: the network never finished a round", file=sys.stderr)
            return 1
        for index in range(1, args.kills + 1):
            time.sleep(rng.uniform(*args.pause))
            chosen = wait_for(lambda: _controller_broker(run_dir), 60)
            if chosen is None:
                print("bench_failover: no controller on a broker for 60 s", file=sys.stderr)
                return 1
            broker = next(b for b in net.brokers if b.name == chosen["name"])
            assert broker.proc is not None
            killed_at = time.time()
            broker.proc.kill()
            chaos.record(run_dir, "kill", broker.name, "KILL", at=killed_at)
            broker.proc.wait(10)

            def resumed(name=broker.name, address=broker.address, at=killed_at) -> BrokerKill | None:
                kill = measure_broker_kill(read_events(run_dir), name, address, at)
                return kill if kill.resumed_at is not None else None

            measured = wait_for(resumed, MEASURE_TIMEOUT_S)
            if measured is None:
                print(
                    f"kill {index:>2}: {broker.name}: no training order within {MEASURE_TIMEOUT_S} s", file=sys.stderr
                )
                return 1
            kills.append(measured)
            moves = sorted(t - killed_at for t in measured.moved.values())
            print(
                f"kill {index:>2}: {broker.name:<9} next training order {measured.failover_s:6.2f} s   "
                f"{len(moves)} peer(s) moved" + (f", the last after {moves[-1]:.2f} s" if moves else ""),
                flush=True,
            )
            broker.start()  # on its port again, with its bridge: every kill meets every broker
            net.record_brokers()
            time.sleep(2)  # (its bridge up: mosquitto's restart_timeout is 1 s)
    failovers = [k.failover_s for k in kills if k.failover_s is not None]
    moves = [t - k.killed_at for k in kills for t in k.moved.values()]
    print()
    summarize(("next training order (broker kill -> order)", failovers), ("peer moved to another broker", moves))
    print()
    short, long = BYTES_ROUNDS
    for brokers in (1, args.brokers):
        totals = []
        for rounds in (short, long):
            folder = base / f"bytes-{brokers}-brokers-{rounds}-rounds"
            limited = [*peer_args, "--max-rounds", str(rounds)]
            with LocalNetwork(folder, args.peers, limited, brokers=brokers) as net:
                codes = net.wait(600)
            if any(code != 0 for code in codes.values()):
                print(f"bench_failover: a run of {brokers} broker(s) failed: {codes}", file=sys.stderr)
                return 1
            totals.append(delivered_bytes(folder))
        per_round = (totals[1] - totals[0]) / (long - short)
        print(
            f"bytes delivered to the peers per round, {brokers} broker(s): {per_round:,.0f} "
            f"({totals[0]:,} in {short} round(s), {totals[1]:,} in {long})",
            flush=True,
        )
    return 0


def _controller_broker(run_dir: Path) -> dict | None:
    try:
        return chaos.choose_broker(run_dir, None)
    except chaos.ChaosError:
        return None


if __name__ == "__main__":
    sys.exit(main())
