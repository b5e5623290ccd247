"""The peer's side of the learning service (`peer.learning.service`): `RemoteLearner` is the learner of the node
(fit, evaluate, save; the model's facts; the shard's counts), its jobs done by the machine's service.

A peer process imports no TensorFlow. Its shard's labels it reads itself (what it announces and records); its model's
facts (fingerprint, initial weights) come from the machine's cache when a service built that model before
(`peer.learning.facts`), else from the service, once; every fit, evaluation and save is a request to the service.
`ServiceHandle` finds the service: the machine's, at the socket the launcher made (`--learning-service`), or a private
one it starts on first need, which ends with this process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from peer.learning import link
from peer.learning.data import SHAPES, DatasetError, Shard, ShardSpec
from peer.learning.facts import ModelFacts, facts_key, read_facts
from peer.learning.models import ModelError, check_spec, default_model
from peer.wire.weights import WeightCodec

START_TIMEOUT_S = 30.0  # a private service listens within a second; TensorFlow's import comes after
log = logging.getLogger(__name__)


def machine_cpus() -> int:
    """The cores this process may use: its CPU affinity, capped by a cgroup quota (a container's `cpus:`)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_quota()
    return cpus if quota is None else min(cpus, max(1, round(quota)))


def _cgroup_quota() -> float | None:
    """The cores a cgroup's CPU quota allows (cgroup v2's cpu.max, else v1's CFS quota), or None: no quota."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in ("/sys/fs/cgroup/cpu", "/sys/fs/cgroup/cpu,cpuacct"):
        try:
            quota_us = int(Path(folder, "cpu.cfs_quota_us").read_text())
            period_us = int(Path(folder, "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    return None


class ServiceHandle:
    """The way to this machine's learning service, shared by the peers of one process."""

    def __init__(self, path: str | Path | None = None):
        self.shared = Path(path) if path else None
        self._private: subprocess.Popen | None = None
        self._private_path: Path | None = None
        self._lock = threading.Lock()

    def connect(self) -> socket.socket:
        """A new connection: to the machine's service if it answers, else to this process's private one (started
        now if it is not running)."""
        if self.shared is not None:
            try:
                return _connect(self.shared)
            except OSError as err:
                log.warning(
                    "the learning service at %s does not answer (%s); this process starts its own",
                    self.shared,
                    err.strerror or err,
                )
                self.shared = None
        with self._lock:
            if self._private is None or self._private.poll() is not None:
                self._start_private()
            path = self._private_path
        assert path is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                return _connect(path)
            except OSError:
                if time.monotonic() > deadline or (self._private and self._private.poll() is not None):
                    raise link.LinkError(
                        "the learning service of this process did not start (see the lines above)"
                    ) from None
                time.sleep(0.05)

    def _start_private(self) -> None:
        folder = Path(tempfile.mkdtemp(prefix="sdfl-learn-"))  # 0700: nobody else can reach the socket
        self._private_path = folder / "learn.sock"
        self._private = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "peer.learning.service",
                "--socket",
                str(self._private_path),
                "--private",
                "--threads",
                str(machine_cpus()),
            ],
            stdin=subprocess.DEVNULL,
        )

    def close(self) -> None:
        if self._private is not None and self._private.poll() is None:
            self._private.terminate()
            try:
                self._private.wait(5)
            except subprocess.TimeoutExpired:
                self._private.kill()


def _connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(path))
    except OSError:
        sock.close()
        raise
    return sock


class NeedWeights(Exception):
    """The service does not hold the model a request named by its digest: send it."""


