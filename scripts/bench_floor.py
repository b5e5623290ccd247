"""Floor benchmark: the federation against the compute floor, the same fits and evaluations done in turn by one process.

    python -m scripts.bench_floor [--models seed-cnn,cnn-small] [--layouts 1,5] [--rounds 10] [--passes 1]
                                  [--only floor|federation] [-- extra peer flags]

The work (the issue's configuration): Fashion-MNIST, 5 peers, 4 trainers of 2,000 samples each, 1 epoch, batch 32,
every peer but the controller evaluates every round's model on its test shard (round 0's, the initial model, too),
10 rounds. For each model:

- floor: one process (`--floor`, a subprocess of this script) imports TensorFlow, loads the 5 shards, builds the model
  once, then does each round's 4 fits and the FedAvg of their weights and the 4 evaluations, one after the other. Its
  start-up is from the process's start to its first fit;
- federation, for each layout K (peers per process: 1 is a process per peer, 5 is one process for all five):
  `scripts.localnet` on a real mosquitto, `--trainers 4 --min-solutions 4`; its start-up is from the launch to round
  1's training order (rounds.csv `started_at`), its rounds are rounds.csv's `duration_s` (training order to metrics).

Printed per run: wall (launch to exit), median round, start-up, peak PSS of the whole process tree (sampled every
0.2 s; the broker apart), and the federation's figures against the floor of the same pass. Runs of one pass are
interleaved (floor, then each layout, per model), and `--passes P` repeats the whole pass. A benchmark, not a test: it
prints what it measured and asserts nothing. Say what else ran on the machine when you quote it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from peer.records.run_dir import read_rounds
from scripts.localnet import LocalNetwork, split_peer_args

ROOT = Path(__file__).resolve().parent.parent
PEERS, TRAINERS, TRAIN_SAMPLES, EPOCHS, BATCH = 5, 4, 2000, 1, 32
DATASET = "fashion-mnist"


# --- measuring a process tree ----------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    """The children of every thread of `pid` (a process started by a thread is listed under that thread's task)."""
    children = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return children


def tree(pids: list[int]) -> set[int]:
    """The processes `pids` and all their descendants."""
    seen: set[int] = set()
    todo = list(pids)
    while todo:
        pid = todo.pop()
        if pid not in seen:
            seen.add(pid)
            todo += _children(pid)
    return seen


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class PeakPss:
    """The largest sum of PSS over a process tree, sampled every 0.2 s while it runs."""

    def __init__(self, roots, exclude=lambda: set()):
        self.roots, self.exclude = roots, exclude
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            pids = tree(list(self.roots())) - self.exclude()
            self.sampled(pids)
            self.peak_kb = max(self.peak_kb, sum(pss_kb(pid) for pid in pids))

    def sampled(self, pids: set[int]) -> None:
        """Each sample's processes, for a subclass that keeps more than the peak."""


# --- the floor: one process, the same work in turn --------------------------------------------------------------------


def floor(model: str, rounds: int, extra: list[str]) -> dict:
    """Runs in its own process (`--floor`): the federation's fits and evaluations, in turn. Returns its figures."""
    started = time.monotonic()
    from peer.config import load_settings
    from peer.learning.aggregation import fedavg
    from peer.learning.data import load_shard
    from peer.learning.learner import Learner

    learners = []
    for k in range(PEERS):
        flags = [
            "--dataset",
            DATASET,
            "--model",
            model,
            "--shard",
            f"{k}/{PEERS}",
            "--train-samples",
            str(TRAIN_SAMPLES),
            "--epochs",
            str(EPOCHS),
            "--batch-size",
            str(BATCH),
            *extra,
        ]
        settings = load_settings(flags, {})
        shard = load_shard(settings.shard_spec)
        if not learners:
            learners.append(
                Learner(settings.dataset, shard, settings.epochs, settings.batch_size, settings.seed, settings.model)
            )
            learners[0].prepare()
        else:
            learners.append(learners[0].twin(shard))
    workers = learners[1:]  # peer 1 plays the controller: it neither trains nor evaluates
    weights = learners[0].initial_weights()
    first_fit = None
    durations = []
    for learner in workers:  # round 0: every peer evaluates the initial model
        learner.evaluate(weights)
    accuracy = None
    for _ in range(rounds):
        round_started = time.monotonic()
        first_fit = first_fit or round_started
        solutions = [(f"p{i}", *learner.fit(weights)[:2]) for i, learner in enumerate(workers[:TRAINERS])]
        weights = fedavg([(w, n) for _, w, n in solutions])
        results = [learner.evaluate(weights) for learner in workers]
        accuracy = sum(a * n for a, _, n in results) / sum(n for _, _, n in results)
        durations.append(time.monotonic() - round_started)
    return {
        "startup_s": first_fit - started,
        "rounds": durations,
        "accuracy": accuracy,
        "wall_s": time.monotonic() - started,
    }


@dataclass
class Figures:
    what: str
    wall_s: float
    round_s: float | None
    startup_s: float | None
    pss_mb: float
    accuracy: float | None = None
    rounds: list[float] = field(default_factory=list)


def run_floor(model: str, rounds: int, extra: list[str]) -> Figures:
    started = time.monotonic()
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "scripts.bench_floor",
                "--floor",
                model,
                "--rounds",
                str(rounds),
                "--floor-out",
                out.name,
                "--",
                *extra,
            ],
            cwd=ROOT,
        )
        with PeakPss(lambda: [proc.pid]) as pss:
            proc.wait()
        wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"bench_floor: the floor run failed (exit {proc.returncode})")
        result = json.loads(Path(out.name).read_text())
    return Figures(
        f"floor {model}",
        wall,
        statistics.median(result["rounds"]),
        result["startup_s"],
        pss.peak_kb / 1024,
        result["accuracy"],
        result["rounds"],
    )


