"""Wire benchmark: how many bytes a round puts through the broker, how many model copies that is, and how long a
round takes beyond its training and evaluation.

    python -m scripts.bench_wire [--models cnn-small,seed-cnn] [--dtypes float32,float16] [--json OUT] [-- PEER_FLAGS]
    python -m scripts.bench_wire --legacy --dtypes float32          # code without --model / --wire-dtype
    python -m scripts.bench_wire --accuracy [--dtypes float32,float16]

Each configuration (model x wire dtype) runs a local federation (scripts/localnet.py: a real mosquitto, real peers;
N=5 peers, T=4 trainers, `--min-solutions 4`) on small Fashion-MNIST shards (1000 train, 500 test samples a peer,
1 epoch), one configuration after another, never two at once.

Bytes come from the broker's own counters. Mosquitto (2.0.11 here) publishes its `$SYS/broker/...` tree, retained,
every `sys_interval` seconds (1 s in the bench's broker config), and only the values that changed. By experiment
with mosquitto_pub/mosquitto_sub (one 10,000-byte QoS 1 publish to two subscribers: publish/bytes/received +10,000,
publish/bytes/sent +20,021, the 21 being $SYS values sent to the reader; bytes/received +10,317, bytes/sent +20,433):
- `publish/bytes/received`: payload bytes of the PUBLISH packets clients sent (retained or not): what peers publish.
- `publish/bytes/sent`: payload bytes of the PUBLISH packets the broker sent, one count per subscriber delivered
  to (a peer gets its own messages back: no no-local), retained copies handed to a new subscriber included, and
  the `$SYS` messages sent to whoever subscribes to them too: what the broker delivers.
- `bytes/received`, `bytes/sent`: every byte on the wire (MQTT headers, topics, CONNECT, PUBACK, PINGREQ, ...).
- `messages/received|sent` count every MQTT packet, not publishes; `publish/messages/received` does not count
  retained publishes at all in 2.0.11, so message counts are not used; bytes are.

The bench's own reading is kept out of the figures: it connects once, after every peer has exited and the broker
has been quiet for more than `sys_interval`, and takes the retained values the broker published before it
connected (they already hold the whole run and nothing of the reader; what it receives itself is only counted
in the next publication, which it never reads).

Per round, without start-up (presence, election, round 0) and finish: each configuration runs twice, with
`--max-rounds` SHORT and LONG (default 1 and 4), on a fresh broker each, and a figure per round is
(counter(LONG) - counter(SHORT)) / (LONG - SHORT). Start-up and finish cost the same in both runs but for the
heartbeats (time-proportional, ~1 small message a second) and the odd election retry: a few hundred bytes against
rounds of megabytes. A run whose rounds are not all of one term with T trainers is flagged ("unclean").

Model bytes: the parameter count (read from the run's checkpoint, the wire's weights format) times the wire dtype's
size: one model's values as they travel. Copies per round = delivered bytes per round / model bytes; the goal is
N-1+T copies (T solutions to the controller, the new model to the N-1 others), so goal ratio = delivered per round
/ (N-1+T) / model bytes (1.0 = the goal met, control messages aside).

Time: from the LONG run. s/round is the median of rounds.csv `duration_s` (training order to metrics); the
overhead of a round is its duration minus its slowest fit and its slowest evaluation (the `seconds` of the peers'
`job-done` events, events.jsonl); a round whose model no peer evaluated gives the overhead without it, marked `*`.
Timings are wall-clock on a machine whose cores may be shared with other work: noisy.
Bytes are exact.

`--accuracy`: cnn-small, N=5, T=4, 2000 training samples a peer, 10 rounds, per wire dtype (`--repeats` times, the
dtypes taking turns): the final global accuracy of each and the difference of their means (the goal: within 0.005).
Mind the noise: the controller (which neither trains nor evaluates) is elected at random, so its shard is left out
of training and of the global metric, and two float32 runs differ by about as much as the goal (0.8258 and 0.8300
with controllers peer-3 and peer-5 on this machine); the spread of the repeats is printed to judge by.

`--legacy` runs code that has no --model and --wire-dtype: the flags are left out and the model is named in the
peers' environment as FL_MODEL (which that code ignores unless patched to read it); only float32 is possible.
A benchmark, not a test: it prints figures and asserts nothing about them.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from peer.node.signals import StopSignals
from peer.records.events import read_events
from peer.records.run_dir import BROKER_LOG_FILE, CheckpointError, load_run, read_checkpoint
from peer.wire.errors import ProtocolError
from peer.wire.weights import WeightCodec
from scripts.localnet import Broker, LocalNetwork, split_peer_args

MODELS = ("cnn-small", "seed-cnn")
DTYPES = ("float32", "float16")
ITEMSIZE = {"float32": 4, "float16": 2}
SYS_INTERVAL_S = 1
SYS_PREFIX = "$SYS/broker/"
# the counters read: payload bytes published and delivered, and every byte on the wire each way
COUNTERS = ("publish/bytes/received", "publish/bytes/sent", "bytes/received", "bytes/sent")
LEGACY_MODEL_ENV = "FL_MODEL"
ACCURACY_GOAL = 0.005
NOISE_NOTE = (
    "timings: wall-clock on a machine whose cores may be shared with other work, so noisy; "
    "bytes: the broker's own counters, exact"
)


# --- the broker's $SYS counters ---------------------------------------------------------------------------------------


def parse_sys_value(topic: str, payload: bytes) -> tuple[str, int] | None:
    """(counter, value) of a `$SYS/broker/<counter>` message carrying one whole number, None for anything else
    (a load average, the version, another topic)."""
    if not topic.startswith(SYS_PREFIX):
        return None
    try:
        text = payload.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if not re.fullmatch(r"\d+", text):
        return None
    return topic[len(SYS_PREFIX) :], int(text)


class SysBroker(Broker):
    """The project's local broker, publishing its $SYS tree every SYS_INTERVAL_S seconds."""

    def _write_conf(self) -> None:
        super()._write_conf()
        lines = [line for line in self.conf.read_text().splitlines() if not line.startswith("sys_interval")]
        self.conf.write_text("\n".join([*lines, f"sys_interval {SYS_INTERVAL_S}"]) + "\n")


