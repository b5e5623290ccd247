"""The same federation once per data partition, then one graph that compares their global accuracy per round.

    python -m scripts.experiment --out runs/partitions --partitions iid,dirichlet:0.5,skewed -- --train-samples 2000

Each partition runs as its own local network (`scripts.localnet`: a broker and N peer processes), one after the
other, in `OUT/<label>/` (`iid`, `dirichlet-0.5`, `skewed`, ...); a folder of that name left by an earlier
experiment is replaced, since records are appended and old rows would mix with new ones. Every other setting is
identical across runs: dataset fashion-mnist, target accuracy 1.0 so that every run does all its rounds, seed 42,
all peers present before the first election. Flags after `--` go to every peer (see `python -m peer --help`) and
override those defaults; the partition, alpha, round count, broker, shards and run dir are the script's to set.

Written to OUT: `comparison.png` (global accuracy per round, round 0 = the initial model), `comparison.csv`
(partition,round,accuracy) and `summary.json` (settings and, per run, outcome and the same accuracy series).
A run that fails (a peer exits non-zero, the timeout passes, no run.json) is reported and makes the exit code 1,
but the remaining partitions still run.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from graphs import plot_comparison
from peer.config import SettingsError, build_parser, load_settings, number
from peer.learning.data import DEFAULT_SEED
from peer.learning.partition import DEFAULT_ALPHA, SCHEMES
from peer.node.signals import StopSignals
from peer.records.run_dir import RunDirError, global_series, load_run
from scripts.localnet import LocalNetwork, split_peer_args

DEFAULT_PARTITIONS = "iid,dirichlet:0.5,skewed"
positive_number = number(0, low_open=True)
DEFAULT_TIMEOUT = 900.0
COMPARISON_PNG = "comparison.png"
COMPARISON_CSV = "comparison.csv"
SUMMARY_JSON = "summary.json"

# Before the user's peer flags, so theirs win (the peer's argparse keeps the last value of a flag).
BASE_PEER_ARGS = ["--dataset", "fashion-mnist", "--target-accuracy", "1.0", "--seed", str(DEFAULT_SEED)]
# Set per run by LocalNetwork or by this script; a user value would silently break the comparison or the launcher.
RESERVED_PEER_FLAGS = {
    "broker": "LocalNetwork starts its own broker",
    "peer_id": "LocalNetwork names the peers",
    "shard": "LocalNetwork gives each peer its shard",
    "run_dir": "each partition runs in OUT/<label>; use --out",
    "partition": "use --partitions",
    "alpha": "use --partitions dirichlet:ALPHA",
    "max_rounds": "use --rounds",
}


class UsageError(Exception):
    """Bad command line; the message says what to change."""


@dataclass(frozen=True)
class Partition:
    name: str
    alpha: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.alpha is None else f"{self.name}-{self.alpha:g}"

    def peer_args(self) -> list[str]:
        args = ["--partition", self.name]
        if self.alpha is not None:
            args += ["--alpha", repr(self.alpha)]
        return args


@dataclass
class RunResult:
    label: str
    partition: str
    alpha: float | None
    run_dir: str
    ok: bool = False
    error: str | None = None
    exit_codes: dict[str, int | None] = field(default_factory=dict)
    rounds: int = 0
    initial_accuracy: float | None = None
    final_accuracy: float | None = None
    wall_s: float = 0.0
    duration_s: float | None = None
    accuracy: list[tuple[int, float]] = field(default_factory=list)


def parse_partitions(text: str) -> list[Partition]:
    items = [item.strip() for item in text.split(",")]
    if not any(items):
        raise UsageError("--partitions is empty; e.g. --partitions iid,dirichlet:0.5,skewed")
    partitions: list[Partition] = []
    for item in items:
        if not item:
            raise UsageError(f"--partitions {text!r} has an empty item (a stray comma?)")
        name, sep, alpha_text = item.partition(":")
        name = name.strip().lower()
        if name not in SCHEMES:
            raise UsageError(
                f"unknown partition {name!r} in --partitions; choose from {', '.join(SCHEMES)} "
                "(dirichlet takes an alpha: dirichlet:0.5)"
            )
        alpha: float | None = None
        if name == "dirichlet":
            alpha = DEFAULT_ALPHA
            if sep:
                try:
                    alpha = positive_number(alpha_text)
                except SettingsError as error:
                    raise UsageError(f"{item!r}: alpha {error}") from None
        elif sep:
            raise UsageError(f"{item!r}: only dirichlet takes a parameter (dirichlet:ALPHA)")
        partition = Partition(name, alpha)
        if any(p.label == partition.label for p in partitions):
            raise UsageError(f"partition {partition.label!r} is given twice in --partitions")
        partitions.append(partition)
    return partitions


def check_peer_args(peer_args: list[str], partitions: list[Partition]) -> None:
    """Refuse reserved flags, and let the peer's own parser judge the rest now rather than once per failed run."""
    try:
        given = vars(build_parser().parse_args(peer_args))
    except SystemExit:  # the peer's parser has printed its complaint
        raise UsageError("the peer flags after -- were rejected (see above)") from None
    for dest, reason in RESERVED_PEER_FLAGS.items():
        if given.get(dest) is not None:
            flag = "--" + dest.replace("_", "-")
            raise UsageError(f"{flag} cannot be given after --: {reason}")
    for partition in partitions:
        try:
            load_settings(peer_args + partition.peer_args() + ["--shard", "0/2"])
        except SettingsError as error:
            raise UsageError(f"peer flags after --: {error}") from None


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.experiment",
        description="Run the same local federation once per data partition and compare their global accuracy "
        "per round in one graph. Flags after -- go to every peer (see python -m peer --help); "
        f"defaults given to the peers: {' '.join(BASE_PEER_ARGS)} --min-peers PEERS.",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/experiment"),
        help="folder for the runs and the comparison (default runs/experiment)",
    )
    parser.add_argument(
        "--partitions",
        default=DEFAULT_PARTITIONS,
        help=f"comma-separated partitions, dirichlet as dirichlet:ALPHA (default {DEFAULT_PARTITIONS}); "
        f"known: {', '.join(SCHEMES)}",
    )
    parser.add_argument("--peers", type=int, default=5, help="peers per run (default 5)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds per run (default 5)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        help=f"seconds one partition's run may take before it is stopped and counted as failed "
        f"(default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--echo", action="store_true", help="echo the peers' logs to this terminal")
    return parser


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[Partition], list[str]]:
    argv, peer_args = split_peer_args(argv)
    parser = make_parser()
    args = parser.parse_args(argv)
    try:
        if args.peers < 2:
            raise UsageError("--peers must be at least 2 (a federation needs an election)")
        if args.rounds < 1:
            raise UsageError("--rounds must be at least 1")
        if not (math.isfinite(args.timeout) and args.timeout > 0):
            raise UsageError("--timeout must be a positive number of seconds")
        if args.out.exists() and not args.out.is_dir():
            raise UsageError(f"--out {args.out} exists and is not a folder")
        partitions = parse_partitions(args.partitions)
        check_peer_args(peer_args, partitions)
    except UsageError as error:
        parser.error(str(error))
    return args, partitions, peer_args


