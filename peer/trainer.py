"""The trainer role: what every peer that is not the controller does. When chosen it fits the global model on its
own shard and sends back a solution; it evaluates every new global model on its own test shard and reports.

Fitting takes seconds, so it runs on a worker thread (`JobRunner`); the peer's main loop keeps answering
elections and heartbeats meanwhile. A job whose term has passed by the time it would start is skipped.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .config import Settings
from .learner import Learner
from .protocol import Aggregation, Evaluation, Solution, Training
from .records import RunRecords


@dataclass(frozen=True)
class Job:
    kind: str                 # "fit" | "evaluate"
    term: int
    round: int
    attempt: int
    weights: list[np.ndarray] = field(repr=False)


@dataclass(frozen=True)
class JobDone:
    job: Job
    result: tuple | None
    error: str | None
    seconds: float


class JobRunner:
    """One worker thread running learning jobs in order and posting `JobDone` events to the peer's queue."""

    def __init__(self, learner: Learner, events: queue.Queue, still_wanted: Callable[[Job], bool],
                 log: logging.Logger):
        self.learner, self.events, self.still_wanted, self.log = learner, events, still_wanted, log
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._run, name="learner", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Let the job in progress end, then the thread: TensorFlow torn down mid-job by interpreter exit aborts
        the process ("FATAL: exception not rethrown") instead of exiting with our code."""
        self.jobs.put(None)
        self.thread.join(timeout)

    def _run(self) -> None:
        while (job := self.jobs.get()) is not None:
            if not self.still_wanted(job):
                self.log.info("skipped %s of round %d: term %d is over", job.kind, job.round, job.term)
                continue
            started = time.monotonic()
            try:
                work = self.learner.fit if job.kind == "fit" else self.learner.evaluate
                result, error = work(job.weights), None
            except Exception as err:  # a failed fit must not kill the worker; the peer logs it and goes on
                result, error = None, f"{type(err).__name__}: {err}"
            self.events.put(JobDone(job, result, error, time.monotonic() - started))


class Trainer:
    def __init__(self, settings: Settings, records: RunRecords, runner: JobRunner,
                 send: Callable[..., int], log: logging.Logger):
        self.me, self.records, self.runner, self.send, self.log = settings.peer_id, records, runner, send, log
        self.last_accuracy: float | None = None

    def on_training(self, message: Training) -> None:
        if self.me not in message.trainers:
            return
        self.log.info("round %d: chosen to train (attempt %d)", message.round, message.attempt)
        self.runner.submit(Job("fit", message.term, message.round, message.attempt, message.weights))

    def on_aggregation(self, message: Aggregation) -> None:
        # Every live publication is evaluated, a re-publication too: the controller re-publishes a model only
        # when it still lacks evaluations of it (retained copies never reach this method).
        self.runner.submit(Job("evaluate", message.term, message.round, 1, message.weights))

    def on_job_done(self, done: JobDone, current_term: int) -> None:
        job = done.job
        if done.error:
            self.log.error("round %d: %s failed: %s", job.round, job.kind, done.error)
            return
        if job.kind == "fit":
            weights, samples, loss = done.result
            if job.term != current_term:
                self.log.info("round %d: training done but term %d is over; solution dropped", job.round, job.term)
                return
            self.send(Solution(job.term, job.round, job.attempt, self.me, samples, loss, weights))
            self.log.info("round %d: trained %d samples in %.1fs (loss %.4f), solution sent", job.round, samples,
                          done.seconds, loss)
        else:
            accuracy, loss, samples = done.result
            self.last_accuracy = accuracy
            self.records.evaluation(job.round, job.term, accuracy, loss, samples)
            self.send(Evaluation(job.term, job.round, self.me, accuracy, loss, samples))
            self.log.info("round %d: global model scores accuracy %.4f, loss %.4f on my %d test samples",
                          job.round, accuracy, loss, samples)
