"""Flower's simulation on the work of scripts.bench_floor: the yardstick of issue 21 ("wall <= 0.8x Flower's").

    /work/flower-venv/bin/python -m scripts.bench_flower [--models seed-cnn,cnn-small] [--rounds 10] [--workers 2]
    /work/flower-venv/bin/python -m scripts.bench_flower --paper [--rounds 3]      (--rounds 20 for the full run)

Run from the repository root with a Python that has Flower (with its Ray extra) and TensorFlow, NOT the project's
.venv: Flower is no dependency of the project. Here that is /work/flower-venv (flwr[simulation] 1.41, Ray 2.55,
tensorflow-cpu 2.21); elsewhere `python -m venv V && V/bin/pip install "flwr[simulation]==1.41.0"
tensorflow-cpu==2.21.0`. The project's own modules (peer.learning: data, models, learner) need only NumPy, so the
shards, the model and the fit and evaluate calls are the project's own, and Flower does exactly the federation's work:

- the default configuration is bench_floor's: Fashion-MNIST, 5 clients on shards 0/5..4/5 (`load_shard`, 2,000
  training samples each, the default test shard), the same Keras model (`peer.learning.learner.Learner`, built by
  `peer.learning.models.build(model, (28, 28, 1), 10, seed=42)`), 1 local epoch, batch 32, FedAvg, 10 rounds;
  4 clients fit a round and 4 evaluate the new model (every client but one, as every peer but the controller
  does), and 4 evaluate the initial model before round 1 (the federation's round 0);
- `--paper`, bench_paper's: the FedAvg paper's protocol (100 clients of 600 samples, 10 fit a round, 5 epochs,
  batch 10, `fedavg-cnn`), 99 clients evaluating every round's model on their 100 test samples.

Flower 1.41's own API: a ServerApp running the message-based `flwr.serverapp.strategy.FedAvg` (`fraction_train` and
`min_train_nodes` so that exactly the fit count trains), a ClientApp with train, evaluate and query functions, run by
`flwr.simulation.run_simulation` on the Ray backend with `--workers` actors (Ray given that many CPUs, each client
one). What this script chooses where Flower leaves the choice to its user (each in favour of Flower's speed):

- each Ray actor keeps one Keras model per configuration and the shards of the clients it served (as the project's
  learning service does), instead of building the model (and tracing its functions) at every message;
- TensorFlow's pools in each actor: `configure_threads(cores // workers)` (1 intra-op and 1 inter-op thread with
  2 workers on 2 cores), so the actors share the cores instead of each sizing its pools to every core;
- the ServerApp builds no model: it asks one client for the initial weights (a query message, as Flower's older
  strategies did when given no initial parameters), then has the initial model evaluated by the clients;
- Flower's and Ray's telemetry off (FLWR_TELEMETRY_ENABLED=0, RAY_USAGE_STATS_ENABLED=0): no network here.

What Flower does of its own that weighs on the figures (Flower 1.41, Ray 2.55):

- `flwr.simulation` imports TensorFlow whenever it is installed (flwr/simulation/ray_transport/utils.py, for its
  GPU-growth helper): the run's own process (the ServerApp's) and every actor pay its import and memory, whether
  they use it or not;
- Ray starts its GCS server, raylet, a minimal dashboard (even with `include_dashboard=False`), its autoscaler
  monitor, log monitor, dashboard and runtime-env agents, and the actors' worker processes: all children of the run's
  process, all in its PSS; Ray sets OMP_NUM_THREADS to an actor's CPUs (1) but not TensorFlow's own pools;
- messages move by polling: the ServerApp's grid pulls replies every 0.1 s, the simulation engine takes queued
  messages every 0.1 s;
- each phase's clients are sampled at random (`random.sample` over the node ids), so which shards train varies from
  round to round (the work of a round does not); the strategy evaluates no initial model of itself (round 0 here is
  this script's, on the clients, as the federation's).

Printed per run:

- wall: from the launch of the run's process (`python -m scripts.bench_flower --run`, a subprocess of this one) to
  its exit, start-up included (Python, Flower, Ray's processes, TensorFlow in each actor, shards, the model, the
  initial weights and round 0's evaluations);
- start-up: from that launch to the beginning of the first fit (a timestamp the client's train function records);
- rounds: from the strategy's `configure_train` (Flower's configure_fit) to the end of its `aggregate_evaluate`, in
  the ServerApp's process: sampling, sending, the fits, FedAvg, the evaluations and their aggregation; median of them;
- PSS: the peak sum over the whole process tree (Ray's GCS, raylet and actors included), sampled every 0.2 s;
- accuracy after each round (round 0: the initial model), weighted by test samples as the federation's.

A benchmark, not a test: it prints what it measured and asserts nothing. Run it interleaved with bench_floor on a
quiet machine, and say what else ran on the machine when you quote it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scripts.bench_floor import PeakPss, format_figure

ROOT = Path(__file__).resolve().parent.parent
DATASET, INPUT_SHAPE, NUM_CLASSES, SEED = "fashion-mnist", (28, 28, 1), 10, 42


@dataclass(frozen=True)
class Work:
    """What one configuration does: its clients, fits, evaluations and local training."""

    clients: int
    fit: int
    epochs: int
    batch: int
    train_samples: int | None  # None: the whole shard
    models: str
    rounds: int

    @property
    def evaluators(self) -> int:
        return self.clients - 1  # every client but one, as every peer but the controller


FLOOR = Work(clients=5, fit=4, epochs=1, batch=32, train_samples=2000, models="seed-cnn,cnn-small", rounds=10)
PAPER = Work(clients=100, fit=10, epochs=5, batch=10, train_samples=None, models="fedavg-cnn", rounds=3)


# --- the client side: runs in Ray's actors ----------------------------------------------------------------------------

# Per actor process: the base Learner of each configuration (its Keras model) and each client's shard.
_learners: dict[tuple[str, int, int], Any] = {}
_shards: dict[Any, Any] = {}  # ShardSpec -> Shard


def _learner(config, context):
    """This client's Learner: the actor's model for the configuration, the client's shard (both kept)."""
    from peer.learning import models
    from peer.learning.data import ShardSpec, load_shard
    from peer.learning.learner import Learner

    model, epochs, batch = str(config["model"]), int(config["epochs"]), int(config["batch"])
    samples = int(config["train-samples"]) or None
    partition, partitions = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    key = (model, epochs, batch)
    if key not in _learners:
        # Before Keras's first import in this process: its pools are sized once, at the import.
        models.configure_threads(int(config["threads"]))
        _learners[key] = Learner(DATASET, None, epochs, batch, SEED, model)
        _learners[key].prepare()
    spec = ShardSpec(DATASET, shard=partition, num_shards=partitions, seed=SEED, train_samples=samples)
    if spec not in _shards:
        _shards[spec] = load_shard(spec)
    return _learners[key].twin(_shards[spec])


