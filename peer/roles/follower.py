"""The follower role as a pure machine: what every peer that is not the controller does.

When chosen it fits the global model on its own shard and sends back a solution; it evaluates every new global
model it is asked to (every one, unless the controller names a few evaluators) on its own test shard and reports;
it remembers the metrics of every finished round (so it can take over as controller), and it ends when the
controller announces the finish.

Like the controller it does no I/O: messages that the admission rules let through (`peer.roles.admission`) and finished
learning jobs go in, actions (`peer.roles.actions`) come out. It reads the peer's model store, never writes it: adopting a
model is an action the node carries out.
"""

from __future__ import annotations

import numpy as np

from peer.roles.actions import (
    EXIT_GAVE_UP,
    EXIT_OK,
    GIVE_UP_REASONS,
    Action,
    AdoptModel,
    Exit,
    FetchModel,
    FinishRound,
    JobDone,
    Log,
    Publish,
    RecordEvaluation,
    StartJob,
)
from peer.roles.rounds import GlobalModel, ModelStore, RoundSummary, implausible_finish
from peer.roles.secure import SecureTrainer
from peer.wire.messages import (
    Aggregation,
    Evaluation,
    Finish,
    Heartbeat,
    Maskers,
    Message,
    Metrics,
    Roster,
    Shares,
    Solution,
    Training,
    Unmask,
)
from peer.wire.weights import WeightCodec

ASIDE_KEPT = 2  # retained models of other publishers held until this peer follows one of them