def peer_args_for(partition: Partition, args: argparse.Namespace, peer_args: list[str]) -> list[str]:
    return [
        *BASE_PEER_ARGS,
        "--min-peers",
        str(args.peers),
        *peer_args,
        *partition.peer_args(),
        "--max-rounds",
        str(args.rounds),
    ]


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def read_outcome(result: RunResult) -> None:
    """Fill the result from the run's records; whatever a broken run left is still worth plotting."""
    try:
        history = load_run(result.run_dir)
    except RunDirError:
        return
    result.accuracy = [
        (p.round, p.accuracy) for p in global_series(history) if p.accuracy is not None and math.isfinite(p.accuracy)
    ]
    outcome = history.summary.outcome if history.summary else {}
    by_round = dict(result.accuracy)
    result.initial_accuracy = _finite(outcome.get("initial_accuracy"))
    if result.initial_accuracy is None:
        result.initial_accuracy = by_round.get(0)
    trained = [r for r, _ in result.accuracy if r > 0]
    rounds = outcome.get("rounds")
    result.rounds = rounds if isinstance(rounds, int) and not isinstance(rounds, bool) else max(trained, default=0)
    # rounds.csv holds rounded values and run.json full ones; the table, CSV and graph should show the same number
    result.final_accuracy = by_round[max(trained)] if trained else _finite(outcome.get("final_accuracy"))
    result.duration_s = _finite(outcome.get("duration_s"))
    if history.summary is None and result.ok:
        result.ok, result.error = False, "every peer exited 0 but no run.json was written"


def _log_tail(net: LocalNetwork, peer_id: str, lines: int = 6) -> str:
    tail = net.peer_log(peer_id).rstrip().splitlines()[-lines:]
    return "\n".join(f"    {peer_id} | {line}" for line in tail)