def _reply(message, **records):
    from flwr.app import Message, RecordDict

    return Message(RecordDict(records), reply_to=message)


def _train(message, context):
    from flwr.app import ArrayRecord, MetricRecord

    started = time.time()  # the start-up ends at the first of these
    config = message.content["config"]
    weights, samples, loss = _learner(config, context).fit(message.content["arrays"].to_numpy_ndarrays())
    metrics = MetricRecord({"num-examples": samples, "train-loss": loss, "fit-started": started})
    return _reply(message, arrays=ArrayRecord(weights), metrics=metrics)


def _evaluate(message, context):
    from flwr.app import MetricRecord

    learner = _learner(message.content["config"], context)
    accuracy, loss, samples = learner.evaluate(message.content["arrays"].to_numpy_ndarrays())
    return _reply(message, metrics=MetricRecord({"num-examples": samples, "accuracy": accuracy, "loss": loss}))


def _query(message, context):
    """The initial weights (seeded: the same on every client), and what this actor's TensorFlow runs with."""
    from flwr.app import ArrayRecord, ConfigRecord

    learner = _learner(message.content["config"], context)
    import tensorflow as tf

    threads = ConfigRecord(
        {
            "intra-op": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter-op": tf.config.threading.get_inter_op_parallelism_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "unset"),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"),
        }
    )
    return _reply(message, arrays=ArrayRecord(learner.initial_weights()), threads=threads)


