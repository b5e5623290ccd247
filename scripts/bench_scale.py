"""Scale benchmark: the same federation at N = 5, 20, 50, 100 peers on this machine, over the real broker.

    python -m scripts.bench_scale [--sizes 5 20 50 100] [--processes 4] [--out bench_scale.png] [-- extra peer flags]

Each size is one run (scripts/localnet.py, real mosquitto, the peers K to a process with K = N / --processes rounded
up, so a size always has the same number of TensorFlow runtimes): Fashion-MNIST, 500 training samples a peer, 10
trainers and 10 evaluators a round, 10 rounds. After round 3 the process hosting the controller is SIGKILLed (its K
peers die at once) and the run goes on with the others to round 10. Measured, from the run's records:

- s/round: median `duration_s` of rounds.csv (training order to metrics);
- overhead: median of (round duration - the slowest fit of its trainers, as each trainer's `job-done` event gives
  it, queueing for its process's model included): the messaging, aggregation and evaluation part of a round;
- election: the first election, from the first vote to the controller taking office; `all know`: to the last peer
  following it;
- failover: from the SIGKILL to the next training order of a new term (the new controller's `sent` event);
- PSS: the largest sum, sampled each second, of the peer processes' proportional set size (the broker's apart);
- broker CPU: the broker's user + system CPU seconds over the run, and as a share of one core.

Everything timed comes from the run's typed records (rounds.csv, and each peer's events.jsonl: `vote`, `office`,
`follow`, `sent`, `job-done`), never from log lines. Prints one table and draws a PNG. A benchmark, not a test: it
prints what it measured and asserts nothing.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from peer.node.signals import StopSignals
from peer.records.events import read_events
from peer.records.run_dir import read_elections, read_rounds
from scripts import chaos
from scripts.localnet import LocalNetwork, split_peer_args

PEER_ARGS = [
    "--dataset",
    "fashion-mnist",
    "--train-samples",
    "500",
    "--max-rounds",
    "10",
    "--trainers",
    "10",
    "--evaluators",
    "10",
    "--target-accuracy",
    "1.0",
    "--round-deadline",
    "60",
]
KILL_AFTER_ROUND = 3


@dataclass
class Result:
    peers: int
    processes: int
    rounds: int
    round_s: float | None
    overhead_s: float | None
    election_s: float | None
    all_know_s: float | None
    failover_s: float | None
    killed: int
    pss_mb: float
    broker_pss_mb: float
    broker_cpu_s: float
    wall_s: float
    one_controller_per_term: bool

    @property
    def broker_share(self) -> float:
        return self.broker_cpu_s / self.wall_s if self.wall_s else math.nan


def _pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cpu_s(pid: int) -> float:
    import os

    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


class Sampler(threading.Thread):
    """The largest PSS of the peers' processes and of the broker, sampled every second."""

    def __init__(self, net: LocalNetwork):
        super().__init__(daemon=True)
        self.net, self.peers_kb, self.broker_kb = net, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(1.0):
            pids = [p.pid for p in self.net.processes() if p.poll() is None]
            self.peers_kb = max(self.peers_kb, sum(_pss_kb(pid) for pid in pids))
            self.broker_kb = max(self.broker_kb, _pss_kb(self.net.broker.proc.pid))


def measure(run_dir: Path, killed_at: float | None, killed_term: int | None):
    """From the peers' events (events.jsonl): the first election (first vote of term 1 to the controller taking
    office), when the last peer knew its controller, the failover (the kill to the first training order of a later
    term) and every fit's seconds, per (peer, term, round)."""
    events = read_events(run_dir, kinds={"vote", "office", "follow", "sent", "job-done"})
    votes = [e["t"] for e in events if e["event"] == "vote" and e.get("term") == 1]
    office = [e["t"] for e in events if e["event"] == "office" and e.get("term") == 1]
    known = [e["t"] for e in events if e["event"] == "follow" and e.get("term") == 1]
    election = min(office) - min(votes) if votes and office else None
    all_know = max(known) - min(votes) if votes and known else None
    failover = None
    if killed_at is not None and killed_term is not None:
        orders = [
            e["t"]
            for e in events
            if e["event"] == "sent" and e.get("kind") == "training" and e.get("term", 0) > killed_term
            if e["t"] >= killed_at
        ]
        failover = min(orders) - killed_at if orders else None
    fits: dict[tuple[str, int, int], float] = {}
    for e in events:
        if e["event"] == "job-done" and e.get("kind") == "fit" and not e.get("error"):
            key = (e["peer"], e.get("term", 0), e.get("round", 0))
            fits[key] = max(fits.get(key, 0.0), float(e.get("seconds", 0.0)))
    return election, all_know, failover, fits