class Follower:
    def __init__(
        self,
        me: str,
        memory: ModelStore,
        shapes: tuple[tuple[int, ...], ...] | None = None,
        keep_solutions_up_to: int = 2**63,
        stop_rules: tuple[int, float] | None = None,
        answers_expire_after: int | None = None,
        secure_aggregation: bool = False,
    ):
        """`shapes`: this peer's own model's tensor shapes; a model that does not fit them is refused.
        `keep_solutions_up_to`: a solution of more bytes than this is not kept once sent (a large model's memory
        matters more than sparing a fit: a repeated order is trained again). `stop_rules`: the run's (round limit,
        target accuracy), by which a finish that cannot be true is refused (None: every finish is believed).
        `answers_expire_after`: seconds after which the broker drops a solution or evaluation still waiting for its
        controller (the round has moved on): a stalled controller's queue holds no stale models.
        `secure_aggregation`: a fit is answered with a masked update (`peer.roles.secure`), never a plain solution."""
        self.me, self.memory, self.shapes = me, memory, shapes
        self.stop_rules = stop_rules
        self.secure_aggregation = secure_aggregation
        self.secure: SecureTrainer | None = None  # the attempt this peer trains for, with --secure-aggregation
        self.expiry = answers_expire_after
        self.keep_solutions_up_to = keep_solutions_up_to
        self.phase: str | None = None  # the controller's phase, as its last heartbeat told it
        self.heard: tuple[int, int, str] | None = None  # (term, round, phase) of the controller's last heartbeat
        # The latest model this peer was given, and who was asked to evaluate it ((): everyone).
        self.offered: tuple[int, int, list, tuple[str, ...]] | None = None
        # What this peer last did for an order, by (term, round, attempt) and (term, round): a repeated order
        # (the controller re-sends after a broker outage) is answered from it instead of being done twice.
        self.fitting: tuple[int, int, int] | None = None
        self.fitted: tuple[int, int, int] | None = None  # the last order whose fit finished
        self.solution: Solution | None = None
        self.evaluating: tuple[int, int] | None = None
        self.evaluation: Evaluation | None = None
        # An order for a model this peer does not hold yet (it is being fetched): started when that model comes.
        self.waiting: Training | None = None
        self.aside: dict[str, Aggregation] = {}  # retained models of peers this one does not follow (yet)

    def on_controller(self, message: Message) -> list[Action]:
        """A live message of the current term's controller."""
        if isinstance(message, Heartbeat):
            self.phase = message.phase
            self.heard = (message.term, message.round, message.phase)
            return self._evaluate_if_due()
        if isinstance(message, (Roster, Maskers, Unmask)):
            return self.secure.on_message(message) if self.secure else []
        if isinstance(message, Training):
            if self.me not in message.trainers:
                return []
            held = self.memory.latest
            if held is not None and message.term <= held.term and message.round <= held.round:
                return [
                    Log(
                        f"ignored a training order of round {message.round}: this peer holds the model of round "
                        f"{held.round} already (a late copy, or a replay)",
                        "debug",
                    )
                ]
            order = (message.term, message.round, message.attempt)
            if self.secure is not None and self.secure.key == order:
                return [
                    *self.secure.resend(),
                    Log(f"round {message.round}: the order came again; sending my answers again", "debug"),
                ]
            if order == self.fitting:
                if (
                    self.solution is not None
                    and (self.solution.term, self.solution.round, self.solution.attempt) == order
                ):
                    return [
                        Publish(self.solution, expiry=self.expiry),
                        Log(f"round {message.round}: the order came again; sending my solution again"),
                    ]
                if order != self.fitted:
                    return [Log(f"round {message.round}: the order came again; still training", "debug")]
                # done, but the solution was too large to keep: train again
            held = self.memory.latest
            if held is not None and held.round == message.round - 1 and held.digest == message.digest:
                return self._fit(message, held.weights)
            if message.weights:  # a new controller's first orders: the model comes along
                if misfit := self._misfit(message):
                    return misfit
                if WeightCodec.digest(message.weights) == message.digest:
                    return self._fit(message, message.weights)
            self.waiting = message
            have = f"round {held.round}" if held else "none"
            return [
                Log(
                    f"round {message.round}: chosen to train, but this peer lacks the model the order names "
                    f"(round {message.round - 1}, {message.digest[:8]}; it holds {have}); fetching it"
                ),
                FetchModel(message.round - 1, message.digest),
            ]
        if isinstance(message, Aggregation):
            if misfit := self._misfit(message):
                return misfit
            if message.evaluators and self.me not in message.evaluators:
                return [
                    *self._adopt(message),
                    *self._waiting_for(message),
                ]  # kept, as every peer keeps the latest model; others evaluate this one
            # Every live publication of a model this peer has not evaluated is evaluated (the controller
            # re-publishes a model when it lacks evaluations, e.g. in a new term); a model it has evaluated already
            # gets the same answer again. Retained copies come through `on_retained_model`.
            held = self.memory.latest
            if held is not None and message.term <= held.term and message.round < held.round:
                return [
                    Log(
                        f"ignored the model of round {message.round} (term {message.term}): this peer holds round "
                        f"{held.round} of term {held.term} (a late copy, or a replay); not evaluated",
                        "debug",
                    )
                ]
            model = (message.term, message.round)
            if model == self.evaluating:
                if self.evaluation is not None and (self.evaluation.term, self.evaluation.round) == model:
                    return [Publish(self.evaluation, expiry=self.expiry)]
                return []
            self.evaluating = model
            return [
                *self._adopt(message),
                *self._waiting_for(message),
                StartJob("evaluate", message.term, message.round, 1, message.weights),
            ]
        if isinstance(message, Metrics):
            summary = RoundSummary(message.round, message.term, message.accuracy, message.loss, message.bytes)
            return [FinishRound(summary, message.run_started)]
        if isinstance(message, Finish):
            if self.stop_rules and (
                why := implausible_finish(message.reason, message.round, self.memory.finished, *self.stop_rules)
            ):
                return [
                    Log(
                        f"refused a finish from {message.controller} ({message.reason} after round {message.round}): "
                        f"{why}; a forgery (a member holding the secret can sign one in any name without per-peer "
                        "logins); going on",
                        "warning",
                    )
                ]
            failed = message.reason in GIVE_UP_REASONS
            return [
                Log(
                    f"finish received from {message.controller} ({message.reason}) after round {message.round}: "
                    f"accuracy {message.accuracy:.4f}",
                    "error" if failed else "info",
                ),
                Exit(EXIT_GAVE_UP if failed else EXIT_OK),
            ]
        return []

    def on_shares(self, message: Shares) -> list[Action]:
        """Another trainer's encrypted shares (secure aggregation): for this peer's attempt, if it has one."""
        return self.secure.on_message(message) if self.secure else []

    def on_finished_run(self, message: Finish) -> list[Action]:
        """The broker's retained finish: this run ended before this peer came (or came back). One that cannot be true
        by the round limit (the only rule a peer that just came can check) is refused."""
        if self.stop_rules and message.reason == "max-rounds" and message.round < self.stop_rules[0]:
            return [
                Log(
                    f"refused a retained finish of {message.controller} (max-rounds after round {message.round}): "
                    f"round {message.round} is not the last ({self.stop_rules[0]}); planted, or of a run with other "
                    "settings",
                    "warning",
                )
            ]
        failed = message.reason in GIVE_UP_REASONS
        return [
            Log(
                f"this run is over: {message.controller} ended it ({message.reason}) after round {message.round}"
                f" with accuracy {message.accuracy:.4f}; nothing to do here (a new run needs a new --run-id)",
                "error" if failed else "info",
            ),
            Exit(EXIT_GAVE_UP if failed else EXIT_OK),
        ]

    def on_retained_model(self, message: Aggregation, controller: str | None = None) -> list[Action]:
        """The broker's retained aggregation, delivered when this peer subscribed (or fetched the models again): the
        model a late joiner starts from, not an order to evaluate it. Who published it comes first: held only if it
        is `controller`'s (the peer this one follows), or if it is the model a waiting order names (its digest
        vouches for it, whoever kept it). Any other (a member's planted one, or one of a controller this peer does
        not follow yet) is set aside until this peer follows its publisher (`on_follow`), at most two of them.
        A model held is evaluated only if the controller's heartbeat says that very model's round is being evaluated
        now (this peer came back to the broker while the controller waited for its evaluation): so the controller
        need not publish a model to everyone again for one peer that reconnects."""
        if misfit := self._misfit(message):
            return misfit
        if starts := self._waiting_for(message):
            return [*self._adopt(message, note="the model an order names"), *starts]
        if controller is not None and message.controller == controller:
            return [*self._adopt(message, note="retained by the broker"), *self._evaluate_if_due()]
        if message.controller in self.aside or len(self.aside) < ASIDE_KEPT:
            self.aside[message.controller] = message
        return []

    def on_follow(self, controller: str) -> list[Action]:
        """This peer now follows `controller`: the model it retained, if one was set aside, is the one to hold."""
        message = self.aside.pop(controller, None)
        if message is None:
            return []
        return [*self._adopt(message, note="retained by the broker"), *self._evaluate_if_due()]

    def _evaluate_if_due(self) -> list[Action]:
        """Evaluate the latest model this peer holds if the controller is collecting evaluations of it, asked this
        peer, and this peer has not evaluated it yet."""
        offered, heard = self.offered, self.heard
        if offered is None or heard is None:
            return []
        term, round_, weights, evaluators = offered
        if heard != (term, round_, "evaluating") or (term, round_) == self.evaluating:
            return []
        if evaluators and self.me not in evaluators:
            return []
        self.evaluating = (term, round_)
        return [
            Log(f"round {round_}: the controller waits for this peer's evaluation of the model it holds; evaluating"),
            StartJob("evaluate", term, round_, 1, weights),
        ]

    def reconnected(self, current_term: int) -> list[Action]:
        """Back on the broker: what this peer sent while it was gone may be lost, so its answers of this term go
        out again (the controller ignores what it already has)."""
        out: list[Action] = [
            Publish(answer, expiry=self.expiry)
            for answer in (self.solution, self.evaluation)
            if answer is not None and answer.term == current_term
        ]
        if self.secure is not None and self.secure.order.term == current_term:
            out += self.secure.resend()
        return out

    def on_job_done(self, done: JobDone, current_term: int) -> list[Action]:
        job = done.job
        if done.error or done.result is None:
            return [Log(f"round {job.round}: {job.kind} failed: {done.error}", "error")]
        if job.kind == "fit":
            weights, samples, loss = done.result
            if job.term != current_term:
                return [Log(f"round {job.round}: training done but term {job.term} is over; solution dropped")]
            if self.secure_aggregation:
                self.fitted = (job.term, job.round, job.attempt)
                if self.secure is None or self.secure.key != self.fitted:
                    return [Log(f"round {job.round}: training done for an attempt that is over; nothing sent")]
                log = Log(f"round {job.round}: trained {samples} samples in {done.seconds:.1f}s (loss {loss:.4f})")
                return [log, *self.secure.on_fit(weights, samples, loss)]
            solution = Solution(job.term, job.round, job.attempt, self.me, samples, loss, weights)
            self.fitted = (job.term, job.round, job.attempt)
            small = sum(np.asarray(w).nbytes for w in weights) <= self.keep_solutions_up_to
            self.solution = solution if small else None
            return [
                Publish(solution, expiry=self.expiry),
                Log(
                    f"round {job.round}: trained {samples} samples in {done.seconds:.1f}s (loss {loss:.4f}), "
                    "solution sent"
                ),
            ]
        accuracy, loss, samples = done.result
        self.evaluation = Evaluation(job.term, job.round, self.me, accuracy, loss, samples)
        return [
            RecordEvaluation(job.round, job.term, accuracy, loss, samples),
            Publish(self.evaluation, expiry=self.expiry),
            Log(
                f"round {job.round}: global model scores accuracy {accuracy:.4f}, loss {loss:.4f} on my "
                f"{samples} test samples ({done.seconds:.1f}s)"
            ),
        ]

    def _fit(self, order: Training, weights) -> list[Action]:
        self.fitting, self.waiting = (order.term, order.round, order.attempt), None
        keys: list[Action] = []
        if self.secure_aggregation:  # fresh keys for every attempt, exchanged while the model trains
            self.secure = SecureTrainer(self.me, order, weights, self.expiry)
            keys = self.secure.start()
        return [
            Log(f"round {order.round}: chosen to train (attempt {order.attempt})"),
            *keys,
            StartJob("fit", order.term, order.round, order.attempt, weights),
        ]

    def _waiting_for(self, message: Aggregation) -> list[Action]:
        """The waiting order, started if `message` is the model it names."""
        order = self.waiting
        if order is None or message.round != order.round - 1:
            return []
        model = GlobalModel(message.round, message.term, message.weights)
        if model.digest != order.digest:
            return []
        return self._fit(order, message.weights)

    def _misfit(self, message: Aggregation | Training) -> list[Action]:
        """[one warning] if the message's model does not fit this peer's model, else []."""
        shapes = tuple(tuple(w.shape) for w in message.weights)
        if self.shapes is None or shapes == self.shapes:
            return []
        return [
            Log(
                f"refused the {message.TYPE} of round {message.round} from {message.controller}: its model "
                f"({len(shapes)} tensors) does not fit this peer's ({len(self.shapes)} tensors"
                f"{', other shapes' if len(shapes) == len(self.shapes) else ''}); is every peer running the "
                "same --dataset and model?",
                "warning",
            )
        ]

    def _adopt(self, message: Aggregation, note: str = "") -> list[Action]:
        if not self.memory.is_newer(message.round, message.term):
            return []
        self.offered = (message.term, message.round, message.weights, tuple(message.evaluators))
        model = GlobalModel(message.round, message.term, message.weights, message.trainers, message.controller)
        return [AdoptModel(model, note)]
