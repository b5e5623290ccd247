"""The follower role as a pure machine: what every peer that is not the controller does.

When chosen it fits the global model on its own shard and sends back a solution; it evaluates every new global
model on its own test shard and reports; it remembers the metrics of every finished round (so it can take over as
controller), and it ends when the controller announces the finish.

Like the controller it does no I/O: messages that the admission rules let through (`peer.admission`) and finished
learning jobs go in, actions (`peer.actions`) come out. It reads the peer's model store, never writes it: adopting a
model is an action the node carries out.
"""
from __future__ import annotations

from .actions import (Action, AdoptModel, Exit, FinishRound, JobDone, Log, Publish, RecordEvaluation, StartJob)
from .protocol import Aggregation, Evaluation, Finish, Heartbeat, Message, Metrics, Solution, Training
from .rounds import GlobalModel, ModelStore, RoundSummary

EXIT_OK = 0


class Follower:
    def __init__(self, me: str, memory: ModelStore):
        self.me, self.memory = me, memory
        self.phase: str | None = None          # the controller's phase, as its last heartbeat told it

    def on_controller(self, message: Message) -> list[Action]:
        """A live message of the current term's controller."""
        if isinstance(message, Heartbeat):
            self.phase = message.phase
            return []
        if isinstance(message, Training):
            if self.me not in message.trainers:
                return []
            return [Log(f"round {message.round}: chosen to train (attempt {message.attempt})"),
                    StartJob("fit", message.term, message.round, message.attempt, message.weights)]
        if isinstance(message, Aggregation):
            # Every live publication is evaluated, a re-publication too: the controller re-publishes a model only
            # when it still lacks evaluations of it (retained copies come through `on_retained_model`).
            return [*self._adopt(message),
                    StartJob("evaluate", message.term, message.round, 1, message.weights)]
        if isinstance(message, Metrics):
            summary = RoundSummary(message.round, message.term, message.accuracy, message.loss, message.bytes)
            return [FinishRound(summary, message.run_started)]
        if isinstance(message, Finish):
            return [Log(f"finish received from {message.controller} ({message.reason}) after round {message.round}: "
                        f"accuracy {message.accuracy:.4f}"), Exit(EXIT_OK)]
        return []

    def on_retained_model(self, message: Aggregation) -> list[Action]:
        """The broker's retained aggregation, delivered when this peer subscribed: the model a late joiner starts
        from, not an order to evaluate it."""
        return self._adopt(message, note="retained by the broker")

    def on_job_done(self, done: JobDone, current_term: int) -> list[Action]:
        job = done.job
        if done.error:
            return [Log(f"round {job.round}: {job.kind} failed: {done.error}", "error")]
        if job.kind == "fit":
            weights, samples, loss = done.result
            if job.term != current_term:
                return [Log(f"round {job.round}: training done but term {job.term} is over; solution dropped")]
            return [Publish(Solution(job.term, job.round, job.attempt, self.me, samples, loss, weights)),
                    Log(f"round {job.round}: trained {samples} samples in {done.seconds:.1f}s (loss {loss:.4f}), "
                        "solution sent")]
        accuracy, loss, samples = done.result
        return [RecordEvaluation(job.round, job.term, accuracy, loss, samples),
                Publish(Evaluation(job.term, job.round, self.me, accuracy, loss, samples)),
                Log(f"round {job.round}: global model scores accuracy {accuracy:.4f}, loss {loss:.4f} on my "
                    f"{samples} test samples")]

    def _adopt(self, message: Aggregation, note: str = "") -> list[Action]:
        if not self.memory.is_newer(message.round, message.term):
            return []
        return [AdoptModel(GlobalModel(message.round, message.term, message.weights, message.trainers), note)]