def read_counters(port: int, counters=COUNTERS, timeout: float = 10.0) -> dict[str, int]:
    """The broker's retained $SYS values of `counters`, as published before this reader connected."""
    import paho.mqtt.client as mqtt

    values: dict[str, int] = {}
    client = mqtt.Client(callback_api_version=mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)

    def on_message(client, userdata, message):
        parsed = parse_sys_value(message.topic, bytes(message.payload))
        # only the retained copy: a live one would already count this reader's own deliveries
        if parsed and message.retain and parsed[0] in counters and parsed[0] not in values:
            values[parsed[0]] = parsed[1]

    client.on_message = on_message
    client.connect("127.0.0.1", port)
    client.subscribe([(SYS_PREFIX + name, 0) for name in counters])
    client.loop_start()
    deadline = time.monotonic() + timeout
    while len(values) < len(counters) and time.monotonic() < deadline:
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    missing = [name for name in counters if name not in values]
    if missing:
        raise RuntimeError(f"the broker published no {', '.join(missing)} within {timeout:.0f} s")
    return values


def per_round(short: dict[str, int], long: dict[str, int], short_rounds: int, long_rounds: int) -> dict[str, float]:
    """Each counter's growth per round between a run of `short_rounds` and one of `long_rounds`."""
    if long_rounds <= short_rounds:
        raise ValueError("the long run must have more rounds than the short one")
    return {name: (long[name] - short[name]) / (long_rounds - short_rounds) for name in long if name in short}


# --- the peers' events -------------------------------------------------------------------------------------------------


@dataclass
class JobTimes:
    """Seconds of the fits and evaluations of one round, over every peer (their `job-done` events)."""

    fits: list[float] = field(default_factory=list)
    evaluations: list[float] = field(default_factory=list)


def job_times(events: list[dict]) -> dict[int, JobTimes]:
    """Per round, the seconds of every fit and evaluation that ended without error (events.jsonl `job-done`)."""
    rounds: dict[int, JobTimes] = {}
    for event in events:
        if event.get("event") != "job-done" or event.get("error") or not isinstance(event.get("round"), int):
            continue
        times = rounds.setdefault(event["round"], JobTimes())
        if event.get("kind") == "fit":
            times.fits.append(float(event["seconds"]))
        elif event.get("kind") == "evaluate":
            times.evaluations.append(float(event["seconds"]))
    return rounds