def run_partition(partition: Partition, args: argparse.Namespace, peer_args: list[str]) -> RunResult:
    run_dir = args.out / partition.label
    result = RunResult(partition.label, partition.name, partition.alpha, str(run_dir))
    if run_dir.exists():
        shutil.rmtree(run_dir)
    net = LocalNetwork(run_dir, args.peers, peer_args_for(partition, args, peer_args), echo=args.echo)
    started = time.monotonic()
    try:
        try:
            net.start()
        except (RuntimeError, OSError, SystemExit) as error:  # LocalNetwork exits when mosquitto is missing
            result.error = f"could not start the network: {error}"
            return result
        codes = net.wait(args.timeout)
    finally:
        net.stop()
        result.wall_s = time.monotonic() - started
    result.exit_codes = codes
    still_running = sorted(peer for peer, code in codes.items() if code is None)
    failed = {peer: code for peer, code in codes.items() if code not in (0, None)}
    if still_running:
        result.error = f"timed out after {args.timeout:g} s (still running: {', '.join(still_running)})"
    elif failed:
        result.error = "peers exited non-zero: " + ", ".join(f"{peer}={code}" for peer, code in failed.items())
    result.ok = result.error is None
    read_outcome(result)
    if failed:
        print(
            f"experiment: {partition.label}: end of the log of {next(iter(failed))}:\n"
            f"{_log_tail(net, next(iter(failed)))}",
            flush=True,
        )
    return result


def _fmt(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def format_table(results: list[RunResult]) -> str:
    header = ("partition", "status", "rounds", "final acc", "initial acc", "time (s)")
    rows = [
        (
            r.label,
            "ok" if r.ok else "FAILED",
            str(r.rounds),
            _fmt(r.final_accuracy),
            _fmt(r.initial_accuracy),
            f"{r.wall_s:.1f}",
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) if i < 2 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * width for width in widths))
    lines += [f"{r.label}: {r.error}" for r in results if r.error]
    return "\n".join(lines)


def write_outputs(
    out: Path,
    results: list[RunResult],
    args: argparse.Namespace,
    partitions: list[Partition],
    peer_args: list[str],
    dataset: str,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with (out / COMPARISON_CSV).open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["partition", "round", "accuracy"])
        for result in results:
            for number, accuracy in result.accuracy:
                writer.writerow([result.label, number, accuracy])
    series = {(r.label if r.ok else f"{r.label} (failed)"): r.accuracy for r in results}
    plot_comparison(
        series, out / COMPARISON_PNG, f"Global accuracy per round by data partition ({dataset}, {args.peers} peers)"
    )
    summary = {
        "settings": {
            "partitions": [p.label for p in partitions],
            "peers": args.peers,
            "rounds": args.rounds,
            "timeout_s": args.timeout,
            "dataset": dataset,
            "peer_args": peer_args,
            "base_peer_args": BASE_PEER_ARGS,
        },
        "ok": all(r.ok for r in results) and len(results) == len(partitions),
        "runs": [{**asdict(r), "accuracy": [{"round": n, "accuracy": a} for n, a in r.accuracy]} for r in results],
        "files": {"graph": COMPARISON_PNG, "csv": COMPARISON_CSV},
    }
    (out / SUMMARY_JSON).write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, partitions, peer_args = parse_args(argv)
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    # what the peers will actually use, defaults and user flags together (for titles and summary.json)
    dataset = load_settings(peer_args_for(partitions[0], args, peer_args)).dataset
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[RunResult] = []
    # SIGTERM ends the experiment like Ctrl-C: the running network is stopped on the way out.
    with StopSignals():
        try:
            return _run_partitions(args, partitions, peer_args, dataset, results)
        except KeyboardInterrupt:
            print("\nexperiment: interrupted; every peer and broker of the current run was stopped", flush=True)
            if results:
                write_outputs(args.out, results, args, partitions, peer_args, dataset)
            return 130


def _run_partitions(args, partitions, peer_args, dataset, results: list[RunResult]) -> int:
    """Each partition's run in turn (appended to `results` as it ends), then the outputs."""
    for index, partition in enumerate(partitions, 1):
        print(
            f"experiment: [{index}/{len(partitions)}] {partition.label}: {args.peers} peers, "
            f"{args.rounds} rounds, records in {args.out / partition.label}",
            flush=True,
        )
        result = run_partition(partition, args, peer_args)
        results.append(result)
        print(
            f"experiment: [{index}/{len(partitions)}] {partition.label}: "
            + (
                f"final accuracy {_fmt(result.final_accuracy)} after {result.rounds} rounds"
                if result.ok
                else f"FAILED ({result.error})"
            )
            + f", {result.wall_s:.1f} s",
            flush=True,
        )
    write_outputs(args.out, results, args, partitions, peer_args, dataset)
    print()
    print(format_table(results))
    print(
        f"\nexperiment: graph {args.out / COMPARISON_PNG}, data {args.out / COMPARISON_CSV}, "
        f"summary {args.out / SUMMARY_JSON}",
        flush=True,
    )
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
