"""`python -m peer.learning.service`: the learning of the peers of one machine, in one process.

    python -m peer.learning.service --socket PATH [--workers W] [--threads T] [--nice N]

Peers that share a machine share its cores. A peer process does not import TensorFlow: it sends its learning jobs
(fit, evaluate, save) to this service over a local socket (`peer.learning.link`), and the service runs them, W at a
time, each on a Keras model of its own per worker, with TensorFlow's thread pools sized to the machine (T threads in
all) instead of every process sizing them to every core. So:

- the machine's cores are never oversubscribed however many peers it runs (the federation's rounds at the compute
  floor: the same fits and evaluations done in turn by one process);
- a peer's MQTT keepalive and heartbeats never wait for its own training (no GIL-heavy work in the peer, and the
  service runs at a lower priority, `--nice`);
- TensorFlow is imported once per machine, while the peers connect and elect (start-up in seconds), and its memory
  is paid once, not per peer.

The launchers start one service per run of local peers (`--learning-service PATH` for the peers); a peer started
without one (a container, a peer on a machine of its own) starts a private service of its own (`--private`: it ends
with the process that started it).

A peer's data never leaves its machine: the service loads each peer's shard itself, from the same data settings
(`peer.learning.data.load_shard`). The socket is created in a folder only this user can enter.
"""

from __future__ import annotations

import argparse
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from peer.learning import link
from peer.learning.data import SHAPES, DatasetError, Shard, ShardSpec, load_shard
from peer.learning.facts import ModelFacts, facts_key, write_facts
from peer.learning.learner import Learner
from peer.learning.models import ModelError, configure_threads
from peer.wire.weights import WeightCodec

PARENT_POLL_S = 1.0


@dataclass
class Session:
    """One connected peer: what it learns on and how."""

    peer: str
    spec: ShardSpec
    model: str
    seed: int
    epochs: int
    batch_size: int
    shard: Shard

    @property
    def model_key(self) -> tuple:
        return self.model, self.spec.dataset, self.shard.num_classes, self.seed


@dataclass
class Job:
    session: Session
    op: str
    header: dict
    weights: list[np.ndarray] | None
    done: threading.Event = field(default_factory=threading.Event)
    reply: tuple[dict, list | None] = ({}, None)


class Worker:
    """One thread running jobs on Keras models of its own (one per model a session asked for)."""

    def __init__(self, service: Service, index: int):
        self.service, self.index = service, index
        self.learners: dict[tuple, Learner] = {}
        self.warm: set[tuple] = set()  # the models whose Keras functions this worker has traced
        self.thread = threading.Thread(target=self._run, name=f"learner-{index}", daemon=True)

    def _learner(self, session: Session) -> Learner:
        base = self.learners.get(session.model_key)
        if base is None:
            base = Learner(
                session.spec.dataset, session.shard, session.epochs, session.batch_size, session.seed, session.model
            )
            base.prepare()
            self.learners[session.model_key] = base
        learner = base.twin(session.shard)
        learner.epochs, learner.batch_size = session.epochs, session.batch_size
        return learner

    def _run(self) -> None:
        while True:
            job = self.service.jobs.get()
            started = time.monotonic()
            try:
                job.reply = self._do(job)
            except (ModelError, DatasetError) as err:
                job.reply = ({"ok": False, "error": str(err), "kind": type(err).__name__}, None)
            except Exception as err:  # a failed job must not kill the worker; the peer logs it and goes on
                job.reply = ({"ok": False, "error": f"{type(err).__name__}: {err}", "kind": "job"}, None)
            job.reply[0]["seconds"] = round(time.monotonic() - started, 4)
            job.done.set()

    def _do(self, job: Job) -> tuple[dict, list | None]:
        learner = self._learner(job.session)
        weights, digest = job.weights, job.header.get("digest")
        if job.op in ("fit", "evaluate", "save") and weights is None:
            return {"ok": False, "error": f"a {job.op} request needs weights", "kind": "request"}, None
        if job.op == "fit" and weights is not None:
            weights, samples, loss = learner.fit(weights, digest)
            return {"ok": True, "samples": samples, "loss": loss}, weights
        if job.op == "evaluate" and weights is not None:
            accuracy, loss, samples = learner.evaluate(weights, digest)
            return {"ok": True, "accuracy": accuracy, "loss": loss, "samples": samples}, None
        if job.op == "save" and weights is not None:
            learner.save(weights, Path(job.header["path"]))
            return {"ok": True}, None
        if job.op == "warm":
            if job.session.model_key not in self.warm:
                learner.warm()
                self.warm.add(job.session.model_key)
            return {"ok": True}, None
        if job.op == "facts":
            facts = ModelFacts(
                learner.model_name, learner.fingerprint(), learner.model_description(), learner.initial_weights()
            )
            session = job.session
            write_facts(
                facts_key(session.model, SHAPES[session.spec.dataset], session.shard.num_classes, session.seed), facts
            )
            return {
                "ok": True,
                "name": facts.name,
                "fingerprint": facts.fingerprint,
                "description": facts.description,
            }, facts.initial
        return {"ok": False, "error": f"unknown request {job.op!r}", "kind": "request"}, None