class RemoteLearner:
    """The node's learner, its jobs done by the learning service. Thread-safe: one request at a time."""

    def __init__(
        self,
        handle: ServiceHandle,
        peer_id: str,
        spec: ShardSpec,
        labels: Shard,
        model: str | None,
        seed: int,
        epochs: int,
        batch_size: int,
        fit_options: dict | None = None,
    ):
        """`labels`: this peer's shard as `load_shard(spec, images=False)` gave it. `fit_options`: how it fits as a
        trainer beyond epochs and batch size (`Settings.fit_options`: FedProx's mu, DP clipping and local noise)."""
        self.fit_options = dict(fit_options or {})
        self.handle, self.peer_id, self.spec, self.labels = handle, peer_id, spec, labels
        self.model_name = check_spec(model) if model else default_model(spec.dataset)
        self.seed, self.epochs, self.batch_size = seed, epochs, batch_size
        self.facts: ModelFacts | None = None
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    # --- what the node asks, answered here ---------------------------------------------------------------------------

    def sample_counts(self) -> tuple[int, int]:
        return int(len(self.labels.y_train)), int(len(self.labels.y_test))

    def count_bound(self) -> tuple[int, int] | None:
        """The most (train, test) samples any shard of this run's partition holds, from the data settings alone
        (`Shard.largest`: the labels tell it): what no peer may claim to have more of. None for a pre-split folder."""
        return self.labels.largest

    def prepare(self) -> ModelFacts:
        """The model's facts: from the machine's cache, else built by the service (the first time on a machine, or
        for a module:function model: seconds). ModelError if the model is unusable; DatasetError if the service
        cannot load this shard; LinkError if the service cannot be reached."""
        if self.facts is None:
            key = facts_key(self.model_name, SHAPES[self.spec.dataset], self.labels.num_classes, self.seed)
            self.facts = read_facts(key)
            if self.facts is None:
                header, weights = self._request({"op": "facts"})
                self.facts = ModelFacts(header["name"], header["fingerprint"], header["description"], weights or [])
            else:  # the service loads this shard and traces the model while the peer joins, not at its first job
                threading.Thread(target=self._greet, name="learning-hello", daemon=True).start()
        return self.facts

    def _greet(self) -> None:
        with self._lock:
            try:
                self._link()
            except (link.LinkError, OSError, RuntimeError, ModelError, DatasetError):
                pass  # said again, and failing then in the open, at the first job

    def fingerprint(self) -> str:
        return self.prepare().fingerprint

    def model_description(self) -> str:
        return self.prepare().description

    def initial_weights(self) -> list[np.ndarray]:
        return [w.copy() for w in self.prepare().initial]

    def fit(self, weights: list[np.ndarray]) -> tuple[list[np.ndarray], int, float]:
        header, trained = self._request({"op": "fit"}, weights, by_digest=True)
        return trained or [], int(header["samples"]), float(header["loss"])

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float, int]:
        header, _ = self._request({"op": "evaluate"}, weights, by_digest=True)
        return float(header["accuracy"]), float(header["loss"]), int(header["samples"])

    def save(self, weights: list[np.ndarray], path: Path) -> None:
        """The model saved (Keras) at `path` by the service. A save it could not do (a full disk, say) is an OSError
        here, as any failed write of a record is: the node logs it and the run goes on."""
        try:
            self._request({"op": "save", "path": str(Path(path).resolve())}, weights)
        except RuntimeError as err:
            raise OSError(f"the learning service could not save {path}: {err}") from None

    # --- the link ----------------------------------------------------------------------------------------------------

    def _hello(self) -> dict:
        spec = {**dataclasses.asdict(self.spec), "data_dir": str(self.spec.data_dir) if self.spec.data_dir else None}
        return {
            "op": "hello",
            "peer": self.peer_id,
            "shard": spec,
            "model": self.model_name,
            "seed": self.seed,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            **self.fit_options,
        }

    def _request(
        self, header: dict, weights: list[np.ndarray] | None = None, by_digest: bool = False
    ) -> tuple[dict, list | None]:
        """One request, answered; on a broken link the service is reached again (restarted if it was this
        process's own) and the request made once more: every request can be repeated."""
        with self._lock:
            for attempt in (1, 2):
                try:
                    self._link()
                    if by_digest and weights is not None:
                        # The model by its name first: the service holds it if another peer sent it this round.
                        try:
                            return self._exchange({**header, "digest": WeightCodec.digest(weights)}, None)
                        except NeedWeights:
                            pass
                    return self._exchange(header, weights)
                except link.LinkError:
                    if self._sock is not None:
                        self._sock.close()
                        self._sock = None
                    if attempt == 2:
                        raise
        raise AssertionError("unreachable")

    def _link(self) -> None:
        """Connected to the service, and introduced (its session holds this peer's shard and model)."""
        if self._sock is None:
            self._sock = self.handle.connect()
            try:
                self._exchange(self._hello(), None)
            except Exception:
                self._sock.close()
                self._sock = None
                raise

    def _exchange(self, header: dict, weights: list[np.ndarray] | None) -> tuple[dict, list | None]:
        assert self._sock is not None
        link.send(self._sock, header, weights)
        reply, returned = link.receive(self._sock)
        if not reply.get("ok"):
            error = str(reply.get("error", "the learning service refused the request"))
            kind = reply.get("kind")
            if kind == "need-weights":
                raise NeedWeights(error)
            if kind == "ModelError":
                raise ModelError(error)
            if kind == "DatasetError":
                raise DatasetError(error)
            raise RuntimeError(error)
        return reply, returned
