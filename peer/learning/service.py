"""`python -m peer.learning.service`: the learning of the peers of one machine, in one process.

    python -m peer.learning.service --socket PATH [--workers W] [--processes] [--threads T] [--nice N]

Peers that share a machine share its cores. A peer process does not import TensorFlow: it sends its learning jobs
(fit, evaluate, save) to this service over a local socket (`peer.learning.link`), and the service runs them, W at a
time, each on a Keras model of its own per worker, with TensorFlow's thread pools sized to the machine (T threads in
all) instead of every process sizing them to every core. With `--processes` each worker is a process of its own with
T/W threads (one TensorFlow each: a process's Python and TensorFlow runtime are not shared with the other worker's
jobs, so W jobs really run at once; measured on 2 cores, two processes of one thread fit 1.5x as many seed-cnn
models a minute as one process of two threads, and two threads of one process 1.1x). So:

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
import json
import math
import os
import queue
import signal
import socket
import subprocess
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
    proximal_mu: float = 0.0  # FedProx (peer.learning.proximal)
    dp_clip: float | None = None  # the update's L2 bound, with differential privacy (peer.learning.privacy)
    dp_noise_std: float = 0.0  # the noise a trainer adds to its clipped update itself (--dp-local)
    hello: dict = field(default_factory=dict)  # as the peer said it: what a worker process makes the session from

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

    def __init__(self, service: Service | None, index: int):
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
        learner.proximal_mu, learner.dp_clip, learner.dp_noise_std = (
            session.proximal_mu,
            session.dp_clip,
            session.dp_noise_std,
        )
        return learner

    def _run(self) -> None:
        assert self.service is not None, "a worker of a service"
        while True:
            job = self.service.jobs.get()
            job.reply = self.run_job(job)
            job.done.set()

    def run_job(self, job: Job) -> tuple[dict, list | None]:
        started = time.monotonic()
        try:
            reply = self._do(job)
        except (ModelError, DatasetError) as err:
            reply = ({"ok": False, "error": str(err), "kind": type(err).__name__}, None)
        except Exception as err:  # a failed job must not kill the worker; the peer logs it and goes on
            reply = ({"ok": False, "error": f"{type(err).__name__}: {err}", "kind": "job"}, None)
        reply[0]["seconds"] = round(time.monotonic() - started, 4)
        return reply

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


class ProcessWorker(Worker):
    """A worker whose jobs run in a process of its own (`--child`), over a socket pair: the job's session as its peer
    said hello, the request, and the weights unless that process holds them already (a round's evaluations send the
    model once)."""

    def __init__(self, service: Service, index: int, threads: int):
        super().__init__(service, index)
        self.threads = threads
        self.conn: socket.socket | None = None
        self.child: subprocess.Popen | None = None
        self.holds: str | None = None  # the digest of the weights the child process was last sent

    def _run(self) -> None:
        # One TensorFlow import at a time: the first worker's while the peers start, the next once it is ready (two
        # at once on a machine whose peers are starting too would delay the first election and round 0).
        assert self.service is not None, "a worker of a service"
        if self.index > 0:
            self.service.first_ready.wait()
        try:
            self._start_child()
        finally:
            if self.index == 0:
                self.service.first_ready.set()
        for session in list(self.service.models_seen.values()):  # the models the peers said hello with, traced
            self.run_job(Job(session, "warm", {}, None))
        super()._run()

    def _start_child(self) -> None:
        """A worker process, ready: TensorFlow imported (it says so; until then this worker takes no job)."""
        mine, theirs = socket.socketpair()
        self.child = subprocess.Popen(
            [sys.executable, "-m", "peer.learning.service", "--child", str(theirs.fileno()), "--threads",
             str(self.threads)],
            pass_fds=[theirs.fileno()],
        )  # fmt: skip
        theirs.close()
        self.conn, self.holds = mine, None
        try:
            link.receive(mine)
        except link.LinkError:
            self.stop()  # it died starting: the next job starts one again and says why if it dies again

    def run_job(self, job: Job) -> tuple[dict, list | None]:
        digest = job.header.get("digest")
        request = {"session": job.session.hello, "op": job.op, "header": job.header}
        why = "it did not start"
        for _ in (1, 2):  # a worker process that died is started again, once per job
            if self.conn is None:
                self._start_child()
            if self.conn is None:
                continue
            try:
                same = digest is not None and digest == self.holds
                link.send(self.conn, request, None if same else job.weights)
                self.holds = digest if job.op in ("evaluate", "save") else None
                return link.receive(self.conn)
            except link.LinkError as err:
                self.stop()
                why = str(err)
        return {"ok": False, "error": f"the learning worker process died ({why})", "kind": "job"}, None

    def stop(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        if self.child is not None:
            self.child.kill()
            self.child.wait()
            self.child = None


def serve_parent(conn: socket.socket, threads: int) -> None:
    """A worker process (`--child FD`): jobs from its parent service, one at a time, until the parent hangs up."""
    configure_threads(threads)
    _import_tensorflow()
    try:
        link.send(conn, {"ready": True})
    except link.LinkError:
        return
    worker = Worker(None, 0)  # its thread never started: this process's main thread runs its jobs
    sessions: dict[str, Session] = {}
    held: list[np.ndarray] | None = None
    while True:
        try:
            request, weights = link.receive(conn)
        except link.LinkError:
            return
        hello = request["session"]
        key = json.dumps(hello, sort_keys=True)
        if key not in sessions:
            sessions[key] = _session(hello)
        header = request["header"]
        if weights is None and header.get("digest"):
            weights = held  # the parent sends a model once to the process that holds it
        held = weights if request["op"] in ("evaluate", "save") else None
        reply = worker.run_job(Job(sessions[key], str(request["op"]), header, weights))
        try:
            link.send(conn, *reply)
        except link.LinkError:
            return


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
    def __init__(self, workers: int = 1, threads: int = 1, processes: bool = False):
        self.models = Models()
        self.jobs: queue.Queue[Job] = queue.Queue()
        self.threads, self.processes = threads, processes
        self.workers: list[Worker] = (
            [ProcessWorker(self, i, max(1, threads // workers)) for i in range(workers)]
            if processes
            else [Worker(self, i) for i in range(workers)]
        )
        self.sessions = 0
        self.first_ready = threading.Event()  # the first worker process has imported TensorFlow
        self.models_seen: dict[tuple, Session] = {}  # a session of each model the peers said hello with
        self._count = threading.Lock()
        self.idle = threading.Event()

    def start(self) -> Service:
        for worker in self.workers:
            worker.thread.start()  # a worker process's thread starts its process (TensorFlow is theirs only)
        if self.processes:
            return self
        configure_threads(self.threads)
        # TensorFlow now, while the peers connect: the first job does not pay for its import.
        threading.Thread(target=_import_tensorflow, name="warm-up", daemon=True).start()
        return self

    def stop(self) -> None:
        for worker in self.workers:
            if isinstance(worker, ProcessWorker):
                worker.stop()

    def warm_up(self, session: Session) -> None:
        """Build and trace the session's model on every worker while the peers elect, before the first real job."""
        self.models_seen[session.model_key] = session
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
                        # the images are the worker processes' to load: here only what checks and names the shard
                        session = _session(header, images=not self.processes)
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


