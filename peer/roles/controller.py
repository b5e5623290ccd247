"""The controller role as a pure machine: it runs the rounds of one term and never trains.

A round: choose trainers among the live peers, send them the global model (Training), collect their Solutions,
average them (FedAvg), publish the new global model (Aggregation, retained), collect every peer's Evaluation of it,
record the round and publish its Metrics. Then the next round, or the Finish.

Like the election, it does no I/O and reads no clock: messages, peers coming and going and ticks go in with `now`
(monotonic seconds), and every method returns the actions (`peer.roles.actions`) for the node to carry out. Wall-clock
times in the records are `now + wall_offset`, the offset handed in when the term starts.

A new controller resumes from the latest global model its peer holds: if that model's metrics were never published
(the old controller died in between), it evaluates that round first; otherwise it trains the next one. So no finished
round is lost and none is counted twice.

The round's aggregate is a pseudo-gradient for the server optimizer (`RoundRules.optimizer`,
`peer.learning.server_optimizers`; `sgd` at lr 1, the default, leaves it untouched: FedAvg), and with client-level DP
(`RoundRules.privacy`, `peer.learning.privacy`) the updates are clipped and noised and the privacy spent is counted.
The optimizer's state and the privacy ledger belong to the global model they were made with: the controller
publishes them (`ServerState`, retained on its own topic, which only controllers subscribe to) before the model, and
a new controller that resumes from a model of round > 0 waits, before anything else, for the state of that very model
(same digest, same publisher and term), which the broker hands it as it subscribes. A state that never comes (the
broker lost it) is replaced, after a round deadline, by a fresh one, said in the log and the events, and the privacy
ledger then counts every earlier round against every peer.
"""

from __future__ import annotations

import enum
import math
import random
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

from peer.learning.aggregation import AggregationRefused, Aggregator
from peer.learning.privacy import Ledger, Privacy, clip, noised_mean, update_of
from peer.learning.privacy import epsilon as privacy_epsilon
from peer.learning.server_optimizers import OptimizerError, OptimizerState, ServerOptimizer, state_from_tensors
from peer.roles.actions import (
    EXIT_GAVE_UP,
    EXIT_OK,
    Action,
    AdoptModel,
    Exit,
    FinishRound,
    Log,
    Print,
    Publish,
    RecordElection,
    RecordEvent,
    RecordRound,
    RecordRun,
    SaveCheckpoint,
    SaveModel,
)
from peer.roles.rounds import (
    EvaluationCollector,
    GlobalModel,
    ModelStore,
    RoundOutcome,
    RoundSummary,
    ServerMemory,
    SolutionCollector,
    choose_evaluators,
    choose_trainers,
    implausible_finish,
)
from peer.roles.secure import SecureCollector, SecureResult
from peer.wire.messages import (
    Aggregation,
    Evaluation,
    Finish,
    Heartbeat,
    Keys,
    Masked,
    Message,
    Metrics,
    Reveal,
    ServerState,
    Shares,
    Solution,
    Training,
)
from peer.wire.weights import WeightCodec

FINISH_EXPIRY_S = 24 * 3600  # the retained Finish tells a peer (re)started for this run that it is over
MAX_REPUBLISH = 3  # a model nobody evaluates is published this many more times, then the run gives up
MAX_ATTEMPTS = 10  # a round that gets no quorum of solutions this many times in a row gives the run up
NO_SHOW_LIMIT = 3  # a member that misses this many answers in a row leaves the term's quorum until it answers again
COUNT_RATIO = 2  # without the run's shard sizes, a member declares at most this many times the others' median count


class Phase(str, enum.Enum):
    STARTING = "starting"
    TRAINING = "training"  # a training order is out; collecting solutions
    EVALUATING = "evaluating"  # a global model is out; collecting evaluations
    WAITING_PEERS = "waiting-peers"  # too few peers for the next step; resumes when one comes
    FINISHED = "finished"


@dataclass(frozen=True)
class RoundRules:
    """What the controller needs of the settings: how a round is run and when the run ends."""

    trainers: int = 3
    min_solutions: int = 2
    evaluators: int = 0  # peers asked to evaluate a round's model; 0: every peer
    max_rounds: int = 10
    target_accuracy: float = 0.99
    round_deadline: float = 60.0
    heartbeat: float = 1.0
    wait_timeout: float = 600.0
    aggregation: str = "fedavg"
    wire_dtype: str = "float32"  # the global model is held as its peers receive it
    run_settings: Mapping = field(default_factory=dict)  # every setting, for run.json
    secure_aggregation: bool = False  # the controller sees only the sum of the updates (peer.roles.secure)
    optimizer: ServerOptimizer = ServerOptimizer()  # the server optimizer; sgd at lr 1 is FedAvg
    privacy: Privacy = Privacy()  # client-level DP; off by default
    proximal_mu: float = 0.0  # the trainers' FedProx mu (they apply it; here only to be shown in the plan)

    @property
    def keeps_server_state(self) -> bool:
        """Whether the controller carries state from round to round that the next controller must go on from."""
        return self.optimizer.stateful or self.privacy.on

    def plan(self) -> dict:
        """How the run trains, named as the settings are (`--server-lr` is `server_lr`): what every aggregation
        carries for people and pages to see, and graph titles are made of."""
        optimizer, privacy = self.optimizer, self.privacy
        plan: dict = {"aggregation": self.aggregation, "server_optimizer": optimizer.name, "server_lr": optimizer.lr}
        if optimizer.name == "momentum":
            plan["server_momentum"] = optimizer.momentum
        elif optimizer.name != "sgd":
            plan["beta1"] = optimizer.beta1
            if optimizer.name != "adagrad":
                plan["beta2"] = optimizer.beta2
            plan["tau"] = optimizer.tau
        if self.proximal_mu:
            plan["proximal_mu"] = self.proximal_mu
        if privacy.on:
            plan |= {
                "dp_clip": privacy.clip,
                "dp_noise_multiplier": privacy.noise_multiplier,
                "dp_local": privacy.local,
                "dp_delta": privacy.delta,
                "dp_accountant": privacy.accountant,
            }
            if privacy.target_epsilon is not None:
                plan["dp_target_epsilon"] = privacy.target_epsilon
        return plan

    # The most (train, test) samples any shard of the run holds, as every peer computes it from the run's data
    # settings (dataset, partition, seed, shards, caps); None when shards come from --data-dir: then the bound is
    # COUNT_RATIO times the other members' median.
    count_bound: tuple[int, int] | None = None