@dataclass(frozen=True)
class RoundTime:
    round: int
    duration_s: float
    slowest_fit_s: float | None
    slowest_evaluation_s: float | None  # None: no peer evaluated this round's model

    @property
    def overhead_s(self) -> float | None:
        """The round's duration beyond its slowest fit and slowest evaluation (beyond the fit alone when no
        evaluation is known); None without a fit."""
        if self.slowest_fit_s is None:
            return None
        return self.duration_s - self.slowest_fit_s - (self.slowest_evaluation_s or 0.0)


def round_times(durations: dict[int, float], jobs: dict[int, JobTimes]) -> list[RoundTime]:
    """Each round of rounds.csv (round -> duration_s; rounds above 0) with its slowest fit and evaluation."""
    result = []
    for number in sorted(durations):
        times = jobs.get(number, JobTimes())
        result.append(
            RoundTime(
                number,
                durations[number],
                max(times.fits, default=None),
                max(times.evaluations, default=None),
            )
        )
    return result


# --- the model's size -------------------------------------------------------------------------------------------------


def count_parameters(weights: bytes) -> int | None:
    """Parameters in a weights blob of the wire's format (`WeightCodec`, the one reader of it); None if it is not one."""
    try:
        return sum(int(t.size) for t in WeightCodec.decode(weights))
    except ProtocolError:
        return None


def model_parameters(run_dir: Path) -> int | None:
    try:
        checkpoint = read_checkpoint(run_dir)
    except CheckpointError:
        return None
    return count_parameters(checkpoint.weights) if checkpoint else None


# --- one federation ---------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One federation as measured: the broker's counters once it was quiet, and what the records say."""

    run_dir: str
    rounds: int
    counters: dict[str, int]
    wall_s: float
    clean: bool
    problems: list[str]
    parameters: int | None
    durations: dict[int, float]
    controller_bytes: dict[int, int]  # rounds.csv bytes_sent: the controller's own count of the round's payloads
    final_accuracy: float | None
    controller: str | None  # who led the first term


def check_run(history, rounds: int, trainers: int) -> list[str]:
    """What makes a run unfit for per-round figures: missing rounds, more than one term, fewer trainers."""
    problems = []
    numbers = [r.round for r in history.rounds]
    if numbers != list(range(1, rounds + 1)):
        problems.append(f"rounds.csv holds rounds {numbers}, not 1..{rounds}")
    terms = {e.term for e in history.elections} | {r.term for r in history.rounds}
    if len(terms) > 1:
        problems.append(f"{len(terms)} terms ({sorted(terms)})")
    short = [r.round for r in history.rounds if len(r.trainers) != trainers]
    if short:
        problems.append(f"rounds {short} did not average {trainers} trainers")
    return problems


def run_federation(
    run_dir: Path, peers: int, peer_args: list[str], rounds: int, trainers: int, env: dict | None, timeout: float
) -> Run:
    run_dir.mkdir(parents=True, exist_ok=True)
    broker = SysBroker(log_path=run_dir / BROKER_LOG_FILE).start()
    started = time.monotonic()
    try:
        net = LocalNetwork(run_dir, peers, [*peer_args, "--max-rounds", str(rounds)], broker=broker, env=env)
        try:
            net.start()
            codes = net.wait(timeout)
        finally:
            net.stop()
        wall = time.monotonic() - started
        failed = {peer: code for peer, code in codes.items() if code != 0}
        if failed:
            logs = "".join(f"\n--- {p} ---\n" + "\n".join(net.peer_log(p).splitlines()[-8:]) for p in failed)
            raise RuntimeError(f"peers that did not exit 0 (None: still running after {timeout:.0f} s): {failed}{logs}")
        time.sleep(2.5 * SYS_INTERVAL_S)  # the broker publishes its quiet totals at least twice
        counters = read_counters(broker.port)
    finally:
        broker.close()
    history = load_run(run_dir)
    problems = check_run(history, rounds, trainers)
    summary = history.summary
    return Run(
        run_dir=str(run_dir),
        rounds=rounds,
        counters=counters,
        wall_s=wall,
        clean=not problems,
        problems=problems,
        parameters=model_parameters(run_dir),
        durations={r.round: r.duration_s for r in history.rounds},
        controller_bytes={r.round: r.bytes_sent for r in history.rounds},
        final_accuracy=summary.final_accuracy if summary else None,
        controller=history.elections[0].controller if history.elections else None,
    )


def peer_events(run_dir: str | Path) -> list[dict]:
    return read_events(run_dir, kinds={"job-done"})


# --- one configuration ------------------------------------------------------------------------------------------------


