"""How the federation learns with each strategy, on IID and on pathologically non-IID data: the FedAvg paper's protocol.

    python -m scripts.bench_strategies [--peers 100] [--rounds 50] [--splits iid,pathological]
        [--strategies fedavg,fedprox,fedadam,dp-fedavg] [--out DIR] [-- extra peer flags]
    python -m scripts.bench_strategies --report DIR

McMahan et al. 2017 on Fashion-MNIST: `--peers` peers of `--samples` (600) training samples each, `--trainers` (10)
chosen a round, `--epochs` (5) local epochs of batch `--batch-size` (10), the paper's CNN (`--model fedavg-cnn`), every
peer evaluating every round's model on its test shard (so the global accuracy is that of the whole test set, but the
controller's shard). Two splits: `iid`, and the paper's pathological one (`--partition shards`: the training set
sorted by label, cut into 2N shards, 2 per peer; at 100 peers 200 shards of 300, most peers holding 2 classes). Four
strategies, each a run of its own (one network after the other, each with its own broker and learning service):

- `fedavg`:    FedAvg (sample-weighted mean; server sgd at lr 1);
- `fedprox`:   FedAvg with the trainers' proximal term (`--proximal-mu`, Li et al. 2020);
- `fedadam`:   the mean update applied by a server Adam (`--server-optimizer adam`, Reddi et al. 2021);
- `dp-fedavg`: client-level DP-FedAvg, central (`--dp-clip`, `--dp-noise-multiplier`, McMahan et al. 2018).

Each run's own records are read back (`peer.records.run_dir`: rounds.csv and run.json): the rounds to reach 80% and
85% global accuracy and the accuracy after the last round, as a markdown table (results.md) and a PNG of accuracy
per round (strategies.png), both in `--out`, with the configuration and the machine's load average, and, for DP,
the epsilon spent. Fewer peers keep the per-peer work (`--samples` each: with the pathological split the peer's two
shards are larger and it draws its samples from them, keeping its classes).

`--report DIR` runs nothing: it writes results.md, results.json and strategies.png again from the records an earlier
run of the benchmark left in DIR (one interrupted, say: its unfinished run is in the table as "did not finish", with
the rounds it recorded), the configuration from their run.json, and no load average (none was measured).

A benchmark, not a test: it prints what it measured and asserts nothing (its smallest configuration runs in the tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer.node.signals import StopSignals
from peer.records.run_dir import read_rounds, read_run_summary
from scripts.localnet import LocalNetwork, split_peer_args

SPLITS = {"iid": "iid", "pathological": "shards"}  # split name -> --partition
STRATEGIES = ("fedavg", "fedprox", "fedadam", "dp-fedavg")
TEST_SAMPLES = 10_000  # Fashion-MNIST's test set, shared among the peers
TRAIN_SAMPLES = 60_000
THRESHOLDS = (0.80, 0.85)
MEAN_ROUNDS = 10  # the table's mean of the last rounds: the pathological split's global accuracy swings round to round
LABELS = {"fedavg": "FedAvg", "fedprox": "FedProx", "fedadam": "FedAdam", "dp-fedavg": "DP-FedAvg"}


@dataclass
class Outcome:
    split: str
    strategy: str
    run_dir: str
    accuracy: list[tuple[int, float]] = field(default_factory=list)  # (round, global accuracy), round 0 included
    epsilon: float | None = None
    reason: str | None = None  # the run's end (run.json), None if it did not finish
    seconds: float = 0.0
    load: tuple[float, float] | None = None  # the 1-minute load average at its start and at its end, if measured

    @property
    def rounds(self) -> list[tuple[int, float]]:
        """The points of the rounds run: round 0 (the initial model) left out."""
        return [(r, a) for r, a in self.accuracy if r > 0]

    def rounds_to(self, threshold: float) -> int | None:
        return next((r for r, a in self.rounds if a >= threshold), None)

    @property
    def last(self) -> tuple[int, float] | None:
        return self.accuracy[-1] if self.accuracy else None

    @property
    def best(self) -> tuple[int, float] | None:
        """The round of the highest global accuracy (the first, of equals) and that accuracy."""
        rounds = self.rounds
        return max(rounds, key=lambda point: point[1]) if rounds else None

    def mean_of_last(self, count: int) -> tuple[int, int, float] | None:
        """(first round, last round, mean accuracy) of the last `count` rounds: on a non-IID split one round's
        accuracy swings with the round's trainers, so a single round says less than their mean."""
        tail = self.rounds[-count:]
        return (tail[0][0], tail[-1][0], sum(a for _, a in tail) / len(tail)) if tail else None