def _free(message: Message) -> int:
    return 0


class Controller:
    def __init__(
        self,
        me: str,
        rules: RoundRules,
        term: int,
        reason: str,
        members: tuple[str, ...],
        live: Iterable[str],
        memory: ModelStore,
        rng: random.Random,
        wall_offset: float = 0.0,
        initial_weights: list[np.ndarray] | None = None,
        announced: Mapping[str, tuple[int, int]] | None = None,
        model_fingerprint: str = "0" * 16,
        wire_cost: Callable[[Message], int] = _free,
        noise_source: Callable[[], np.random.Generator] = np.random.default_rng,
    ):
        """`memory` is what this peer knows of the run when it takes office (read here, never written: the node
        owns it); `initial_weights` start a run that has no global model yet; `announced` holds each peer's
        (train, test) sample counts from its init, the most it may declare; `wire_cost` says what a message puts
        on the wire (`peer.wire.session.Outbox.cost`), for the round's byte count. `noise_source` gives the
        generator of a round's central DP noise: by default a new one seeded from the OS's entropy each round,
        never from `rng`, whose draws every peer reads in the training orders (the trainers it chose) and whose
        state (a Mersenne Twister) they could therefore reconstruct, and so predict and subtract the noise."""
        self.me, self.rules, self.term, self.reason = me, rules, term, reason
        self.fingerprint = model_fingerprint  # named in every heartbeat: peers of another model stay out
        self.members, self.rng, self.wall_offset = members, rng, wall_offset
        self.wire_cost = wire_cost
        self.noise_source = noise_source
        self.live = set(live) | {self.me}  # its own set, kept current by peer_up / peer_down
        self.announced: dict[str, tuple[int, int]] = dict(announced or {})
        self.aggregator = Aggregator(rules.aggregation)
        self.suspects: set[str] = set()  # trainers whose solutions broke a limit this term: chosen last
        self.missed: dict[str, int] = {}  # members' answers (solutions, evaluations) missed in a row this term
        self.capped: set[str] = set()  # members whose announced counts were lowered (said once)
        if memory.latest is None and initial_weights is None:
            raise ValueError("a controller without a global model needs initial weights")
        # A run without a global model yet starts from the initial weights as round 0 (`take_office` adopts them).
        self.fresh = memory.latest is None
        self.model: GlobalModel = memory.latest or GlobalModel(0, term, initial_weights or [])
        self.history: dict[int, RoundSummary] = dict(memory.finished)
        self.run_started = memory.run_started
        self.phase = Phase.STARTING
        self.round = self.model.round
        self.solutions: SolutionCollector | None = None
        self.secure: SecureCollector | None = None  # with --secure-aggregation: this attempt's masked exchange
        self.evaluations: EvaluationCollector | None = None
        self.attempt = 0
        self.round_started: float | None = None
        self.round_bytes = 0
        self.waiting_for = ""  # why nothing happens (too few peers); logged once per change
        self.waiting_since: float | None = None
        self.republished = 0  # publications of the current model that brought no evaluation
        self.on_broker: str | None = None  # digest of the model this controller last published (retained)
        self.resend_due: float | None = None  # when to send the current order again (a waited-for peer is back)
        self.last_resend = float("-inf")
        self.next_heartbeat = 0.0
        self.evaluators: tuple[str, ...] = ()  # the peers asked to evaluate the model out now; (): every peer
        self.everyone_next = False  # the next publication asks every peer: its model may be the final one
        self.plan = rules.plan()
        # The server optimizer's state and the privacy ledger after the aggregation of self.model (see the module).
        self.optimizer_state: OptimizerState | None = None
        self.ledger = Ledger()
        self.restored = False  # they came from the checkpoint the run resumed from
        self.state_missing = False  # they are another controller's, not received yet: nothing happens before
        self.state_wait_until = float("inf")
        self.state_shared: tuple[int, int, str] | None = None  # (term, round, digest) of the state last published
        self.epsilons: dict[int, float] = {}  # releases -> epsilon, as the accountant computed it
        if rules.keeps_server_state:
            saved = memory.server
            if self.fresh or self.model.round == 0:
                self.optimizer_state = rules.optimizer.initial(self.model.weights)
            elif (
                saved is not None
                and saved.digest == self.model.digest
                and saved.optimizer.optimizer == (rules.optimizer.name)
            ):
                self.optimizer_state, self.ledger, self.restored = saved.optimizer, saved.ledger, True
            else:
                self.state_missing = True

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    # --- inputs: each returns what the controller decided, in order ----------------------------------------------------

    def take_office(self, now: float) -> list[Action]:
        out: list[Action] = [
            RecordElection(self.term, self.me, self.reason, self.members),
            Log(f"controller of term {self.term} ({self.reason}), members {','.join(self.members)}"),
        ]
        if self.run_started is None:
            self.run_started = self._wall(now)
        for peer in sorted(self.announced):
            out += self._note_capped(peer)
        if self.fresh:
            out += self._adopt(self.model)
            out.append(Log("no global model yet: starting from a fresh model (round 0)"))
            return out + self._publish_model(now)
        if self.restored:
            out.append(self._state_event("restored", source="checkpoint"))
        if self.state_missing:
            # The broker hands the retained state over as this controller subscribes: milliseconds, normally.
            self.state_wait_until = now + self.rules.round_deadline
            publisher = self.model.controller or "its controller"
            return out + [
                Log(
                    f"waiting for the server state of round {self.model.round} ({self.rules.optimizer.name}"
                    f"{', privacy ledger' if self.rules.privacy.on else ''}) that {publisher} published"
                )
            ]
        return out + self._go_on(now)

    def _go_on(self, now: float) -> list[Action]:
        """From the model this controller took office with: evaluate it again, or go on after it."""
        out: list[Action] = []
        if self.model.round not in self.history:
            out.append(
                Log(f"resuming: round {self.model.round} was aggregated but its metrics were lost; evaluating it again")
            )
            return out + self._publish_model(now)
        out.append(Log(f"resuming after round {self.model.round}"))
        # Whether the target was reached is the previous controller's call (it did not make it, or it would have
        # finished): the published metric alone is no proof (one member's evaluation can inflate it).
        return out + self._after_round(self.history[self.model.round], now, reached=False)

    def on_message(self, message: Message, size: int, now: float) -> list[Action]:
        """A solution or an evaluation of this term (`size`: its payload bytes, counted in the round's traffic)."""
        out: list[Action] = []
        if isinstance(message, (Keys, Masked, Reveal)):
            return self.on_secure(message, size, now)
        if isinstance(message, Solution) and self.secure is not None:
            return [Log(f"ignored a plain solution from {message.peer}: this round is securely aggregated", "warning")]
        if isinstance(message, Solution):
            solutions = self.solutions if self.phase is Phase.TRAINING else None
            if solutions is None:  # a late one (a thawed or slow trainer): say so, as for any other refused solution
                return [
                    Log(
                        f"ignored a solution from {message.peer}: it is for term {message.term} round "
                        f"{message.round} attempt {message.attempt}, and no round is collecting solutions "
                        f"({self.phase.value})"
                    )
                ]
            why_not = solutions.offer(
                message.term, message.round, message.attempt, message.peer, message.weights, message.samples
            )
            if why_not:
                return [Log(f"ignored a solution from {message.peer}: {why_not}")]
            self.round_bytes += size
            if self.rules.privacy.local:  # its noised update is out: a release of its data
                self.ledger = self.ledger.released([message.peer])
            out += self._answered(message.peer)
            out.append(
                Log(
                    f"solution from {message.peer} ({message.samples} samples, loss {message.loss:.4f}), "
                    f"{len(solutions.received)} of {len(solutions.trainers)}"
                )
            )
        elif isinstance(message, Evaluation) and self.evaluations and self.phase is Phase.EVALUATING:
            why_not = self.evaluations.offer(
                message.term,
                message.round,
                message.peer,
                message.accuracy,
                message.loss,
                message.samples,
                cap=self._cap(message.peer, test=True),
            )
            if why_not:
                return [Log(f"ignored an evaluation from {message.peer}: {why_not}", "debug")]
            self.round_bytes += size
            out += self._answered(message.peer)
        return out + self._advance(now)

    def on_secure(self, message: Keys | Shares | Masked | Reveal, size: int, now: float) -> list[Action]:
        """A trainer's step of the secure aggregation of this attempt (`peer.roles.secure`)."""
        if not self.rules.secure_aggregation:
            return [
                Log(
                    f"ignored the {message.TYPE} of {message.peer}: it runs --secure-aggregation and this controller "
                    "does not (every peer of a run needs the same setting)",
                    "warning",
                )
            ]
        if self.phase is not Phase.TRAINING or self.secure is None:
            return [Log(f"ignored the {message.TYPE} of {message.peer}: no securely aggregated round is on", "debug")]
        why_not = self.secure.offer(message)
        if why_not:
            return [Log(f"ignored the {message.TYPE} of {message.peer}: {why_not}", "debug")]
        self.round_bytes += size
        out: list[Action] = []
        if isinstance(message, Masked):
            masked = len(self.secure.samples)
            out.append(Log(f"round {self.round}: masked update from {message.peer} ({masked} in)"))
        return out + self._advance(now)

    def on_server_state(self, message: ServerState, now: float) -> list[Action]:
        """Another controller's server state (retained, as this one subscribed, or live): taken if this controller
        waits for one and it is the state of the very model it resumes from, as its publisher made it."""
        model = self.model
        why = None
        if not self.state_missing:
            why = "this controller holds the state it goes on from"
        elif (message.round, message.digest) != (model.round, model.digest):
            why = (
                f"it is for round {message.round} ({message.digest[:8]}), not for the model this controller "
                f"resumes from (round {model.round}, {model.digest[:8]})"
            )
        elif (message.controller, message.term) != (model.controller, model.term):
            why = (
                f"it is {message.controller}'s of term {message.term}, but the model was published by "
                f"{model.controller or 'an unknown controller'} in term {model.term}"
            )
        elif message.optimizer != self.rules.optimizer.name:
            why = f"it is of the {message.optimizer} optimizer, and this run's is {self.rules.optimizer.name}"
        else:
            try:
                state = state_from_tensors(
                    message.optimizer, message.step, message.weights, [w.shape for w in model.weights]
                )
            except OptimizerError as err:
                why = str(err)
        if why is not None:
            return [Log(f"ignored a server state of {message.controller}: {why}", "debug")]
        self.optimizer_state = state
        self.ledger = Ledger(MappingProxyType(dict(message.participation)), message.unattributed)
        self.state_missing = False
        out: list[Action] = [
            Log(
                f"going on with {message.controller}'s server state of round {message.round} "
                f"({self.rules.optimizer.name}, step {state.step})"
            ),
            self._state_event("continued", source=message.controller, source_term=message.term),
        ]
        return out + self._go_on(now)

    def _state_lost(self) -> list[Action]:
        """No state came for the model this controller resumes from: fresh moments, and a privacy ledger that counts
        every round so far against every peer (the releases are unknown, so the worst is assumed)."""
        self.state_missing = False
        self.optimizer_state = self.rules.optimizer.initial(self.model.weights)
        self.ledger = Ledger(unattributed=self.model.round if self.rules.privacy.on else 0)
        return [
            Log(
                f"no server state of round {self.model.round} came within {self.rules.round_deadline:g}s: the "
                f"{self.rules.optimizer.name} optimizer starts from fresh moments"
                + (
                    f"; the privacy ledger counts all {self.model.round} rounds against every peer"
                    if self.ledger.unattributed
                    else ""
                ),
                "warning",
            ),
            self._state_event("fresh", source=""),
        ]

    def _state_event(self, action: str, **fields) -> RecordEvent:
        """An events.jsonl line on the server state this controller holds now (its slots' norms: what a controller
        that continues another's moments holds can be compared with what the other one sent)."""
        state = self.optimizer_state
        norms = state.norms() if state is not None else {}
        return RecordEvent(
            "server-state",
            {
                "action": action,
                "round": self.model.round,
                "digest": self.model.digest,
                "optimizer": self.rules.optimizer.name,
                "step": state.step if state is not None else 0,
                **{f"{name}_norm": value for name, value in norms.items()},
                "releases": self.ledger.most,
                "epsilon": self._epsilon(self.ledger.most),
                **fields,
            },
        )

    def _epsilon(self, releases: int) -> float | None:
        """Epsilon after `releases` releases of one peer's update (None without DP), cached: the accountant's
        numerical work is done once per count."""
        privacy = self.rules.privacy
        if not privacy.on:
            return None
        if releases not in self.epsilons:
            self.epsilons[releases] = privacy_epsilon(
                privacy.noise_multiplier, releases, privacy.delta, privacy.accountant
            )
        return self.epsilons[releases]

    def _share_state(self) -> list[Action]:
        """This controller's server state for the model it publishes, retained on its own topic before the model
        itself (so whoever holds the model can find its state), once per term and model."""
        state = self.optimizer_state
        if not self.rules.keeps_server_state or self.state_missing or state is None or self.model.round == 0:
            return []
        key = (self.term, self.model.round, self.model.digest)
        if self.state_shared == key:
            return []
        self.state_shared = key
        message = ServerState(
            self.term,
            self.me,
            self.model.round,
            self.model.digest,
            state.optimizer,
            state.step,
            dict(self.ledger.counts),
            self.ledger.unattributed,
            state.tensors(),
        )
        return [self._counted(Publish(message, retain=True, expiry=FINISH_EXPIRY_S))]

    def _server_memory(self) -> ServerMemory | None:
        if not self.rules.keeps_server_state or self.state_missing or self.optimizer_state is None:
            return None
        return ServerMemory(self.model.digest, self.optimizer_state, self.ledger)

    def peer_up(
        self, peer: str, now: float, samples: tuple[int, int] | None = None, returned: bool = False
    ) -> list[Action]:
        """A peer is online. `samples`: the (train, test) counts its init announced, when this came from an init.
        `returned`: that init says the peer (re)connected (it is no answer to another's), so it may have missed
        what was sent meanwhile."""
        if peer == self.me:
            return []
        out: list[Action] = []
        if samples is not None:
            self.announced[peer] = samples
            out += self._note_capped(peer)
        if returned and self.phase is Phase.TRAINING and self._waits_for(peer):
            # It missed the current order (the broker was away, or it came back after it went out): send it again,
            # at most once a heartbeat however many peers come back at once. Orders are small; a model is not
            # published to everyone again for one returning evaluator: it evaluates the retained one itself when
            # the heartbeat says the controller waits for it (Follower.on_retained_model).
            self.resend_due = max(now, self.last_resend + self.rules.heartbeat)
        if peer not in self.live:
            out.append(Log(f"{peer} joined"))
        self.live.add(peer)
        self.next_heartbeat = now  # tell the newcomer at once who leads
        if self.phase is Phase.WAITING_PEERS:
            out += self._resume_waiting(now)
        return out

    def peer_down(self, peer: str, now: float) -> list[Action]:
        self.live.discard(peer)
        if self.solutions:
            self.solutions.trainer_lost(peer)
        if self.secure:
            self.secure.trainer_lost(peer)
        if self.evaluations:
            self.evaluations.peer_lost(peer)
        return self._advance(now)

    def reconnected(self, now: float) -> list[Action]:
        """Back on the broker after losing it: what was published meanwhile may be lost (an order, a solution, an
        evaluation), so the current order goes out again at once; trainers answer it from what they already did."""
        self.next_heartbeat = now
        out: list[Action] = []
        if self.phase is Phase.TRAINING and self.solutions:
            # A restarted broker lost the retained model too, which a trainer lacking it would fetch.
            out.append(Publish(self._aggregation(()), retain=True))
            self.on_broker = self.model.digest
        self.state_shared = None  # (a restarted broker lost it too)
        return self._share_state() + out + self._resend(now, "reconnected")

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        if now >= self.next_heartbeat and not self.finished:
            out.append(self._heartbeat(now))
        if self.resend_due is not None and now >= self.resend_due:
            out += self._resend(now, "a peer it waits for is back")
        if (
            self.phase is Phase.WAITING_PEERS
            and self.waiting_since is not None
            and now - self.waiting_since >= self.rules.wait_timeout
        ):
            return out + self._give_up(
                "too-few-peers", f"waited {now - self.waiting_since:.0f}s (--wait-timeout): {self.waiting_for}", now
            )
        return out + self._advance(now)

    # --- helpers ------------------------------------------------------------------------------------------------------

    def _waits_for(self, peer: str) -> bool:
        if self.phase is Phase.TRAINING and self.solutions:
            return peer in self.solutions.outstanding
        if self.phase is Phase.EVALUATING and self.evaluations:
            return peer in self.evaluations.expected and peer not in self.evaluations.received
        return False

    def _resend(self, now: float, why: str) -> list[Action]:
        self.resend_due, self.last_resend = None, now
        if self.phase is Phase.TRAINING and self.solutions:
            return [
                Log(f"round {self.round}: {why}; sending the training order again"),
                self._counted(Publish(self._order(self.solutions.trainers), expiry=self._order_expiry)),
                *(self._counted(p) for p in (self.secure.resend() if self.secure else []) if isinstance(p, Publish)),
            ]
        if self.phase is Phase.EVALUATING and self.evaluations:
            return [
                Log(f"round {self.round}: {why}; publishing the model again"),
                self._counted(Publish(self._aggregation(self.evaluators), retain=True)),
            ]
        return []

    def _aggregation(self, evaluators: tuple[str, ...]) -> Aggregation:
        """The current global model as the message that publishes it."""
        model = self.model
        return Aggregation(self.term, self.me, model.round, model.trainers, model.weights, evaluators, self.plan)

    def _counted(self, publish: Publish) -> Publish:
        """`publish`, its bytes on the wire counted in the round's traffic."""
        self.round_bytes += self.wire_cost(publish.message)
        return publish

    def _adopt(self, model: GlobalModel) -> list[Action]:
        """Hold `model` as the global one, as the peers will receive it: rounded to the wire's dtype, so the digest a
        training order names is the digest of what the trainers hold."""
        quantized = WeightCodec.quantized(model.weights, self.rules.wire_dtype)
        if quantized is not model.weights:
            model = GlobalModel(model.round, model.term, quantized, model.trainers)
        self.model = model
        return [AdoptModel(model)]

    def _wall(self, now: float) -> float:
        return now + self.wall_offset

    def _cap(self, peer: str, test: bool = False) -> int | None:
        """The most samples `peer` may declare (in a solution, an evaluation): what it announced, but never more than
        the run's data settings allow any shard, or, for shards from --data-dir, COUNT_RATIO times the median of the
        other members' announcements. None: it announced nothing."""
        announced = self.announced.get(peer)
        if announced is None:
            return None
        index = 1 if test else 0
        return min(announced[index], self._count_limit(peer, index))

    def _count_limit(self, peer: str, index: int) -> int:
        if self.rules.count_bound is not None:
            return self.rules.count_bound[index]
        others = sorted(counts[index] for p, counts in self.announced.items() if p != peer and p in self.live)
        if not others:
            return self.announced[peer][index]
        return max(1, COUNT_RATIO * others[(len(others) - 1) // 2])

    def _note_capped(self, peer: str) -> list[Action]:
        """One warning the first time a member's announced counts are lowered to what anyone may hold."""
        train, test = self.announced[peer]
        limits = self._count_limit(peer, 0), self._count_limit(peer, 1)
        if peer in self.capped or (train <= limits[0] and test <= limits[1]):
            return []
        self.capped.add(peer)
        where = "the run's shards" if self.rules.count_bound is not None else f"{COUNT_RATIO}x the others' median"
        return [
            Log(
                f"{peer} announced {train} train and {test} test samples; no member may declare more than {where} "
                f"allow ({limits[0]}, {limits[1]}): it is counted as at most that",
                "warning",
            )
        ]

    # --- no-shows -------------------------------------------------------------------------------------------------

    def awaited_trainers(self) -> frozenset[str]:
        """The trainers whose solutions this controller waits for now (their chunks are the only ones it takes)."""
        if self.phase is Phase.TRAINING and self.solutions:
            return frozenset(self.solutions.outstanding)
        return frozenset()

    def _answered(self, peer: str) -> list[Action]:
        missed = self.missed.pop(peer, 0)
        if missed >= NO_SHOW_LIMIT:
            return [Log(f"{peer} answers again: it is back in this term's quorum")]
        return []

    def _no_shows(self, peers: Iterable[str], what: str, round_: int) -> list[Action]:
        """Members that did not answer by the deadline: not waited for again (this round's evaluation, the next
        rounds' evaluations), chosen last as trainers, and after NO_SHOW_LIMIT misses in a row out of the quorum."""
        out: list[Action] = []
        for peer in sorted(peers):
            count = self.missed[peer] = self.missed.get(peer, 0) + 1
            if count == NO_SHOW_LIMIT:
                out.append(
                    Log(
                        f"{peer} missed {count} answers in a row: it leaves this term's quorum (not chosen, not "
                        "waited for) until it answers again",
                        "warning",
                    )
                )
            elif count < NO_SHOW_LIMIT:
                out.append(
                    Log(
                        f"round {round_}: no {what} from {peer} by the deadline ({count} of {NO_SHOW_LIMIT} misses in "
                        "a row): not waited for again, chosen last",
                        "warning",
                    )
                )
        return out

    def forged_finish(self, message: Finish, now: float) -> list[Action]:
        """A finish in this controller's name that it did not send. Its followers drop one they can tell is a lie (a
        round limit not reached, a target missed); one they cannot (a give-up) ends the run for them, so it ends here
        too, at once, instead of after --wait-timeout alone."""
        if self.finished or implausible_finish(
            message.reason, message.round, self.history, self.rules.max_rounds, self.rules.target_accuracy
        ):
            return []
        return self._give_up(
            "forged-finish",
            f"a finish ({message.reason}) in this controller's name that it did not send was believed by its "
            "followers; they left",
            now,
        )

    # --- rounds -------------------------------------------------------------------------------------------------------

    def _others(self) -> set[str]:
        return self.live - {self.me}

    def _wait_for_peers(self, why: str, now: float) -> list[Action]:
        if self.phase is not Phase.WAITING_PEERS:
            self.waiting_since = now
        self.phase = Phase.WAITING_PEERS
        if why == self.waiting_for:
            return []
        self.waiting_for = why
        return [Log(f"waiting: {why}", "warning")]

    def _resume_waiting(self, now: float) -> list[Action]:
        if not self._others():
            return []
        self.waiting_for, self.waiting_since = "", None
        if self.evaluations is not None:
            return self._publish_model(now)
        return self._start_training(now)

    def _start_training(self, now: float, retry: bool = False) -> list[Action]:
        candidates = self._others()
        if not candidates:
            self.solutions = None
            return self._wait_for_peers(
                "too few peers for a round: it needs a controller and at least one "
                f"trainer, and only {self.me} is live",
                now,
            )
        if not retry:
            self.attempt, self.round_started, self.round_bytes = 0, now, 0
        self.attempt += 1
        self.round = self.model.round + 1
        trainers = self._choose(candidates)
        quorum = min(self.rules.min_solutions, len(trainers))
        self.solutions = SolutionCollector(
            self.term,
            self.round,
            self.attempt,
            trainers,
            quorum,
            now + self.rules.round_deadline,
            shapes=tuple(w.shape for w in self.model.weights),
        )
        self.evaluations = None
        self.phase = Phase.TRAINING
        order = self._order(trainers)
        self.secure = None
        if self.rules.secure_aggregation:
            caps = {peer: announced[0] for peer, announced in self.announced.items()}
            self.secure = SecureCollector(
                self.me, order, self.model.weights, quorum, caps, now, self.rules.round_deadline
            )
        return [
            self._counted(Publish(order, expiry=self._order_expiry)),
            Log(
                f"round {self.round}{f' attempt {self.attempt}' if self.attempt > 1 else ''}: training order to "
                f"{','.join(trainers)} (quorum {quorum})"
            ),
        ]

    @property
    def _order_expiry(self) -> int:
        """An order that waited on the broker longer than a round's deadline is of a round that has moved on."""
        return max(1, math.ceil(self.rules.round_deadline))

    def _order(self, trainers: tuple[str, ...]) -> Training:
        """The training order: it names the model by digest, and carries it only when this controller has not
        published it itself this term (it resumed from the model another controller published): a trainer may
        not hold that one any more, and it is retained on no topic of this term's controller."""
        weights = [] if self.on_broker == self.model.digest else self.model.weights
        return Training(self.term, self.me, self.round, self.attempt, trainers, self.model.digest, weights)

    def _choose(self, candidates: set[str]) -> tuple[str, ...]:
        """The round's trainers: first those whose sample counts are known (so their weight is bounded), that broke no
        limit and missed no answer this term; then, to fill the count, those that missed (chosen last); members out
        of the quorum (NO_SHOW_LIMIT misses) and suspects only if nobody else is there: a round with a doubtful
        trainer beats no round."""
        count = self.rules.trainers
        present = {p for p in candidates if self.missed.get(p, 0) < NO_SHOW_LIMIT} or candidates
        first = {
            p
            for p in present
            if p not in self.suspects and p not in self.missed and (p in self.announced or not self.announced)
        }
        later = {p for p in present - first if p not in self.suspects}
        if not first and not later:
            first = present
        chosen = choose_trainers(first, count, self.rng)
        if len(chosen) < count and later:
            chosen += choose_trainers(later, count - len(chosen), self.rng)
        return tuple(sorted(chosen))

    def _publish_model(self, now: float) -> list[Action]:
        """Publish the latest global model and collect every live peer's evaluation of it."""
        model = self.model
        self.round = model.round
        self.solutions = None
        self.secure = None
        self.evaluators = self._choose_evaluators(model.round)
        asked = set(self.evaluators) or self._others()
        awaited = {p for p in asked if p not in self.missed}  # a member that missed an answer is heard, not awaited
        self.evaluations = EvaluationCollector(
            self.term, model.round, awaited or asked, now + self.rules.round_deadline, optional=asked
        )
        others = self._others()
        if others:
            self.phase = Phase.EVALUATING
        # A heartbeat first: the model after it takes the broker a while to deliver to every peer, and the peers,
        # told it is coming, do not take the wait for silence (Election.expect_model).
        out: list[Action] = [self._heartbeat(now)] if others else []
        out += [*self._share_state(), self._counted(Publish(self._aggregation(self.evaluators), retain=True))]
        self.on_broker = model.digest
        if not others:
            return out + self._wait_for_peers(f"no peer is live to evaluate the model of round {model.round}", now)
        return out

    def _heartbeat(self, now: float) -> Publish:
        self.next_heartbeat = now + self.rules.heartbeat
        return Publish(Heartbeat(self.term, self.me, self.round, self.phase.value, self.fingerprint), retain=True)

    def _choose_evaluators(self, round_: int) -> tuple[str, ...]:
        """With --evaluators M, M random peers evaluate a round's model (the fan-in of a hundred evaluations per
        round is what a large federation cannot afford); every peer evaluates the last round's model, and a model
        that may end the run (`everyone_next`), so that each peer's records end with the model the run ends with."""
        if round_ >= self.rules.max_rounds or self.everyone_next:
            return ()
        return choose_evaluators(self._others(), self.rules.evaluators, self.rng)

    def _advance(self, now: float) -> list[Action]:
        solutions, evaluations = self.solutions, self.evaluations
        if self.state_missing:
            if self.phase is Phase.STARTING and now >= self.state_wait_until:
                return self._state_lost() + self._go_on(now)
            return []
        if self.phase is Phase.TRAINING and self.secure:
            return self._advance_secure(self.secure, now)
        if self.phase is Phase.TRAINING and solutions:
            outcome = solutions.outcome(now)
            misses: list[Action] = []
            if outcome is not RoundOutcome.WAIT:
                misses = self._no_shows(solutions.outstanding, "solution", self.round)
            if outcome is RoundOutcome.RETRY:
                if self.attempt >= MAX_ATTEMPTS:
                    return self._give_up(
                        "no-solutions", f"round {self.round} got too few solutions in {self.attempt} attempts", now
                    )
                return [
                    *misses,
                    Log(
                        f"round {self.round} attempt {self.attempt}: {len(solutions.received)} of "
                        f"{len(solutions.trainers)} solutions (quorum {solutions.quorum}) by the "
                        "deadline or with the rest gone; choosing trainers again",
                        "warning",
                    ),
                    *self._start_training(now, retry=True),
                ]
            if outcome is RoundOutcome.CLOSE:
                return misses + self._aggregate(solutions, now)
        elif self.phase is Phase.EVALUATING and evaluations and evaluations.done(now):
            misses = self._no_shows(evaluations.missing, "evaluation", evaluations.round)
            return misses + self._close_evaluation(evaluations, now)
        return []

    def _aggregate(self, collector: SolutionCollector, now: float) -> list[Action]:
        caps = {peer: cap for peer in collector.received if (cap := self._cap(peer)) is not None}
        try:
            result = self.aggregator.aggregate(
                self.model.weights,
                collector.contributions(),
                max_samples=caps if len(caps) == len(collector.received) else None,
            )
        except AggregationRefused as refused:
            # A poisoned or diverging round never becomes the model: repeat it, choosing other trainers first.
            self.suspects |= set(refused.suspects)
            return [
                Log(
                    f"round {self.round} attempt {self.attempt}: aggregation refused: {refused}; choosing "
                    "trainers again",
                    "warning",
                ),
                *self._start_training(now, retry=True),
            ]
        out: list[Action] = []
        used = tuple(result.used)
        missing = sorted(set(collector.trainers) - set(collector.received))
        if result.rejected or result.clipped or result.clamped:
            self.suspects |= set(result.rejected) | set(result.clipped) | set(result.clamped)
            out.append(Log(f"round {self.round}: {result.describe()}", "warning"))
        weights, server = self._server_step(result.weights, used, collector)
        if not all(np.isfinite(w).all() for w in weights):
            return [
                Log(
                    f"round {self.round} attempt {self.attempt}: the {self.rules.optimizer.name} server step gave NaN "
                    "or infinite weights (is --server-lr too large?); choosing trainers again",
                    "warning",
                ),
                *self._start_training(now, retry=True),
            ]
        out += self._adopt(GlobalModel(self.round, self.term, weights, used, self.me))
        without = f" (closed without {','.join(missing)})" if missing else ""
        name = "FedAvg" if result.strategy == "fedavg" else result.strategy
        out.append(Log(f"round {self.round}: {name} of {len(used)} solutions from {','.join(used)}{without}"))
        if server is not None:
            self.optimizer_state, self.ledger = server
            out.append(self._state_event("updated"))
        self.republished = 0
        return out + self._publish_model(now)

    def _advance_secure(self, secure: SecureCollector, now: float) -> list[Action]:
        out: list[Action] = [self._counted(a) if isinstance(a, Publish) else a for a in secure.advance(now)]
        if secure.failed is not None:
            if self.attempt >= MAX_ATTEMPTS:
                return out + self._give_up(
                    "no-solutions",
                    f"round {self.round} could not be securely aggregated in {self.attempt} attempts",
                    now,
                )
            return [
                *out,
                Log(
                    f"round {self.round} attempt {self.attempt}: secure aggregation failed: {secure.failed}; choosing "
                    "trainers again",
                    "warning",
                ),
                *self._start_training(now, retry=True),
            ]
        if secure.result is not None:
            return out + self._aggregate_secure(secure.result, now)
        return out

    def _aggregate_secure(self, result: SecureResult, now: float) -> list[Action]:
        """The unmasked mean as the new model, if it passes the checks every aggregate passes (finite, not grown
        beyond reason): the controller has no single update to check, only their sum."""
        self.suspects |= set(result.liars)
        try:
            checked = self.aggregator.aggregate(self.model.weights, [("the sum", result.weights, 1)])
        except AggregationRefused as refused:
            return [
                Log(
                    f"round {self.round} attempt {self.attempt}: the unmasked sum was refused: {refused}; choosing "
                    "trainers again",
                    "warning",
                ),
                *self._start_training(now, retry=True),
            ]
        out: list[Action] = []
        if result.liars:
            out.append(Log(f"round {self.round}: wrong shares from {','.join(result.liars)}", "warning"))
        out += self._adopt(GlobalModel(self.round, self.term, checked.weights, result.survivors))
        without = f" (closed without {','.join(result.dropped)})" if result.dropped else ""
        out.append(
            Log(
                f"round {self.round}: secure FedAvg of {len(result.survivors)} masked updates from "
                f"{','.join(result.survivors)}{without}"
            )
        )
        self.republished = 0
        return out + self._publish_model(now)

    def _server_step(
        self, aggregate: list[np.ndarray], used: tuple[str, ...], collector: SolutionCollector
    ) -> tuple[list[np.ndarray], tuple[OptimizerState, Ledger] | None]:
        """The new global model from the round's aggregate: with central DP, the noised mean of the clipped updates
        of the peers the aggregation used instead; then the server optimizer's step. With the state it leaves
        (None when the run keeps none: then FedAvg's aggregate is the model, untouched)."""
        origin, privacy, ledger = self.model.weights, self.rules.privacy, self.ledger
        if privacy.central and privacy.clip is not None:
            total: list[np.ndarray] | None = None
            for peer in used:
                clipped, _ = clip(update_of(origin, collector.received[peer][0]), privacy.clip)
                total = clipped if total is None else [a + b for a, b in zip(total, clipped)]
            # divided by the trainers the order chose, a number fixed before any update was seen (a quorum round
            # is then a little short of the mean, as in the paper's fixed-denominator estimator)
            aggregate = noised_mean(
                origin,
                total or [np.zeros(np.shape(o)) for o in origin],
                len(collector.trainers),
                privacy.noise_std,
                self.noise_source(),
            )
            ledger = ledger.released(used)
        if not self.rules.keeps_server_state and self.rules.optimizer.is_fedavg:
            return aggregate, None
        weights, state = self.rules.optimizer.apply(origin, aggregate, self.optimizer_state)
        return weights, (state, ledger)

    def _close_evaluation(self, collector: EvaluationCollector, now: float) -> list[Action]:
        self.evaluations = None
        result = collector.result()
        if result is None:
            if self.republished >= MAX_REPUBLISH:
                return self._give_up(
                    "no-evaluations",
                    f"the model of round {collector.round} was published "
                    f"{self.republished + 1} times and no peer evaluated it",
                    now,
                )
            self.republished += 1
            return [
                Log(
                    f"round {collector.round}: no evaluation arrived; publishing the model again "
                    f"({self.republished} of {MAX_REPUBLISH})",
                    "warning",
                ),
                *self._publish_model(now),
            ]
        self.republished = 0
        accuracy, loss, samples = result
        round_, trainers = collector.round, self.model.trainers
        median = collector.median_accuracy() if collector else None
        reached = accuracy >= self.rules.target_accuracy and median is not None and median >= self.rules.target_accuracy
        out: list[Action] = []
        if accuracy >= self.rules.target_accuracy and not reached and round_ > 0:
            out.append(
                Log(
                    f"round {round_}: the weighted accuracy {accuracy:.4f} reaches the target, but the median peer's "
                    f"({median:.4f}) does not: a minority cannot end the run; going on",
                    "warning",
                )
            )
        if self.evaluators and 0 < round_ and reached:
            # The sample says the target is reached: the run may end with this model, so every peer evaluates it,
            # and the round is recorded once, with the metric of all of them (which may yet fall short).
            self.everyone_next = True
            return [
                Log(
                    f"round {round_}: accuracy {accuracy:.4f} from {len(collector.received)} evaluators "
                    "reaches the target; every peer evaluates the model before the run ends"
                ),
                *self._publish_model(now),
            ]
        self.everyone_next = False
        started = self.round_started if round_ > 0 else None  # None: not a round this controller trained
        duration = now - started if started is not None else 0.0
        run_started = self.run_started if self.run_started is not None else self._wall(now)
        # The row first: killed between the two, the round is evaluated again by the next controller and recorded
        # twice (the later row counts); the other way round, it would be finished for everyone and never recorded.
        if round_ > 0:
            out.append(
                RecordRound(
                    dict(
                        round=round_,
                        term=self.term,
                        controller=self.me,
                        trainers=trainers,
                        accuracy=accuracy,
                        loss=loss,
                        duration_s=duration,
                        bytes_sent=self.round_bytes,
                        finished_at=self._wall(now),
                        started_at=self._wall(started) if started is not None else None,
                        epsilon=self._epsilon(self.ledger.most),
                    )
                )
            )
        out.append(
            Publish(
                Metrics(
                    self.term,
                    self.me,
                    round_,
                    accuracy,
                    loss,
                    samples,
                    trainers,
                    duration,
                    self.round_bytes,
                    run_started,
                    self._epsilon(self.ledger.most),
                )
            )
        )
        summary = RoundSummary(round_, self.term, accuracy, loss, self.round_bytes)
        self.history[round_] = summary
        out += [
            FinishRound(summary, self.run_started),
            SaveCheckpoint(
                self.model,
                tuple(self.history[r] for r in sorted(self.history)),
                self.run_started,
                self._server_memory(),
            ),
            Log(
                f"round {round_}: global accuracy {accuracy:.4f}, loss {loss:.4f} over {samples} test samples "
                f"from {len(collector.received)} peers"
                + (f", {duration:.1f}s, {self.round_bytes} bytes" if round_ > 0 else " (initial model)")
            ),
        ]
        return out + self._after_round(summary, now, reached)

    def _after_round(self, summary: RoundSummary, now: float, reached: bool) -> list[Action]:
        """`reached`: the round's evaluations reached the target, by the weighted mean and by the median peer."""
        if summary.round >= self.rules.max_rounds:
            return self._finish("max-rounds", summary, now)
        if summary.round > 0 and reached:
            return self._finish("target-accuracy", summary, now)
        target = self.rules.privacy.target_epsilon
        if target is not None:
            spent, after = self._epsilon(self.ledger.most), self._epsilon(self.ledger.most + 1)
            if after is not None and after > target:
                # The peer released most often may be released again next round: that would overspend.
                return [
                    Log(
                        f"the privacy budget is spent: epsilon {spent:.4g} now, {after:.4g} after one more round, "
                        f"over --dp-target-epsilon {target:g}"
                    ),
                    *self._finish("privacy-budget", summary, now),
                ]
        return self._start_training(now)

    def _finish(self, reason: str, summary: RoundSummary | None, now: float, code: int = EXIT_OK) -> list[Action]:
        """The end of the run, for everyone: the model saved, run.json written, the Finish published (retained), the
        summary printed, this peer's exit. A failed disk write does not stop the rest (the node logs it)."""
        self.phase = Phase.FINISHED
        outcome = self.outcome(reason, summary, now)
        out: list[Action] = [SaveModel(self.model.weights)]
        out += [
            RecordRun({"settings": dict(self.rules.run_settings), "outcome": outcome}),
            Publish(
                Finish(
                    self.term, self.me, summary.round if summary else 0, reason, summary.accuracy if summary else 0.0
                ),
                retain=True,
                expiry=FINISH_EXPIRY_S,
            ),
        ]
        if code == EXIT_OK and summary is not None:
            out.append(Log(f"finished ({reason}) after round {summary.round}: accuracy {summary.accuracy:.4f}"))
        return out + [Print(format_summary(outcome)), Exit(code)]

    def _give_up(self, reason: str, why: str, now: float) -> list[Action]:
        return [
            Log(f"giving up the run: {why}", "error"),
            *self._finish(reason, self.history[max(self.history)] if self.history else None, now, EXIT_GAVE_UP),
        ]

    def outcome(self, reason: str, summary: RoundSummary | None, now: float) -> dict:
        initial = self.history.get(0)
        started = self.run_started if self.run_started is not None else self._wall(now)
        return {
            "reason": reason,
            "rounds": summary.round if summary else 0,
            "initial_accuracy": initial.accuracy if initial else None,
            "final_accuracy": summary.accuracy if summary else None,
            "final_loss": summary.loss if summary else None,
            "duration_s": round(self._wall(now) - started, 3),
            "bytes_sent": sum(s.bytes for s in self.history.values()),
            "terms": self.term,
            "controller": self.me,
            "finished_at": self._wall(now),
            "epsilon": self._epsilon(self.ledger.most),
            "dp_delta": self.rules.privacy.delta if self.rules.privacy.on else None,
            "server_step": self.optimizer_state.step if self.optimizer_state is not None else None,
        }


def format_summary(outcome: dict) -> str:
    rows = [
        ("rounds", outcome["rounds"]),
        ("stopped by", outcome["reason"]),
        ("initial accuracy", _pct(outcome["initial_accuracy"])),
        ("final accuracy", _pct(outcome["final_accuracy"])),
        ("final loss", "n/a" if outcome["final_loss"] is None else f"{outcome['final_loss']:.4f}"),
        ("time", f"{outcome['duration_s']:.1f} s"),
        ("bytes", f"{outcome['bytes_sent']:,}"),
        ("terms", outcome["terms"]),
        ("controller", outcome["controller"]),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["run summary", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows]
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.2%}"