@dataclass
class Result:
    model: str
    dtype: str
    peers: int
    trainers: int
    model_bytes: int | None
    published_per_round: float
    delivered_per_round: float
    wire_sent_per_round: float  # every byte the broker sent (headers, acks) per round
    wire_received_per_round: float
    controller_bytes_per_round: float | None  # rounds.csv bytes_sent, mean over the long run's rounds
    s_per_round: float | None
    overhead_per_round: float | None
    overhead_without_evaluation: bool  # a round without an evaluation's seconds: overhead includes evaluating
    clean: bool
    runs: list[dict]
    rounds: list[dict]

    @property
    def copies_per_round(self) -> float | None:
        return self.delivered_per_round / self.model_bytes if self.model_bytes else None

    @property
    def goal_copies(self) -> int:
        return self.peers - 1 + self.trainers

    @property
    def goal_ratio(self) -> float | None:
        copies = self.copies_per_round
        return copies / self.goal_copies if copies is not None else None

    def to_json(self) -> dict:
        return {
            **asdict(self),
            "copies_per_round": self.copies_per_round,
            "goal_copies": self.goal_copies,
            "goal_ratio": self.goal_ratio,
        }


def summarize(model: str, dtype: str, peers: int, trainers: int, short: Run, long: Run, events: list[dict]) -> Result:
    """A configuration's figures from its SHORT and LONG runs and the LONG run's peers' events."""
    growth = per_round(short.counters, long.counters, short.rounds, long.rounds)
    parameters = long.parameters or short.parameters
    times = round_times(long.durations, job_times(events))
    overheads = [t.overhead_s for t in times if t.overhead_s is not None]
    without_evaluation = any(t.slowest_evaluation_s is None for t in times)
    controller = list(long.controller_bytes.values())
    return Result(
        model=model,
        dtype=dtype,
        peers=peers,
        trainers=trainers,
        model_bytes=parameters * ITEMSIZE[dtype] if parameters else None,
        published_per_round=growth["publish/bytes/received"],
        delivered_per_round=growth["publish/bytes/sent"],
        wire_sent_per_round=growth["bytes/sent"],
        wire_received_per_round=growth["bytes/received"],
        controller_bytes_per_round=statistics.mean(controller) if controller else None,
        s_per_round=statistics.median(long.durations.values()) if long.durations else None,
        overhead_per_round=statistics.median(overheads) if overheads else None,
        overhead_without_evaluation=without_evaluation,
        clean=short.clean and long.clean,
        runs=[asdict(short), asdict(long)],
        rounds=[{**asdict(t), "overhead_s": t.overhead_s} for t in times],
    )


# --- output -----------------------------------------------------------------------------------------------------------

TABLE_COLUMNS = (
    "model",
    "dtype",
    "model bytes",
    "published/round",
    "delivered/round",
    "copies/round",
    "goal ratio",
    "s/round",
    "overhead/round",
)


def _number(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}"


def table_row(result: Result) -> list[str]:
    overhead = _number(result.overhead_per_round, 2)
    if result.overhead_per_round is not None and result.overhead_without_evaluation:
        overhead += "*"
    return [
        result.model + ("" if result.clean else " (unclean)"),
        result.dtype,
        _number(result.model_bytes),
        _number(result.published_per_round),
        _number(result.delivered_per_round),
        _number(result.copies_per_round, 2),
        _number(result.goal_ratio, 2),
        _number(result.s_per_round, 2),
        overhead,
    ]


