"""The learner thread: runs learning jobs (`actions.StartJob`) one at a time, in order, and posts a `JobDone` event on
the peer's queue for each. A job takes seconds (the machine's learning service does it: `peer.learning.remote`), so
it must not hold up the peer's loop, which keeps answering elections and heartbeats meanwhile. A job that is no
longer wanted when its turn comes (its term is over) is skipped.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from peer.config import Settings
from peer.learning.data import Shard
from peer.learning.remote import RemoteLearner, ServiceHandle
from peer.roles.actions import JobDone, StartJob


class Learning(Protocol):
    """What the node needs of its learning (`peer.learning.remote.RemoteLearner`; a fake in the node's tests)."""

    def sample_counts(self) -> tuple[int, int]: ...
    def count_bound(self) -> tuple[int, int] | None: ...
    def fingerprint(self) -> str: ...
    def model_description(self) -> str: ...
    def initial_weights(self) -> list[np.ndarray]: ...
    def fit(self, weights: list[np.ndarray]) -> tuple[list[np.ndarray], int, float]: ...
    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float, int]: ...
    def save(self, weights: list[np.ndarray], path: Path) -> None: ...


def remote_learner(settings: Settings, service: ServiceHandle, labels: Shard) -> RemoteLearner:
    """The learning of the peer `settings` describe (its shard's `labels` read here, its images the service's),
    prepared: ModelError, DatasetError or LinkError saying why it cannot learn."""
    learner = RemoteLearner(
        service,
        settings.peer_id,
        settings.shard_spec,
        labels,
        settings.model,
        settings.seed,
        settings.epochs,
        settings.batch_size,
        settings.fit_options(),
    )
    learner.prepare()
    return learner


class JobRunner:
    def __init__(
        self, learner: Learning, events: queue.Queue, still_wanted: Callable[[StartJob], bool], log: logging.Logger
    ):
        self.learner, self.events, self.still_wanted, self.log = learner, events, still_wanted, log
        self.jobs: queue.Queue[StartJob | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self.thread.start()

    def submit(self, job: StartJob) -> None:
        self.jobs.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Let the job in progress end, then the thread: TensorFlow torn down mid-job by interpreter exit aborts
        the process ("FATAL: exception not rethrown") instead of exiting with our code."""
        self.jobs.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not self.still_wanted(job):
                self.log.info("skipped %s of round %d (term %d): no longer wanted", job.kind, job.round, job.term)
                continue
            self.events.put(self._do(job))
            # (nothing of the job stays referenced here while waiting for the next: a large model's weights would)
            del job

    def _do(self, job: StartJob) -> JobDone:
        started = time.monotonic()
        try:
            work = self.learner.fit if job.kind == "fit" else self.learner.evaluate
            result, error = work(job.weights), None
        except Exception as err:  # a failed fit must not kill the worker; the peer logs it and goes on
            result, error = None, f"{type(err).__name__}: {err}"
        return JobDone(job, result, error, time.monotonic() - started)