def strategy_flags(strategy: str, args) -> list[str]:
    if strategy == "fedprox":
        return ["--proximal-mu", str(args.mu)]
    if strategy == "fedadam":
        return ["--server-optimizer", "adam", "--server-lr", str(args.server_lr), "--tau", str(args.tau)]
    if strategy == "dp-fedavg":
        return ["--dp-clip", str(args.dp_clip), "--dp-noise-multiplier", str(args.dp_noise)]
    return []


def peer_flags(split: str, strategy: str, args) -> list[str]:
    flags = [
        "--dataset",
        "fashion-mnist",
        "--model",
        args.model,
        "--partition",
        SPLITS[split],
        "--seed",
        str(args.seed),
        "--min-peers",
        str(args.peers),
        "--trainers",
        str(args.trainers),
        "--min-solutions",
        str(args.trainers),
        "--epochs",
        str(args.epochs),
        "--batch-size",
        str(args.batch_size),
        "--max-rounds",
        str(args.rounds),
        "--target-accuracy",
        "1.0",
        "--round-deadline",
        str(args.round_deadline),
        "--wait-timeout",
        "1200",
    ]
    if args.samples * args.peers < TRAIN_SAMPLES:  # fewer peers than the data holds: each keeps the paper's share
        flags += ["--train-samples", str(args.samples)]
    if args.test_samples:
        flags += ["--test-samples", str(args.test_samples)]
    return flags + strategy_flags(strategy, args)


def run_one(split: str, strategy: str, args, extra: list[str], say=print) -> Outcome:
    run_dir = Path(args.out) / f"{split}-{strategy}"
    outcome = Outcome(split, strategy, str(run_dir))
    started, load = time.monotonic(), os.getloadavg()[0]
    net = LocalNetwork(
        run_dir,
        args.peers,
        [*peer_flags(split, strategy, args), *extra],
        peers_per_process=args.peers_per_process,
        learning_workers=args.workers,
    )
    deadline = started + args.timeout_per_round * (args.rounds + 1)
    try:
        net.start()
        seen = 0
        while net.running() and time.monotonic() < deadline:
            time.sleep(2)
            rows = read_rounds(run_dir)
            if len(rows) > seen:
                seen = len(rows)
                last = rows[-1]
                eps = f", epsilon {last.epsilon:.3g}" if last.epsilon is not None else ""
                say(
                    f"  {split} {strategy}: round {last.round}: accuracy {last.accuracy:.4f}{eps} "
                    f"({time.monotonic() - started:.0f} s)"
                )
        if net.running():
            say(f"  {split} {strategy}: stopped after {args.timeout_per_round * (args.rounds + 1):.0f} s")
    finally:
        net.stop()
    outcome.seconds, outcome.load = time.monotonic() - started, (load, os.getloadavg()[0])
    return read_outcome(outcome)


def read_outcome(outcome: Outcome) -> Outcome:
    """The run's accuracy per round and how it ended, from its records."""
    rows = read_rounds(outcome.run_dir)
    summary = read_run_summary(outcome.run_dir)
    points = [(r.round, r.accuracy) for r in rows]
    if summary is not None and summary.initial_accuracy is not None:
        points.insert(0, (0, summary.initial_accuracy))
    outcome.accuracy = points
    outcome.epsilon = rows[-1].epsilon if rows else None
    outcome.reason = summary.outcome.get("reason") if summary else None
    return outcome