def _session(header: dict, images: bool = True) -> Session:
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
        load_shard(spec, images=images),
        *_fit_options(header),
        {k: v for k, v in header.items() if k != "op"},
    )


def _fit_options(header: dict) -> tuple[float, float | None, float]:
    """(proximal mu, clip bound, noise std) of a hello: absent from a peer that fits plainly; ValueError if bad."""
    try:
        mu, noise = float(header.get("proximal_mu") or 0.0), float(header.get("dp_noise_std") or 0.0)
        clip = None if header.get("dp_clip") is None else float(header["dp_clip"])
    except (TypeError, ValueError):
        raise ValueError(f"bad fit options in the hello: {header!r:.200}") from None
    if not all(math.isfinite(v) and v >= 0 for v in (mu, noise)) or (clip is not None and not 0 < clip < math.inf):
        raise ValueError(f"bad fit options: proximal_mu {mu!r}, dp_clip {clip!r}, dp_noise_std {noise!r}")
    return mu, clip, noise


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
    parser.add_argument("--socket", help="the Unix socket to listen on (its folder must exist)")
    parser.add_argument("--workers", type=int, default=1, help="learning jobs run at once (default 1)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="TensorFlow's threads in all (default: every core)"
    )
    parser.add_argument("--nice", type=int, default=5, help="how much lower this process's priority is (default 5)")
    parser.add_argument("--private", action="store_true", help="end with the process that started this one")
    parser.add_argument(
        "--processes", action="store_true", help="each worker a process of its own, with threads/workers threads"
    )
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)  # a worker process: its socket's descriptor
    args = parser.parse_args(argv)
    if args.workers < 1 or args.threads < 1:
        parser.error("--workers and --threads must be at least 1")
    if args.socket is None and args.child is None:
        parser.error("the following arguments are required: --socket")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    _quiet_stderr()
    if args.child is not None:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
        serve_parent(socket.socket(fileno=args.child), args.threads)
        return 0
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
    service = Service(args.workers, args.threads, args.processes).start()
    try:
        service.serve(listener)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        service.stop()
        path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