class Models:
    """The global models the service received lately, by digest: the peers of a round all fit or evaluate the same
    one, and only the first sends it (a hundred evaluations of a 6.65 MB model would be 660 MB through the socket)."""

    KEPT = 3

    def __init__(self):
        self._by_digest: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, digest: str) -> list[np.ndarray] | None:
        with self._lock:
            weights = self._by_digest.get(digest)
            if weights is not None:
                self._by_digest.move_to_end(digest)
            return weights

    def keep(self, weights: list[np.ndarray]) -> str:
        """Keep `weights` under their digest (computed here: a client's word for it would name them for every
        peer); the digest."""
        digest = WeightCodec.digest(weights)
        with self._lock:
            self._by_digest[digest] = weights
            self._by_digest.move_to_end(digest)
            while len(self._by_digest) > self.KEPT:
                self._by_digest.popitem(last=False)
        return digest


class Service:
    def __init__(self, workers: int = 1, threads: int = 1):
        self.models = Models()
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.threads = threads
        self.workers = [Worker(self, i) for i in range(workers)]
        self.sessions = 0
        self._count = threading.Lock()
        self.idle = threading.Event()

    def start(self) -> Service:
        configure_threads(self.threads)
        for worker in self.workers:
            worker.thread.start()
        # TensorFlow now, while the peers connect: the first job does not pay for its import.
        threading.Thread(target=_import_tensorflow, name="warm-up", daemon=True).start()
        return self

    def warm_up(self, session: Session) -> None:
        """Build and trace the session's model on every worker while the peers elect, before the first real job."""
        for _ in self.workers:
            self.jobs.put(Job(session, "warm", {}, None))

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=self.converse, args=(conn,), daemon=True).start()

    def converse(self, conn: socket.socket) -> None:
        """One peer's requests, one at a time, until it hangs up."""
        with self._count:
            self.sessions += 1
            self.idle.clear()
        session: Session | None = None
        try:
            while True:
                header, weights = link.receive(conn)
                op = header.get("op")
                if op == "hello":
                    try:
                        session = _session(header)
                    except (DatasetError, ValueError, KeyError, TypeError) as err:
                        link.send(conn, {"ok": False, "error": str(err), "kind": "DatasetError"})
                        continue
                    link.send(conn, {"ok": True})
                    self.warm_up(session)
                elif session is None:
                    link.send(conn, {"ok": False, "error": "say hello first", "kind": "request"})
                else:
                    if weights is not None and op in ("fit", "evaluate"):
                        header["digest"] = self.models.keep(weights)
                    elif weights is None and header.get("digest"):
                        weights = self.models.get(str(header["digest"]))
                        if weights is None:
                            link.send(conn, {"ok": False, "error": "send the weights", "kind": "need-weights"})
                            continue
                    job = Job(session, str(op), header, weights)
                    self.jobs.put(job)
                    job.done.wait()
                    link.send(conn, *job.reply)
        except link.LinkError:
            pass
        finally:
            conn.close()
            with self._count:
                self.sessions -= 1
                if not self.sessions:
                    self.idle.set()


def _session(header: dict) -> Session:
    spec = ShardSpec(
        **{
            **header["shard"],
            "data_dir": Path(header["shard"]["data_dir"]) if header["shard"].get("data_dir") else None,
        }
    )
    return Session(
        str(header["peer"]),
        spec,
        str(header["model"]),
        int(header["seed"]),
        int(header["epochs"]),
        int(header["batch_size"]),
        load_shard(spec),
    )


def _import_tensorflow() -> None:
    from peer.learning.models import keras_module

    keras_module()


# TensorFlow's start-up notices, written to stderr from C++ whatever TF_CPP_MIN_LOG_LEVEL says: no event of the run.
NOISE = (
    b"All log messages before absl::InitializeLog",
    b"oneDNN custom operations are on",
    b"This TensorFlow binary is optimized",
    b"cpu_feature_guard",
    b"Unable to register cu",
)


def _quiet_stderr() -> None:
    """This process's stderr (TensorFlow's C++ included) through a filter that drops TensorFlow's start-up notices."""
    read_end, write_end = os.pipe()
    original = os.dup(2)
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, "rb") as lines, os.fdopen(original, "wb", buffering=0) as out:
            for line in lines:
                if not any(noise in line for noise in NOISE):
                    out.write(line)

    threading.Thread(target=pump, name="stderr", daemon=True).start()


def _watch_parent(parent: int) -> None:
    """A private service ends with the process that started it, however that one ended (a SIGKILL included)."""
    while True:
        time.sleep(PARENT_POLL_S)
        if os.getppid() != parent:
            os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.learning.service", description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="the Unix socket to listen on (its folder must exist)")
    parser.add_argument("--workers", type=int, default=1, help="learning jobs run at once (default 1)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="TensorFlow's threads in all (default: every core)"
    )
    parser.add_argument("--nice", type=int, default=5, help="how much lower this process's priority is (default 5)")
    parser.add_argument("--private", action="store_true", help="end with the process that started this one")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be at least 1")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _quiet_stderr()
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            pass
    # The OpenMP/oneDNN threads TensorFlow may use must not spin on the cores the peers' network threads need.
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    path = Path(args.socket)
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    os.chmod(path, 0o600)
    listener.listen(64)
    if args.private:
        threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    service = Service(args.workers, args.threads).start()
    try:
        service.serve(listener)
    except KeyboardInterrupt:
        pass
    finally:
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
