"""The controller role: runs rounds for one term. It never trains.

A round: choose trainers among the live peers, send them the global model (Training), collect their Solutions,
average them (FedAvg), publish the new global model (Aggregation, retained), collect every peer's Evaluation of it,
publish the round's Metrics and record the row. Then the next round, or the Finish.

A new controller resumes from the latest global model it holds: if that model's metrics were never published (the
old controller died in between), it evaluates that round first; otherwise it trains the next one. So no finished
round is lost and none is counted twice.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable

from .config import Settings
from .learner import Learner
from .protocol import Aggregation, Evaluation, Finish, Heartbeat, Message, Metrics, Solution, Training
from .records import RunRecords
from .rounds import (EvaluationCollector, ModelStore, RoundOutcome, RoundSummary, SolutionCollector,
                     choose_trainers)

FINISH_EXPIRY_S = 60   # the retained Finish reaches peers reconnecting just after the end, then expires

Send = Callable[..., int]   # send(message, retain=False, expiry=None) -> payload bytes


class Controller:
    def __init__(self, settings: Settings, term: int, reason: str, live: set[str], store: ModelStore,
                 records: RunRecords, learner: Learner, send: Send, log: logging.Logger, rng: random.Random):
        self.settings, self.me, self.term = settings, settings.peer_id, term
        self.live, self.store, self.records, self.learner = live, store, records, learner
        self.send, self.log, self.rng = send, log, rng
        self.phase = "starting"
        self.round = store.latest.round if store.latest else 0
        self.solutions: SolutionCollector | None = None
        self.evaluations: EvaluationCollector | None = None
        self.attempt = 0
        self.round_started = 0.0
        self.round_bytes = 0
        self.waiting_for = ""          # why nothing happens (too few peers); logged once per change
        self.next_heartbeat = 0.0
        self.finished = False
        self.reason = reason

    # --- life cycle ---------------------------------------------------------------------------------------------------

    def take_office(self, members: tuple[str, ...], now: float) -> None:
        self.records.election(self.term, self.me, self.reason, members)
        self.log.info("controller of term %d (%s), members %s", self.term, self.reason, ",".join(members))
        if self.store.run_started is None:
            self.store.run_started = time.time()
        latest = self.store.latest
        if latest is None:
            self.store.offer(0, self.term, self.learner.initial_weights())
            self.log.info("no global model yet: starting from a fresh model (round 0)")
            self._publish_model(now)
        elif self.store.needs_evaluation:
            self.log.info("resuming: round %d was aggregated but its metrics were lost; evaluating it again", latest.round)
            self._publish_model(now)
        else:
            self.log.info("resuming after round %d", latest.round)
            self._after_round(self.store.finished[latest.round], now)

    # --- inputs -------------------------------------------------------------------------------------------------------

    def on_message(self, message: Message, size: int, now: float) -> None:
        if isinstance(message, Solution):
            if self.solutions and self.phase == "training":
                why_not = self.solutions.offer(message.term, message.round, message.attempt, message.peer,
                                               message.weights, message.samples)
            else:   # a late one (a thawed or slow trainer): say so, as for any other refused solution
                why_not = (f"it is for term {message.term} round {message.round} attempt {message.attempt}, and "
                           f"no round is collecting solutions ({self.phase})")
            if why_not:
                self.log.info("ignored a solution from %s: %s", message.peer, why_not)
                return
            self.round_bytes += size
            self.log.info("solution from %s (%d samples, loss %.4f), %d of %d", message.peer, message.samples,
                          message.loss, len(self.solutions.received), len(self.solutions.trainers))
        elif isinstance(message, Evaluation) and self.evaluations and self.phase == "evaluating":
            why_not = self.evaluations.offer(message.term, message.round, message.peer, message.accuracy,
                                             message.loss, message.samples)
            if why_not:
                self.log.debug("ignored an evaluation from %s: %s", message.peer, why_not)
                return
            self.round_bytes += size
        self._advance(now)

    def peer_up(self, peer: str, now: float) -> None:
        if self.phase == "waiting-peers":
            self._resume_waiting(now)

    def peer_down(self, peer: str, now: float) -> None:
        if self.solutions:
            self.solutions.trainer_lost(peer)
        if self.evaluations:
            self.evaluations.peer_lost(peer)
        self._advance(now)

    def tick(self, now: float) -> None:
        if now >= self.next_heartbeat and not self.finished:
            self.next_heartbeat = now + self.settings.heartbeat
            self.send(Heartbeat(self.term, self.me, self.round, self.phase), retain=True)
        self._advance(now)

    # --- rounds -------------------------------------------------------------------------------------------------------

    def _others(self) -> set[str]:
        return self.live - {self.me}

    def _wait_for_peers(self, why: str) -> None:
        self.phase = "waiting-peers"
        if why != self.waiting_for:
            self.waiting_for = why
            self.log.warning("waiting: %s", why)

    def _resume_waiting(self, now: float) -> None:
        if not self._others():
            return
        self.waiting_for = ""
        if self.evaluations is not None:
            self._publish_model(now)
        else:
            self._start_training(now)

    def _start_training(self, now: float, retry: bool = False) -> None:
        candidates = self._others()
        if not candidates:
            self.solutions = None
            return self._wait_for_peers("too few peers for a round: it needs a controller and at least one "
                                        f"trainer, and only {self.me} is live")
        if not retry:
            self.attempt, self.round_started, self.round_bytes = 0, now, 0
        self.attempt += 1
        self.round = self.store.latest.round + 1
        trainers = choose_trainers(candidates, self.settings.trainers, self.rng)
        quorum = min(self.settings.min_solutions, len(trainers))
        self.solutions = SolutionCollector(self.term, self.round, self.attempt, trainers, quorum,
                                           now + self.settings.round_deadline,
                                           shapes=tuple(w.shape for w in self.store.latest.weights))
        self.evaluations = None
        self.phase = "training"
        self.round_bytes += self.send(Training(self.term, self.me, self.round, self.attempt, trainers,
                                               self.store.latest.weights))
        self.log.info("round %d%s: training order to %s (quorum %d)", self.round,
                      f" attempt {self.attempt}" if self.attempt > 1 else "", ",".join(trainers), quorum)

    def _publish_model(self, now: float) -> None:
        """Publish the latest global model and collect every live peer's evaluation of it."""
        latest = self.store.latest
        self.round = latest.round
        self.solutions = None
        self.evaluations = EvaluationCollector(self.term, latest.round, self._others(),
                                               now + self.settings.round_deadline)
        self.round_bytes += self.send(Aggregation(self.term, self.me, latest.round, latest.trainers, latest.weights),
                                      retain=True)
        if not self._others():
            return self._wait_for_peers(f"no peer is live to evaluate the model of round {latest.round}")
        self.phase = "evaluating"

    def _advance(self, now: float) -> None:
        if self.phase == "training" and self.solutions:
            outcome = self.solutions.outcome(now)
            if outcome is RoundOutcome.RETRY:
                self.log.warning("round %d attempt %d: %d of %d solutions (quorum %d) by the deadline or with the "
                                 "rest gone; choosing trainers again", self.round, self.attempt,
                                 len(self.solutions.received), len(self.solutions.trainers), self.solutions.quorum)
                self._start_training(now, retry=True)
            elif outcome is RoundOutcome.CLOSE:
                self._aggregate(now)
        elif self.phase == "evaluating" and self.evaluations and self.evaluations.done(now):
            self._close_evaluation(now)

    def _aggregate(self, now: float) -> None:
        collector = self.solutions
        used = tuple(sorted(collector.received))
        missing = sorted(set(collector.trainers) - set(used))
        weights = collector.aggregate()
        self.store.offer(self.round, self.term, weights, used)
        self.log.info("round %d: FedAvg of %d solutions from %s%s", self.round, len(used), ",".join(used),
                      f" (closed without {','.join(missing)})" if missing else "")
        self._publish_model(now)

    def _close_evaluation(self, now: float) -> None:
        collector, self.evaluations = self.evaluations, None
        result = collector.result()
        if result is None:
            self.log.warning("round %d: no evaluation arrived; publishing the model again", collector.round)
            return self._publish_model(now)
        accuracy, loss, samples = result
        round_, trainers = collector.round, self.store.latest.trainers
        duration = now - self.round_started if round_ > 0 and self.round_started else 0.0
        # The row first: killed between the two, the round is evaluated again by the next controller and recorded
        # twice (the later row counts); the other way round, it would be finished for everyone and never recorded.
        if round_ > 0:
            self.records.round(round=round_, term=self.term, controller=self.me, trainers=trainers,
                               accuracy=accuracy, loss=loss, duration_s=duration, bytes_sent=self.round_bytes,
                               finished_at=time.time())
        self.send(Metrics(self.term, self.me, round_, accuracy, loss, samples, trainers, duration, self.round_bytes,
                          self.store.run_started))
        summary = RoundSummary(round_, self.term, accuracy, loss, self.round_bytes)
        self.store.finish_round(summary)
        self.log.info("round %d: global accuracy %.4f, loss %.4f over %d test samples from %d peers%s", round_,
                      accuracy, loss, samples, len(collector.received),
                      f", {duration:.1f}s, {self.round_bytes} bytes" if round_ > 0 else " (initial model)")
        self._after_round(summary, now)

    def _after_round(self, summary: RoundSummary, now: float) -> None:
        if summary.round >= self.settings.max_rounds:
            return self._finish("max-rounds", summary)
        if summary.round > 0 and summary.accuracy >= self.settings.target_accuracy:
            return self._finish("target-accuracy", summary)
        self._start_training(now)

    def _finish(self, reason: str, summary: RoundSummary) -> None:
        self.phase, self.finished = "finished", True
        latest = self.store.latest
        self.learner.save(latest.weights, self.records.model_path)
        outcome = self.outcome(reason, summary)
        self.records.run({"settings": self.settings.public_dict(), "outcome": outcome})
        self.send(Finish(self.term, self.me, summary.round, reason, summary.accuracy), retain=True,
                  expiry=FINISH_EXPIRY_S)
        self.log.info("finished (%s) after round %d: accuracy %.4f", reason, summary.round, summary.accuracy)
        print(format_summary(outcome), flush=True)

    def outcome(self, reason: str, summary: RoundSummary) -> dict:
        initial = self.store.finished.get(0)
        started = self.store.run_started or time.time()
        return {
            "reason": reason, "rounds": summary.round,
            "initial_accuracy": initial.accuracy if initial else None,
            "final_accuracy": summary.accuracy, "final_loss": summary.loss,
            "duration_s": round(time.time() - started, 3),
            "bytes_sent": sum(s.bytes for s in self.store.finished.values()),
            "terms": self.term, "controller": self.me, "finished_at": time.time(),
        }


def format_summary(outcome: dict) -> str:
    rows = [("rounds", outcome["rounds"]), ("stopped by", outcome["reason"]),
            ("initial accuracy", _pct(outcome["initial_accuracy"])), ("final accuracy", _pct(outcome["final_accuracy"])),
            ("final loss", f"{outcome['final_loss']:.4f}"), ("time", f"{outcome['duration_s']:.1f} s"),
            ("bytes", f"{outcome['bytes_sent']:,}"), ("terms", outcome["terms"]), ("controller", outcome["controller"])]
    width = max(len(k) for k, _ in rows)
    lines = ["run summary", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"