def recorded_seconds(run_dir: str | Path) -> float:
    """A run's seconds as its records give them: run.json's duration, or (an unfinished run) its rounds' span."""
    summary = read_run_summary(run_dir)
    duration = summary.outcome.get("duration_s") if summary else None
    if isinstance(duration, (int, float)) and not isinstance(duration, bool):
        return float(duration)
    rows = read_rounds(run_dir)
    starts = [r.started_at for r in rows if r.started_at is not None]
    return rows[-1].finished_at - min(starts) if rows and starts else 0.0


def recorded_configuration(outcomes: list[Outcome]) -> tuple[str, str]:
    """(the configuration, the picture's title) of runs read back, from the first run.json among them (every run
    shares it but its strategy's flags, which the table names)."""
    for o in outcomes:
        summary = read_run_summary(o.run_dir)
        if summary is not None and summary.settings:
            s = summary.settings
            text = (
                f"{s.get('min_peers')} peers, {s.get('train_samples') or 'all'} training samples each, "
                f"{s.get('trainers')} trainers a round, E={s.get('epochs')}, B={s.get('batch_size')}, --model "
                f"{s.get('model')}, {s.get('max_rounds')} rounds, seed {s.get('seed')} (from {o.run_dir}/run.json)"
            )
            return text, f"Fashion-MNIST, {s.get('min_peers')} peers, {s.get('model')}"
    return "configuration unknown: no run.json among the records", "Fashion-MNIST"


def report_from_records(out: Path) -> tuple[str, Path | None]:
    """results.md, results.json and strategies.png again from the run dirs in `out`; (the report, the PNG)."""
    outcomes = []
    for split in SPLITS:
        for strategy in STRATEGIES:
            run_dir = out / f"{split}-{strategy}"
            if run_dir.is_dir():
                outcome = read_outcome(Outcome(split, strategy, str(run_dir)))
                outcome.seconds = recorded_seconds(run_dir)
                outcomes.append(outcome)
    if not outcomes:
        raise SystemExit(f"python -m scripts.bench_strategies: error: no run of the benchmark in {out}")
    config, title = recorded_configuration(outcomes)
    machine = "load average: not measured (this table was made again from the records)"
    return write_results(out, config, machine, outcomes, title)


def write_results(out: Path, config: str, machine: str, outcomes: list[Outcome], title: str) -> tuple[str, Path]:
    """results.md (the configuration, the machine, the table), results.json and strategies.png in `out`."""
    report = f"{config}\n\n{machine}\n\n{table(outcomes)}"
    (out / "results.md").write_text(report)
    (out / "results.json").write_text(
        json.dumps({"configuration": config, "machine": machine, "runs": [asdict(o) for o in outcomes]}, indent=2)
    )
    return report, draw(outcomes, out / "strategies.png", title)