def format_table(header: tuple[str, ...] | list[str], rows: list[list[str]]) -> str:
    """A markdown table, columns padded to their widest cell; text left, figures right."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    numeric = [all(re.match(r"^-?[0-9n]", str(row[i])) for row in rows) and bool(rows) for i in range(len(header))]

    def line(cells):
        return (
            "| "
            + " | ".join(str(c).rjust(w) if num else str(c).ljust(w) for c, w, num in zip(cells, widths, numeric))
            + " |"
        )

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric)) + "|"
    return "\n".join([line(header), rule, *(line(row) for row in rows)])


def table_notes(results: list[Result], short: int, long: int) -> list[str]:
    notes = [
        f"bytes per round: broker $SYS payload counters, (run of {long} rounds - run of {short}) / {long - short};"
        " delivered counts every subscriber a message reached, the sender included",
        "model bytes: parameters x the wire dtype's size; goal: N-1+T copies a round "
        f"({', '.join(sorted({str(r.goal_copies) for r in results}))}); goal ratio = copies / goal",
        f"s/round and overhead/round (duration - slowest fit - slowest evaluation): medians over the {long}-round"
        " run's rounds",
        NOISE_NOTE,
    ]
    if any(r.overhead_without_evaluation and r.overhead_per_round is not None for r in results):
        notes.append("*: a round without an evaluation's seconds, so this overhead still includes the evaluation")
    for r in results:
        for run in r.runs:
            for problem in run["problems"]:
                notes.append(f"unclean: {r.model} {r.dtype}, {run['rounds']}-round run: {problem}")
    return notes


def _mean(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.mean(known) if known else None


def accuracy_table(finals: dict[str, list[float | None]]) -> str:
    """Per wire dtype: every run's final accuracy, their mean and spread (max - min)."""
    rows = []
    for dtype, values in finals.items():
        known = [v for v in values if v is not None]
        rows.append(
            [
                dtype,
                ", ".join(_number(v, 4) for v in values),
                _number(_mean(values), 4),
                _number(max(known) - min(known) if len(known) > 1 else None, 4),
            ]
        )
    return format_table(("dtype", "final accuracy of each run", "mean", "spread"), rows)


def accuracy_difference(finals: dict[str, list[float | None]]) -> float | None:
    """mean(float16) - mean(float32), None unless both are known."""
    low, full = _mean(finals.get("float16", [])), _mean(finals.get("float32", []))
    return None if low is None or full is None else low - full


# --- the command ------------------------------------------------------------------------------------------------------


def _choices(allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)} (comma-separated), not {text!r}")
        return names

    return parse


def config_args(model: str, dtype: str, legacy: bool) -> tuple[list[str], dict]:
    """The peer flags and environment naming a configuration."""
    if legacy:
        return [], {LEGACY_MODEL_ENV: model}
    return ["--model", model, "--wire-dtype", dtype], {}