def run_size(n: int, processes: int, run_dir: Path, extra: list[str], timeout: float) -> Result:
    per_process = max(1, math.ceil(n / processes))
    flags = [*PEER_ARGS, "--min-peers", str(n), *extra]
    started = time.time()
    killed: list[str] = []
    killed_at = killed_term = None
    with LocalNetwork(run_dir, n, flags, peers_per_process=per_process) as net:
        broker_pid = net.broker.proc.pid
        cpu_before = _cpu_s(broker_pid)
        sampler = Sampler(net)
        sampler.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(read_rounds(run_dir)) < KILL_AFTER_ROUND:
            if not net.running():
                break
            time.sleep(0.2)
        statuses = chaos.live_statuses(run_dir)
        victim = chaos.current_controller(statuses)
        if victim is not None and len(read_rounds(run_dir)) >= KILL_AFTER_ROUND:
            killed, killed_term = net.host_of(victim), statuses[victim]["term"]
            killed_at = time.time()
            net.signal(victim, signal.SIGKILL)
            chaos.record(run_dir, "kill", victim, "KILL", at=killed_at)
        net.wait(max(1.0, deadline - time.monotonic()))
        cpu_s = _cpu_s(broker_pid) - cpu_before
        wall = time.time() - started
        sampler.done.set()
        sampler.join()
    election, all_know, failover, fits = measure(run_dir, killed_at, killed_term)
    rows = read_rounds(run_dir)
    durations = [r.duration_s for r in rows]
    overheads = []
    for r in rows:
        slowest = [fits[(p, r.term, r.round)] for p in r.trainers if (p, r.term, r.round) in fits]
        if slowest:
            overheads.append(r.duration_s - max(slowest))
    terms = [e.term for e in read_elections(run_dir)]
    return Result(
        n,
        len(net.processes()),
        len(rows),
        statistics.median(durations) if durations else None,
        statistics.median(overheads) if overheads else None,
        election,
        all_know,
        failover,
        len(killed),
        sampler.peers_kb / 1024,
        sampler.broker_kb / 1024,
        cpu_s,
        wall,
        len(terms) == len(set(terms)),
    )


def _f(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def table(results: list[Result]) -> str:
    head = (
        "peers",
        "procs",
        "rounds",
        "s/round",
        "overhead s",
        "election s",
        "all know s",
        "failover s",
        "killed",
        "PSS GB",
        "broker MB",
        "broker CPU s",
        "broker %core",
        "1 ctl/term",
    )
    rows = [
        (
            str(r.peers),
            str(r.processes),
            str(r.rounds),
            _f(r.round_s),
            _f(r.overhead_s),
            _f(r.election_s),
            _f(r.all_know_s),
            _f(r.failover_s),
            str(r.killed),
            _f(r.pss_mb / 1024),
            _f(r.broker_pss_mb, 1),
            _f(r.broker_cpu_s, 1),
            _f(100 * r.broker_share, 1),
            "yes" if r.one_controller_per_term else "NO",
        )
        for r in results
    ]
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    fmt = " | ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), "-+-".join("-" * w for w in widths), *(fmt.format(*row) for row in rows)])


def draw(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = [r.peers for r in results]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    series = [
        (
            axes[0][0],
            "seconds",
            [("s/round", [r.round_s for r in results]), ("overhead", [r.overhead_s for r in results])],
        ),
        (
            axes[0][1],
            "seconds",
            [
                ("election", [r.election_s for r in results]),
                ("all know", [r.all_know_s for r in results]),
                ("failover", [r.failover_s for r in results]),
            ],
        ),
        (axes[1][0], "GB", [("peers' PSS", [r.pss_mb / 1024 for r in results])]),
        (axes[1][1], "% of one core", [("broker CPU", [100 * r.broker_share for r in results])]),
    ]
    for ax, unit, lines in series:
        for label, values in lines:
            ax.plot(n, [math.nan if v is None else v for v in values], marker="o", label=label)
        ax.set_xlabel("peers")
        ax.set_ylabel(unit)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Federation at scale (one machine, real mosquitto)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    with StopSignals():  # SIGTERM ends the run like Ctrl-C: the network is stopped on the way out
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv, extra = split_peer_args(argv)
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[5, 20, 50, 100], help="network sizes (default 5 20 50 100)"
    )
    parser.add_argument(
        "--processes", type=int, default=4, help="peer processes per size: K = N / this, rounded up (default 4)"
    )
    parser.add_argument("--run-dir", type=Path, default=None, help="records folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=Path("bench_scale.png"), help="the PNG (default bench_scale.png)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds one size may take (default 900)")
    args = parser.parse_args(argv)
    if any(n < 3 for n in args.sizes) or args.processes < 2:
        parser.error(
            "sizes of at least 3 and at least 2 processes: the controller's process is killed, and a "
            "controller and a trainer must survive it"
        )
    root = args.run_dir or Path(tempfile.mkdtemp(prefix="fl-scale-"))

    print(f"bench_scale: sizes {args.sizes}, {args.processes} processes each, records in {root}", flush=True)
    print(f"peer flags: {' '.join([*PEER_ARGS, *extra])}", flush=True)
    results = []
    for n in args.sizes:
        result = run_size(n, args.processes, root / f"n{n}", extra, args.timeout)
        results.append(result)
        print(
            f"N={n}: {result.rounds} rounds, median {_f(result.round_s)} s/round, election {_f(result.election_s)} s, "
            f"failover {_f(result.failover_s)} s, PSS {_f(result.pss_mb / 1024)} GB, broker CPU "
            f"{_f(result.broker_cpu_s, 1)} s in {result.wall_s:.0f} s",
            flush=True,
        )
    print()
    print(table(results))
    draw(results, args.out)
    print(f"\nbench_scale: graph in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