def _cell(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def table(outcomes: list[Outcome]) -> str:
    """The markdown table: one row per strategy and split."""
    head = (
        f"| split | strategy | rounds to {THRESHOLDS[0]:.0%} | rounds to {THRESHOLDS[1]:.0%} | "
        f"accuracy after the last round | best | mean of the last {MEAN_ROUNDS} rounds | epsilon (delta 1e-5) | run |"
        "\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for o in outcomes:
        last, best, mean = o.last, o.best, o.mean_of_last(MEAN_ROUNDS)
        after = f"{last[1]:.2%} (round {last[0]})" if last and last[0] > 0 else "no round"
        top = f"{best[1]:.2%} (round {best[0]})" if best else "no round"
        average = f"{mean[2]:.2%} (rounds {mean[0]}-{mean[1]})" if mean else "no round"
        eps = "–" if o.epsilon is None else f"{o.epsilon:.3g}"
        ended = o.reason or "did not finish"
        lines.append(
            f"| {o.split} | {LABELS.get(o.strategy, o.strategy)} | {_cell(o.rounds_to(THRESHOLDS[0]))} | "
            f"{_cell(o.rounds_to(THRESHOLDS[1]))} | {after} | {top} | {average} | {eps} | {o.seconds:.0f} s, {ended} |"
        )
    return head + "\n".join(lines) + "\n"


def configuration(args, extra: list[str]) -> str:
    text = (
        f"{args.peers} peers ({args.peers_per_process} to a process), {args.samples} training samples each, "
        f"{args.trainers} trainers a round, E={args.epochs}, B={args.batch_size}, --model {args.model}, "
        f"{args.rounds} rounds, seed {args.seed}; FedProx mu {args.mu}; FedAdam server lr {args.server_lr}, tau "
        f"{args.tau} (beta1 0.9, beta2 0.99); DP-FedAvg central, clip {args.dp_clip}, noise multiplier "
        f"{args.dp_noise}"
    )
    return text + (f"; extra peer flags {' '.join(extra)}" if extra else "")


def draw(outcomes: list[Outcome], path: Path, title: str) -> Path:
    from graphs.draw import plot_panels

    panels: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for o in outcomes:
        panels.setdefault(o.split, {})[LABELS.get(o.strategy, o.strategy)] = o.accuracy
    return plot_panels(panels, path, title, lines=THRESHOLDS)


def main(argv: list[str] | None = None) -> int:
    with StopSignals():  # SIGTERM ends the run like Ctrl-C: the network in progress is stopped on the way out
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    own, extra = split_peer_args(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_strategies", description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", metavar="DIR", help="run nothing: the results again from the records in DIR")
    parser.add_argument("--peers", type=int, default=100)
    parser.add_argument("--peers-per-process", type=int, default=10)
    parser.add_argument("--samples", type=int, default=600, help="training samples per peer (default 600)")
    parser.add_argument("--test-samples", type=int, default=0, help="cap on each peer's test samples (0: its share)")
    parser.add_argument("--trainers", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--model", default="fedavg-cnn")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--splits", default=",".join(SPLITS), help=f"any of {', '.join(SPLITS)}")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help=f"any of {', '.join(STRATEGIES)}")
    parser.add_argument("--mu", type=float, default=0.01, help="FedProx's mu (default 0.01)")
    parser.add_argument("--server-lr", type=float, default=0.01, help="FedAdam's server lr (default 0.01)")
    parser.add_argument("--tau", type=float, default=1e-3, help="FedAdam's tau (default 0.001)")
    parser.add_argument("--dp-clip", type=float, default=1.0, help="DP-FedAvg's clip (default 1)")
    parser.add_argument("--dp-noise", type=float, default=0.01, help="DP-FedAvg's noise multiplier (default 0.01)")
    parser.add_argument("--workers", type=int, default=1, help="learning jobs the machine runs at once (default 1)")
    parser.add_argument("--round-deadline", type=float, default=900.0)
    parser.add_argument("--timeout-per-round", type=float, default=900.0, help="seconds a run may take per round")
    parser.add_argument("--out", default=f"runs/bench-strategies-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args(own)
    if args.report:
        report, picture = report_from_records(Path(args.report))
        print(report, flush=True)
        print(f"bench_strategies: {Path(args.report) / 'results.md'}, {picture}", flush=True)
        return 0
    splits, strategies = args.splits.split(","), args.strategies.split(",")
    bad = [s for s in splits if s not in SPLITS] + [s for s in strategies if s not in STRATEGIES]
    if bad:
        parser.error(f"unknown split or strategy: {', '.join(bad)}")
    if args.peers < 2 or args.trainers < 1 or args.trainers >= args.peers or args.rounds < 1:
        parser.error("need --peers >= 2, 1 <= --trainers < --peers and --rounds >= 1")
    if args.samples * args.peers > TRAIN_SAMPLES:
        parser.error(f"{args.peers} peers of {args.samples} samples need more than Fashion-MNIST's {TRAIN_SAMPLES}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = configuration(args, extra)
    print(f"bench_strategies: {config}; records in {out}", flush=True)
    outcomes: list[Outcome] = []
    for split in splits:
        for strategy in strategies:
            print(f"bench_strategies: {split} {strategy}", flush=True)
            outcomes.append(run_one(split, strategy, args, extra, say=lambda text: print(text, flush=True)))
    loads = [x for o in outcomes for x in (o.load or ())]
    machine = (
        f"load average (1 min) during the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} cores"
        if loads
        else ""
    )
    title = f"Fashion-MNIST, {args.peers} peers, {args.model}"
    report, picture = write_results(out, config, machine, outcomes, title)
    print(report, flush=True)
    print(f"bench_strategies: {out / 'results.md'}, {picture}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