def client_app():
    from flwr.clientapp import ClientApp

    app = ClientApp()
    app.train()(_train)
    app.evaluate()(_evaluate)
    app.query()(_query)
    return app


# --- the server side: runs in the run's process, in a thread of run_simulation ----------------------------------------


def _errors(replies) -> None:
    failed = [reply.error.reason for reply in replies if reply.has_error()]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(replies)} clients failed: {failed[0]}")


def _timed_fedavg(record: dict, **options):
    """Flower's FedAvg, timing its rounds and keeping the first fit's start and each round's accuracy in `record`."""
    from flwr.serverapp.strategy import FedAvg

    class TimedFedAvg(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            record["round_started"] = time.monotonic()
            return super().configure_train(server_round, arrays, config, grid)

        def aggregate_train(self, server_round, replies):
            replies = list(replies)
            _errors(replies)
            started = min(float(reply.content["metrics"]["fit-started"]) for reply in replies)
            record["first_fit"] = min(record.get("first_fit", started), started)
            return super().aggregate_train(server_round, replies)

        def aggregate_evaluate(self, server_round, replies):
            replies = list(replies)
            _errors(replies)
            metrics = super().aggregate_evaluate(server_round, replies)
            if server_round > 0:
                record["rounds"].append(time.monotonic() - record["round_started"])
            record["accuracy"].append(float(metrics["accuracy"]))
            return metrics

    return TimedFedAvg(**options)


def server_app(plan: dict, record: dict):
    from flwr.app import ConfigRecord, Message, MessageType, RecordDict
    from flwr.serverapp import ServerApp
    from flwr.serverapp.strategy.strategy_utils import sample_nodes

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        clients, config = plan["clients"], ConfigRecord(plan["config"])
        strategy = _timed_fedavg(
            record,
            fraction_train=plan["fit"] / clients,
            min_train_nodes=plan["fit"],
            fraction_evaluate=plan["evaluators"] / clients,
            min_evaluate_nodes=plan["evaluators"],
            min_available_nodes=clients,
        )
        (first,), _ = sample_nodes(grid, clients, 1)  # waits for every client to be registered
        query = Message(RecordDict({"config": config}), dst_node_id=first, message_type=MessageType.QUERY)
        (reply,) = list(grid.send_and_receive([query]))
        _errors([reply])
        record["threads"] = dict(reply.content["threads"])
        initial = reply.content["arrays"]
        # Round 0: the initial model evaluated as every round's is (Flower's strategy starts with round 1's fits).
        strategy.aggregate_evaluate(0, grid.send_and_receive(strategy.configure_evaluate(0, initial, config, grid)))
        strategy.start(grid, initial, plan["rounds"], train_config=config, evaluate_config=config)

    return app


def simulate(plan: dict) -> dict:
    """Runs in the run's process (`--run`): one Flower simulation of the plan. Returns what it recorded."""
    from flwr.simulation import run_simulation

    record: dict = {"rounds": [], "accuracy": []}
    run_simulation(
        server_app=server_app(plan, record),
        client_app=client_app(),
        num_supernodes=plan["clients"],
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": plan["workers"], "include_dashboard": False},
        },
    )
    record["first_fit_at"] = record.pop("first_fit", None)
    record.pop("round_started", None)
    return record


# --- the measuring side: this script's process ------------------------------------------------------------------------