def run_federation(model: str, per_process: int, rounds: int, extra: list[str]) -> Figures:
    peer_args = [
        "--dataset",
        DATASET,
        "--model",
        model,
        "--min-peers",
        str(PEERS),
        "--trainers",
        str(TRAINERS),
        "--min-solutions",
        str(TRAINERS),
        "--train-samples",
        str(TRAIN_SAMPLES),
        "--epochs",
        str(EPOCHS),
        "--batch-size",
        str(BATCH),
        "--max-rounds",
        str(rounds),
        "--target-accuracy",
        "1.0",
        "--round-deadline",
        "120",
        *extra,
    ]
    with tempfile.TemporaryDirectory(prefix="fl-bench-floor-") as run_dir:
        net = LocalNetwork(Path(run_dir), peers=PEERS, peer_args=peer_args, peers_per_process=per_process)
        launched = time.time()
        started = time.monotonic()
        with net:
            broker = lambda: {net.broker.proc.pid} if net.broker and net.broker.proc else set()  # noqa: E731
            learning = [net.learning.proc.pid] if net.learning and net.learning.proc else []
            with PeakPss(lambda: [p.pid for p in net.processes()] + learning, exclude=broker) as pss:
                codes = net.wait(rounds * 180 + 120)
            wall = time.monotonic() - started
        if any(code != 0 for code in codes.values()):
            print(f"bench_floor: a peer failed: {codes}; records in {run_dir}", file=sys.stderr)
        rows = read_rounds(run_dir)
    durations = [r.duration_s for r in rows if r.round > 0]
    first = next((r for r in rows if r.round == 1 and r.started_at), None)
    layout = "a process per peer" if per_process == 1 else f"{per_process} per process"
    return Figures(
        f"federation {model}, {layout}",
        wall,
        statistics.median(durations) if durations else None,
        first.started_at - launched if first else None,
        pss.peak_kb / 1024,
        rows[-1].accuracy if rows else None,
        durations,
    )


def format_figure(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(results: list[tuple[Figures, Figures | None]]) -> str:
    head = "| run | wall s | median round s | start-up s | PSS GB | final accuracy | round / floor | wall / floor |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for figures, base in results:
        ratio = f"{figures.round_s / base.round_s:.2f}x" if base and figures.round_s and base.round_s else "-"
        wall = f"{figures.wall_s / base.wall_s:.2f}x" if base else "-"
        lines.append(
            f"| {figures.what} | {format_figure(figures.wall_s)} | {format_figure(figures.round_s, 2)} | "
            f"{format_figure(figures.startup_s)} | {figures.pss_mb / 1024:.2f} | {format_figure(figures.accuracy, 4)} | "
            f"{ratio if base else '-'} | {wall if base else '-'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    own, extra = split_peer_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="seed-cnn,cnn-small")
    parser.add_argument("--layouts", default="1,5", help="peers per process of each federation run, e.g. 1,5")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--passes", type=int, default=1)
    parser.add_argument("--only", choices=("floor", "federation"))
    parser.add_argument("--floor", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--floor-out", help=argparse.SUPPRESS)
    args = parser.parse_args(own)
    if args.floor:
        Path(args.floor_out).write_text(json.dumps(floor(args.floor, args.rounds, extra)))
        return 0
    print(
        f"bench_floor: {PEERS} peers, {TRAINERS} trainers x {TRAIN_SAMPLES} samples, {EPOCHS} epoch, batch {BATCH}, "
        f"{args.rounds} rounds, {DATASET}; {os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results: list[tuple[Figures, Figures | None]] = []
    for number in range(1, args.passes + 1):
        for model in args.models.split(","):
            base = None
            if args.only != "federation":
                base = run_floor(model, args.rounds, extra)
                results.append((base, None))
                print(
                    f"pass {number}: {base.what}: wall {base.wall_s:.1f} s, median round {base.round_s:.2f} s, "
                    f"rounds {' '.join(f'{d:.2f}' for d in base.rounds)}",
                    flush=True,
                )
            if args.only == "floor":
                continue
            for layout in args.layouts.split(","):
                figures = run_federation(model, int(layout), args.rounds, extra)
                results.append((figures, base))
                print(
                    f"pass {number}: {figures.what}: wall {figures.wall_s:.1f} s, median round "
                    f"{format_figure(figures.round_s, 2)} s, start-up {format_figure(figures.startup_s)} s, rounds "
                    f"{' '.join(f'{d:.2f}' for d in figures.rounds)}",
                    flush=True,
                )
    print()
    print(table(results))
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