def main(argv: list[str] | None = None) -> int:
    with StopSignals():  # SIGTERM ends the run like Ctrl-C: the network is stopped on the way out
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv, extra = split_peer_args(argv)
    parser = argparse.ArgumentParser(
        prog="python -m scripts.bench_wire",
        description=__doc__.split("\n\n")[0],
        epilog="Flags after -- go to every peer, after the bench's own.",
    )
    parser.add_argument(
        "--models", type=_choices(MODELS), default=list(MODELS), help=f"comma-separated (default {','.join(MODELS)})"
    )
    parser.add_argument(
        "--dtypes",
        type=_choices(DTYPES),
        default=None,
        help=f"wire dtypes, comma-separated (default {','.join(DTYPES)}; float32 with --legacy)",
    )
    parser.add_argument(
        "--legacy",
        action="store_true",
        help=f"code without --model/--wire-dtype: leave the flags out, name the model in "
        f"{LEGACY_MODEL_ENV}; float32 only",
    )
    parser.add_argument(
        "--accuracy",
        action="store_true",
        help="instead: final accuracy after 10 rounds per wire dtype (cnn-small, 2000 train samples)",
    )
    parser.add_argument("--peers", type=int, default=5, help="N (default 5)")
    parser.add_argument("--trainers", type=int, default=4, help="T, also --min-solutions (default 4)")
    parser.add_argument(
        "--rounds",
        type=int,
        nargs=2,
        default=(1, 4),
        metavar=("SHORT", "LONG"),
        help="--max-rounds of the two runs per configuration (default 1 4)",
    )
    parser.add_argument("--train-samples", type=int, default=None, help="per peer (default 1000; 2000 --accuracy)")
    parser.add_argument("--test-samples", type=int, default=None, help="per peer (default 500; 2000 --accuracy)")
    parser.add_argument("--accuracy-rounds", type=int, default=10, help="rounds of --accuracy (default 10)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per wire dtype of --accuracy (default 1)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds a federation may take (default 1800)")
    parser.add_argument("--run-dir", type=Path, default=None, help="records folder (default: a temporary one)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    dtypes = args.dtypes or (["float32"] if args.legacy else list(DTYPES))
    if args.legacy and dtypes != ["float32"]:
        parser.error("--legacy: the older code sends float32 only (--dtypes float32)")
    if args.peers < 2 or not 1 <= args.trainers < args.peers:
        parser.error("need --peers >= 2 and 1 <= --trainers < --peers (the controller never trains)")
    short_rounds, long_rounds = args.rounds
    if not 1 <= short_rounds < long_rounds:
        parser.error("--rounds SHORT LONG needs 1 <= SHORT < LONG")
    base = args.run_dir or Path(tempfile.mkdtemp(prefix="fl-bench-wire-"))
    models = ["cnn-small"] if args.accuracy else args.models
    train = args.train_samples or (2000 if args.accuracy else 1000)
    test = args.test_samples or (2000 if args.accuracy else 500)
    common = [
        "--dataset",
        "fashion-mnist",
        "--train-samples",
        str(train),
        "--test-samples",
        str(test),
        "--epochs",
        "1",
        "--trainers",
        str(args.trainers),
        "--min-solutions",
        str(args.trainers),
        "--min-peers",
        str(args.peers),
        "--target-accuracy",
        "1.0",
        "--round-deadline",
        "600",
    ]

    print(
        f"bench_wire: N={args.peers} peers, T={args.trainers} trainers, models {','.join(models)}, wire dtypes "
        f"{','.join(dtypes)}{' (legacy peers)' if args.legacy else ''}; records in {base}",
        flush=True,
    )
    print(f"peer flags: {' '.join(common + extra)}", flush=True)
    began = time.monotonic()
    if args.accuracy:
        finals: dict[str, list[float | None]] = {dtype: [] for dtype in dtypes}
        controllers: dict[str, list[str | None]] = {dtype: [] for dtype in dtypes}
        for repeat in range(1, args.repeats + 1):
            for dtype in dtypes:
                flags, env = config_args("cnn-small", dtype, args.legacy)
                run = run_federation(
                    base / f"accuracy-{dtype}-{repeat}",
                    args.peers,
                    [*common, *flags, *extra],
                    args.accuracy_rounds,
                    args.trainers,
                    env,
                    args.timeout,
                )
                finals[dtype].append(run.final_accuracy)
                controllers[dtype].append(run.controller)
                print(
                    f"cnn-small {dtype} #{repeat}: final accuracy {_number(run.final_accuracy, 4)} after "
                    f"{args.accuracy_rounds} rounds, controller {run.controller} ({run.wall_s:.0f} s"
                    f"{'' if run.clean else '; unclean: ' + '; '.join(run.problems)})",
                    flush=True,
                )
        print()
        print(accuracy_table(finals))
        print()
        difference = accuracy_difference(finals)
        if difference is not None:
            verdict = "within" if abs(difference) <= ACCURACY_GOAL else "NOT within"
            print(f"- float16 - float32 (means): {difference:+.4f} ({verdict} the goal of {ACCURACY_GOAL})")
        print(
            "- noise: the controller, elected at random, neither trains nor evaluates, so each run leaves out "
            "another shard; compare the difference with the spread of the repeats"
        )
        print(f"- {NOISE_NOTE}")
        print(f"- total {time.monotonic() - began:.0f} s")
        if args.json:
            args.json.write_text(
                json.dumps(
                    {
                        "mode": "accuracy",
                        "final_accuracy": finals,
                        "controllers": controllers,
                        "difference": difference,
                    },
                    indent=2,
                )
                + "\n"
            )
            print(f"- written to {args.json}")
        return 0

    results: list[Result] = []
    for model in models:
        for dtype in dtypes:
            flags, env = config_args(model, dtype, args.legacy)
            runs = []
            for rounds in (short_rounds, long_rounds):
                run = run_federation(
                    base / f"{model}-{dtype}-{rounds}r",
                    args.peers,
                    [*common, *flags, *extra],
                    rounds,
                    args.trainers,
                    env,
                    args.timeout,
                )
                runs.append(run)
                print(
                    f"{model} {dtype} {rounds} round(s): {run.wall_s:.0f} s, published "
                    f"{run.counters['publish/bytes/received']:,} B, delivered {run.counters['publish/bytes/sent']:,}"
                    f" B{'' if run.clean else '; unclean: ' + '; '.join(run.problems)}",
                    flush=True,
                )
            result = summarize(model, dtype, args.peers, args.trainers, runs[0], runs[1], peer_events(runs[1].run_dir))
            results.append(result)
    print()
    print(format_table(TABLE_COLUMNS, [table_row(r) for r in results]))
    print()
    for note in table_notes(results, short_rounds, long_rounds):
        print(f"- {note}")
    print(f"- total {time.monotonic() - began:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"mode": "wire", "rounds": [short_rounds, long_rounds], "results": [r.to_json() for r in results]},
                indent=2,
            )
            + "\n"
        )
        print(f"- written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