def _started_at(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # starttime: a reused pid has another
    except (OSError, IndexError):
        return None


class TreeWatch(PeakPss):
    """The peak sum of PSS over a process tree, sampled every 0.2 s, and every process seen in it (Ray's included),
    so that none is left running after the run."""

    def __init__(self, root: int):
        super().__init__(lambda: [root])
        self.seen: dict[int, str | None] = {}

    def sampled(self, pids: set[int]) -> None:
        for pid in pids:
            self.seen.setdefault(pid, _started_at(pid))

    def leftovers(self) -> list[int]:
        return [pid for pid, started in self.seen.items() if started and _started_at(pid) == started]

    def end_leftovers(self, grace_s: float = 10.0) -> list[int]:
        """Processes of the tree still running after its root ended (Ray's, if its shutdown failed): terminated, then
        killed. Returns those there were."""
        deadline = time.monotonic() + grace_s
        while self.leftovers() and time.monotonic() < deadline:
            time.sleep(0.2)  # Ray's processes end on their own shortly after the driver
        left = self.leftovers()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.leftovers():
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
            time.sleep(2)
        return left


@dataclass
class Figures:
    what: str
    wall_s: float
    startup_s: float | None
    rounds: list[float]
    pss_mb: float
    accuracy: list[float] = field(default_factory=list)

    @property
    def round_s(self) -> float | None:
        return statistics.median(self.rounds) if self.rounds else None


def run(model: str, work: Work, workers: int) -> Figures:
    """One simulation in a process of its own, measured from outside."""
    plan = {
        "clients": work.clients,
        "fit": work.fit,
        "evaluators": work.evaluators,
        "rounds": work.rounds,
        "workers": workers,
        "config": {
            "model": model,
            "epochs": work.epochs,
            "batch": work.batch,
            "train-samples": work.train_samples or 0,
            "threads": max(1, (os.cpu_count() or 1) // workers),
        },
    }
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "FLWR_TELEMETRY_ENABLED": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    with tempfile.TemporaryDirectory(prefix="fl-bench-flower-") as folder:
        out, log = Path(folder) / "record.json", Path(folder) / "run.log"
        command = [sys.executable, "-m", "scripts.bench_flower", "--run", json.dumps(plan), "--out", str(out)]
        with open(log, "wb") as output:
            launched, started = time.time(), time.monotonic()
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
            with TreeWatch(proc.pid) as watch:
                try:
                    proc.wait()
                finally:  # interrupted: the run and Ray's processes end with this script
                    if proc.poll() is None:
                        proc.terminate()
                        proc.wait()
                        watch.end_leftovers(grace_s=0)
            wall = time.monotonic() - started
        left = watch.end_leftovers()
        if left:
            print(f"bench_flower: {len(left)} processes of the run outlived it, now ended: {left}", file=sys.stderr)
        if proc.returncode != 0 or not out.is_file():
            tail = log.read_text(errors="replace").splitlines()[-40:]
            raise SystemExit(f"bench_flower: the {model} run failed (exit {proc.returncode}):\n" + "\n".join(tail))
        record = json.loads(out.read_text())
    threads = ", ".join(f"{name} {value}" for name, value in record["threads"].items())
    print(f"  ({model}: {len(watch.seen)} processes in the tree; TensorFlow in an actor: {threads})", flush=True)
    first_fit = record["first_fit_at"]
    return Figures(
        f"flower {model}",
        wall,
        first_fit - launched if first_fit else None,
        record["rounds"],
        watch.peak_kb / 1024,
        record["accuracy"],
    )


def table(results: list[Figures]) -> str:
    lines = [
        "| run | wall s | median round s | start-up s | PSS GB | final accuracy |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for figures in results:
        final = figures.accuracy[-1] if figures.accuracy else None
        lines.append(
            f"| {figures.what} | {format_figure(figures.wall_s)} | {format_figure(figures.round_s, 2)} | "
            f"{format_figure(figures.startup_s)} | {figures.pss_mb / 1024:.2f} | {format_figure(final, 4)} |"
        )
    return "\n".join(lines)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_flower", description=__doc__.split("\n\n")[0])
    parser.add_argument("--paper", action="store_true", help="the FedAvg paper's protocol (bench_paper's work)")
    parser.add_argument("--models", help=f"default {FLOOR.models}; with --paper, {PAPER.models}")
    parser.add_argument("--rounds", type=int, help=f"default {FLOOR.rounds}; with --paper, {PAPER.rounds}")
    parser.add_argument("--workers", type=int, default=2, help="Ray actors, fits or evaluations at once (default 2)")
    parser.add_argument("--clients", type=int, help="fewer clients, for a quick check (default 5; --paper 100)")
    parser.add_argument("--train-samples", type=int, help="per client, for a quick check (default 2000; --paper all)")
    parser.add_argument("--run", metavar="PLAN", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run:
        from scripts import bench_flower  # this module by its name: Ray's actors import the client functions so

        record = bench_flower.simulate(json.loads(args.run))
        Path(args.out).write_text(json.dumps(record))
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # ends the run under way and its Ray processes too
    base = PAPER if args.paper else FLOOR
    work = Work(
        clients=base.clients if args.clients is None else args.clients,
        fit=base.fit,
        epochs=base.epochs,
        batch=base.batch,
        train_samples=base.train_samples if args.train_samples is None else args.train_samples,
        models=args.models or base.models,
        rounds=base.rounds if args.rounds is None else args.rounds,
    )
    if work.rounds < 1 or args.workers < 1:
        parser.error("--rounds and --workers must be at least 1")
    if work.clients <= work.fit:
        parser.error(f"--clients must be more than the {work.fit} that fit a round (one client only evaluates)")
    if work.train_samples is not None and work.train_samples < 1:
        parser.error("--train-samples must be at least 1")
    missing = [name for name in ("flwr", "ray", "tensorflow") if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(
            f"this Python ({sys.executable}) lacks {', '.join(missing)}: run the script with a venv that has "
            "flwr[simulation] and tensorflow-cpu (e.g. /work/flower-venv/bin/python), from the repository root"
        )
    from peer.learning.data import DatasetError, ShardSpec, load_shard
    from peer.learning.models import ModelError, check_spec

    try:
        for model in work.models.split(","):
            check_spec(model)
    except ModelError as err:
        parser.error(str(err))

    try:  # the labels only: a missing dataset says how to get it here, not in a Ray actor's traceback
        load_shard(ShardSpec(DATASET, shard=0, num_shards=work.clients, seed=SEED), images=False)
    except DatasetError as err:
        parser.error(str(err))
    samples = "all" if work.train_samples is None else f"{work.train_samples:,}"
    print(
        f"bench_flower: Flower {_version('flwr')}, Ray {_version('ray')}, TensorFlow "
        f"{_version('tensorflow-cpu') if _version('tensorflow-cpu') != '-' else _version('tensorflow')}; "
        f"{work.clients} clients, {work.fit} fit x {samples} samples a round, {work.epochs} epoch(s), batch "
        f"{work.batch}, {work.evaluators} evaluate, {work.rounds} rounds, {DATASET}; {args.workers} Ray workers; "
        f"{os.cpu_count()} cores; load before: {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    results = []
    for model in work.models.split(","):
        figures = run(model, work, args.workers)
        results.append(figures)
        print(
            f"{figures.what}: wall {figures.wall_s:.1f} s, start-up {format_figure(figures.startup_s)} s, median round "
            f"{format_figure(figures.round_s, 2)} s, rounds {' '.join(f'{d:.2f}' for d in figures.rounds)}; "
            f"accuracy after each round (0: the initial model) {' '.join(f'{a:.4f}' for a in figures.accuracy)}",
            flush=True,
        )
    print()
    print(table(results))
    print(f"\nload after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
