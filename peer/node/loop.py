"""The peer: one event loop, and the one place where decisions become deeds.

Events come from one queue: MQTT publications and connection changes (from the transport's thread) and finished
learning jobs (from the learner thread). A publication goes through the wire session (`peer.wire.session.Inbox`:
envelope, chunks, decoding, freshness), then the admission rules (`peer.roles.admission`), and reaches the machine it
is for: the election, then the controller (while this peer leads a term) or the follower (every other peer). Between
events the loop ticks the election and the controller with the time.

The machines are pure; everything they decide comes back as actions, and `carry_out` looks each one up in a table of
deeds (`DEEDS`): publishing (through `peer.wire.session.Outbox`), records and typed events, learning jobs, the model
store (this module is its only writer), the final model, the exit.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import queue
import random
import secrets
import time
from collections.abc import Callable, Iterable

from peer.config import Settings
from peer.node.jobs import JobRunner, Learning
from peer.node.logs import Quota, attach, configure_logging
from peer.node.transport import BrokerRefused, Connected, Disconnected, Inbound, MqttTransport
from peer.records.checkpoint import RunState, checkpoint_state
from peer.records.events import EventLog
from peer.records.run_dir import RunRecorder
from peer.roles.actions import (
    EXIT_DUPLICATE,
    EXIT_REFUSED,
    Action,
    AdoptModel,
    Announce,
    CastVote,
    Exit,
    FetchModel,
    FinishRound,
    FollowController,
    JobDone,
    Log,
    Print,
    Publish,
    RecordElection,
    RecordEvaluation,
    RecordEvent,
    RecordRound,
    RecordRun,
    SaveCheckpoint,
    SaveModel,
    SendClaim,
    StartJob,
    StepDown,
    TakeOffice,
    Unconfirmed,
)
from peer.roles.admission import Route, View, admit, entitled, may_chunk
from peer.roles.controller import Controller
from peer.roles.election import Election, ElectionTimings, Role
from peer.roles.follower import Follower
from peer.roles.rounds import ModelStore
from peer.wire.chunks import Pending
from peer.wire.envelope import Seal, Stamper, new_incarnation
from peer.wire.errors import Refused
from peer.wire.messages import (
    Aggregation,
    Claim,
    Evaluation,
    Finish,
    Heartbeat,
    Init,
    Message,
    Metrics,
    Presence,
    ServerState,
    Shares,
    Solution,
    Training,
    Vote,
)
from peer.wire.session import MAX_AGE_S, Delivered, Inbox, OffClock, Outbox
from peer.wire.topics import Topics
from peer.wire.weights import WeightCodec

TICK_S = 0.05
PRESENCE_EXPIRY_S = 3600  # a dead peer's "offline" will does not linger on a long-lived broker forever
# Kinds whose sending is worth an event in events.jsonl (heartbeats, votes and presence are told otherwise or not).
EVENT_KINDS = frozenset({"training", "solution", "aggregation", "evaluation", "metrics", "finish", "masked"})


class Peer:
    def __init__(
        self,
        settings: Settings,
        learner: Learning,
        rng: random.Random | None = None,
        transport=None,
        runner=None,
        resume: RunState | None = None,
        log: logging.Logger | None = None,
    ):
        """`transport` and `runner` default to the real MQTT adapter and learner thread; tests hand in fakes.
        `resume`: the run's state from its checkpoint, to go on from. `log`: this peer's own logger when several
        peers share the process (peer.host); by default the process's "peer" logger."""
        self.settings, self.me, self.learner = settings, settings.peer_id, learner
        self.rng = rng or random.Random()
        self.wall_clock: Callable[[], float] = time.time  # the sender's clock in envelopes is checked against it
        self.topics = Topics(settings.topic_prefix, settings.run_id)
        seal = Seal(settings.secret)
        self.stamper = Stamper(new_incarnation(time.time_ns()), lambda: self.wall_clock())
        self.inbox = Inbox(self.me, self.topics, seal, may_chunk=self._may_chunk)
        self.outbox = Outbox(self.topics, seal, self.stamper, settings.wire_dtype, settings.max_message_bytes)
        self.events: queue.Queue = queue.Queue()
        self.election = Election(
            self.me,
            settings.min_peers,
            ElectionTimings.from_heartbeat(settings.heartbeat, settings.election_window, settings.wait_timeout),
            self.rng,
            started_at=time.monotonic(),
        )
        self.store = ModelStore()  # written here only, by carrying out AdoptModel and FinishRound
        self.samples = learner.sample_counts()
        self.fingerprint = learner.fingerprint()
        self.misfits: set[str] = set()  # peers that announced another model: not part of this run
        self.skewed: set[str] = set()  # peers whose clock is off ours by more than the replay window: not counted
        # A live model of a controller this peer did not follow yet (it was in its join grace, or still voting): kept,
        # the latest one, and taken if this peer then follows that controller in that term. Its retained copy would
        # come too late: the replay guard has seen it, and refuses it as a copy.
        self.early_model: tuple[Aggregation, int] | None = None
        self._told_clock = False  # whether this peer said its own clock is the odd one out
        self.last_fetch = float("-inf")
        self.follower = Follower(
            self.me,
            self.store,
            tuple(tuple(w.shape) for w in learner.initial_weights()),
            keep_solutions_up_to=settings.max_message_bytes,
            stop_rules=(settings.max_rounds, settings.target_accuracy),
            answers_expire_after=max(1, math.ceil(settings.round_deadline)),
            secure_aggregation=settings.secure_aggregation,
        )
        # The most samples any peer may declare: computed from the run's data settings, like every peer does; with
        # --data-dir (each peer's own data) unknown, and the controller bounds counts by the others' instead.
        self.count_bound = learner.count_bound() if settings.data_dir is None else None
        self.controller: Controller | None = None
        # What each peer announced (init): (train samples, test samples), the most a controller lets it declare.
        self.announced: dict[str, tuple[int, int]] = {}
        self.records = RunRecorder(settings.run_dir, self.me)
        self.event_log = EventLog(settings.run_dir, self.me)
        self.log = log or logging.getLogger("peer")
        if log is None and not self.log.handlers:
            configure_logging(self.me, settings.log_level)
        attach(self.log, self)
        # The client id is ours alone (a random suffix, drawn for it and sent nowhere): nobody can take our session
        # over by guessing or deriving it. A broker with a login per peer replaces it with the login
        # (use_username_as_clientid).
        self.transport = transport or MqttTransport(
            settings.brokers,
            client_id(self.me),
            self.topics.subscriptions(),
            self.events,
            settings.keepalive,
            settings.username,
            settings.password,
            settings.tls_context(),
        )
        self.runner = runner or JobRunner(learner, self.events, self._job_wanted, self.log)
        if resume:
            model = resume.model
            self.store.offer(model.round, model.term, model.weights, model.trainers, model.controller)
            self.store.server = resume.server
            for summary in resume.rounds:
                self.store.finish_round(summary, resume.run_started)
            self.election.restore(max(resume.model.term, resume.term), resume.model.round)
        self.exit_code: int | None = None
        self.quota = Quota(self.log)
        self._status: tuple = ()
        self._last_tick = time.monotonic()
        self._answer_due: float | None = None  # when this peer answers the newcomers heard since its last init
        # What the brokers delivered to this peer, every publication counted (duplicates and refusals included):
        # told in the exit event, so a benchmark sees what a bridge or a failover costs the peers.
        self.received_messages = 0
        self.received_bytes = 0
        self.exit_reason: str | None = None  # why this peer stops on an error of its own (the exit event's reason)

    # --- state shown in logs and status.json ----------------------------------------------------------------------------

    @property
    def role_name(self) -> str:
        return "finished" if self.exit_code is not None else self.election.role.value

    @property
    def term(self) -> int:
        return self.election.term

    @property
    def current_round(self) -> int:
        if self.controller:
            return self.controller.round
        return self.store.latest.round if self.store.latest else 0

    @property
    def phase(self) -> str | None:
        """The round's phase: the controller's own, or as the controller's last heartbeat told a follower."""
        return self.controller.phase.value if self.controller else self.follower.phase

    def _view(self) -> View:
        e = self.election
        trainers = self.controller.awaited_trainers() if self.controller else frozenset()
        return View(self.me, e.term, e.role, e.controller, self.fingerprint, frozenset(self.misfits), trainers)

    def _may_chunk(self, kind: str, sender: str, retained: bool) -> Refused | None:
        return may_chunk(kind, sender, retained, self._view())

    def _write_status(self) -> None:
        last = self.store.last_finished
        state = (
            self.role_name,
            self.election.term,
            self.current_round,
            self.phase,
            self.election.controller,
            last.accuracy if last else None,
        )
        if state != self._status:
            self._status = state
            self._write(
                "status.json",
                self.records.status,
                peer=self.me,
                role=state[0],
                term=state[1],
                round=state[2],
                phase=state[3],
                controller=state[4],
                accuracy=state[5],
            )

    # --- main loop ------------------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.log.info(
            "starting: broker %s, run %s, shard %s, model %s (fingerprint %s), waiting for %d peers",
            self.settings.broker,
            self.settings.run_id,
            self.settings.shard_label,
            self.learner.model_description(),
            self.fingerprint,
            self.settings.min_peers,
        )
        self._event(
            "start",
            broker=self.settings.broker,
            run_id=self.settings.run_id,
            shard=self.settings.shard_label,
            model=self.fingerprint,
            pid=os.getpid(),
            train_samples=self.samples[0],
            test_samples=self.samples[1],
        )
        if not self.inbox.seal.sealed:
            self.log.warning(
                "no federation secret (--secret-file or FL_SECRET): any client of this broker can speak "
                "for the federation; see docs/SECURITY.md"
            )
        self.transport.start(
            self.topics.presence(self.me),
            self.outbox.sealed(Presence(self.me, "offline")),
            will_expiry=PRESENCE_EXPIRY_S,
        )
        try:
            while self.exit_code is None:
                try:
                    event = self.events.get(timeout=TICK_S)
                except queue.Empty:
                    event = None
                now = time.monotonic()
                if event is not None:
                    self.handle(event, now)
                if self.exit_code is None:
                    self.tick(now)
                self._write_status()
        finally:
            self.runner.stop()
            self._write_status()
            self.transport.close(last=self._last_words())
            reason = {"reason": self.exit_reason} if self.exit_reason else {}
            self._event(
                "exit",
                code=self.exit_code,
                received_messages=self.received_messages,
                received_bytes=self.received_bytes,
                **reason,
            )
            self.event_log.close()
        return self.exit_code

    def _last_words(self) -> list[tuple[str, bytes, bool]]:
        if self.exit_code == EXIT_DUPLICATE:
            return []  # the id is the other process's: "offline" would be said in its name
        # A signed "offline" tells the others we left (an empty payload could come from anyone, so nobody acts on
        # one); then our retained presence is cleared, leaving no record on the broker.
        presence = self.topics.presence(self.me)
        last = [(presence, self.outbox.sealed(Presence(self.me, "offline")), False), (presence, b"", True)]
        if self.controller and self.controller.finished:
            # The run is over: its leader and model need not stay on the broker (the retained Finish does, for
            # peers that come back to this run later).
            kinds: tuple[str, ...] = ("election", "heartbeat", "aggregation")
            if self.controller.rules.keeps_server_state:
                kinds += ("server-state",)
            for kind in kinds:
                last += [(f.topic, f.payload, f.retain) for f in self.outbox.cleared(self.topics.topic(kind, self.me))]
        return last

    def tick(self, now: float) -> None:
        stalled_for = now - self._last_tick
        self._last_tick = now
        if stalled_for > self.election.silent_after:  # as long as the others wait for a controller's sign
            self.log.warning("this peer was frozen for %.1fs (stopped, or the host stalled)", stalled_for)
            self._event("frozen", seconds=round(stalled_for, 3))
            actions = self.election.thawed(now)
            self.carry_out(actions, now)
            if not actions:  # (a controller stepping down announces itself anyway)
                self._announce()  # "I am back"
        self.carry_out(self.election.tick(now), now)
        if self.controller:
            self.carry_out(self.controller.tick(now), now)
        for refusal in self.inbox.expire(self.wall_clock()):
            self._refused(refusal, "chunks")
        if self._answer_due is not None and now >= self._answer_due and self.exit_code is None:
            self._announce(reply=True)

    def handle(self, event, now: float) -> None:
        EVENT_HANDLERS[type(event)](self, event, now)

    def _on_job_done(self, done: JobDone, now: float) -> None:
        job, result = done.job, {}
        if done.result is not None and job.kind == "fit":
            result = {"samples": done.result[1], "loss": done.result[2]}
        elif done.result is not None:
            result = {"accuracy": done.result[0], "loss": done.result[1], "samples": done.result[2]}
        self._event(
            "job-done",
            kind=job.kind,
            term=job.term,
            round=job.round,
            attempt=job.attempt,
            seconds=round(done.seconds, 4),
            error=done.error,
            **result,
        )
        self.carry_out(self.follower.on_job_done(done, self.election.term), now)

    def _on_connected(self, event: Connected, now: float) -> None:
        self.log.info("connected to broker %s", event.broker)
        self._event("connected", broker=event.broker)
        self.election.reconnected(now)
        self.send(Presence(self.me, "online"), retain=True)
        self._announce()
        # What went out while the broker was away may be lost: the controller's order, our answers to it.
        if self.controller:
            self.carry_out(self.controller.reconnected(now), now)
        else:
            self.carry_out(self.follower.reconnected(self.election.term), now)

    def _on_disconnected(self, event: Disconnected, now: float) -> None:
        self.log.warning(
            "disconnected from broker %s (%s); reconnecting%s",
            event.broker,
            event.reason,
            f" to {event.next_broker}" if event.next_broker != event.broker else "",
        )
        self._event("disconnected", reason=event.reason, broker=event.broker, next_broker=event.next_broker)

    def _on_broker_refused(self, event: BrokerRefused, now: float) -> None:
        if self.exit_code is not None:
            return  # leaving already: a second refusal has nothing to add
        if event.tls:
            text = f"refused the broker: {event.reason}; check --tls-ca (the CA that signed the brokers' certificates)"
        else:
            hint = " (check --username/--password and the broker's ACL)" if event.fatal else ""
            text = f"broker refused the connection: {event.reason}{hint}"
        self.log.error("%s", text)
        self._event("broker-refused", reason=event.reason, fatal=event.fatal)
        if event.fatal:
            self.exit_code = EXIT_REFUSED
            self.exit_reason = text

    # --- inbound: the wire session, the admission rules, the machine it is for ------------------------------------------

    def _on_inbound(self, event: Inbound, now: float) -> None:
        self.received_messages += 1
        self.received_bytes += len(event.payload)
        verdict = self.inbox.receive(event.topic, event.payload, event.retained, self.wall_clock())
        if isinstance(verdict, Delivered):
            self.on_message(verdict, now)
        elif isinstance(verdict, Pending):
            for evicted in verdict.evicted:
                self._refused(evicted, "chunks")
        elif isinstance(verdict, OffClock):
            self._off_clock(verdict, now)
        else:
            self._refused(verdict, "inbound")

    def on_message(self, delivered: Delivered, now: float) -> None:
        message, retained = delivered.message, delivered.retained
        if message.sender == self.me and not retained and delivered.stamp.incarnation != self.stamper.incarnation:
            if isinstance(message, Init):
                return self._same_id(message, delivered.stamp.incarnation)
            return self._in_my_name(message, delivered.stamp.incarnation, now)
        if not retained:
            self.election.heard_from(message.sender)
            if message.sender in self.skewed and not isinstance(message, Presence):  # (presence skips the age)
                self.skewed.discard(message.sender)
                self.log.info("%s's clock agrees with this peer's again: it counts again", message.sender)
        verdict = admit(message, retained, self._view())
        if isinstance(verdict, Refused):
            return self._refused(verdict, "admission")
        ROUTES[verdict](self, message, delivered.size, now)

    def _run_other_model(self, message: Heartbeat, size: int, now: float) -> None:
        self.log.error(
            "this run's model (fingerprint %s, controller %s) is not this peer's (%s, %s): start this "
            "peer with the run's --model and --dataset",
            message.model,
            message.controller,
            self.fingerprint,
            self.learner.model_description(),
        )
        self.exit_code = EXIT_REFUSED

    def _peer_other_model(self, message: Init, size: int, now: float) -> None:
        """A peer announced another model than ours: it cannot take part (its solutions would not fit), so it is not
        counted, in the election or as a trainer; it learns so from the controller's heartbeat and exits."""
        if message.peer not in self.misfits:
            self.misfits.add(message.peer)
            self.log.warning(
                "%s runs another model (fingerprint %s; this peer's is %s): it is not counted in this "
                "run (every peer needs the same --model and --dataset)",
                message.peer,
                message.model,
                self.fingerprint,
            )
        if message.peer in self.election.live:
            self.peer_gone(message.peer, now)
        # It is told who is here too (the others' inits name their model and term): a peer that is itself the odd
        # one out learns from them which run it met, and leaves saying so.
        self.carry_out(self.election.stranger(message.peer, message.term, now), now)
        if not message.reply:
            self._answer_newcomer(now)

    def _retained_presence(self, message: Presence, size: int, now: float) -> None:
        """Who was online when this peer subscribed, said when each connected (maybe long ago): a peer named online
        counts only until it fails to answer this peer's init (a peer whose clock is off, say, never does)."""
        self._presence(message, size, now)
        if message.status == "online" and message.peer in self.election.live:
            self.election.unconfirmed_until_heard(message.peer, now)

    def _presence(self, message: Presence, size: int, now: float) -> None:
        if message.peer in self.misfits or message.peer in self.skewed:
            return
        if message.status == "online":
            self.peer_up(message.peer, now)
        elif message.peer == self.me:
            if self.transport.connected:  # the broker thought us dead (we hung); we are back
                self.send(Presence(self.me, "online"), retain=True)
        else:
            self.peer_gone(message.peer, now)

    def _announcement(self, message: Init, size: int, now: float) -> None:
        self.announced[message.peer] = (message.train_samples, message.test_samples)
        self.carry_out(self.election.on_init(message.peer, message.term, now), now)
        self.peer_up(message.peer, now, self.announced[message.peer], returned=not message.reply)
        if message.peer != self.me and not message.reply:
            # A newcomer, or a peer back on the broker, learns from the answers who is here and what each holds.
            self._answer_newcomer(now)

    def _ballot(self, message: Vote, size: int, now: float) -> None:
        self.carry_out(
            self.election.on_vote(message.term, message.peer, message.vote, message.round, message.reason, now), now
        )

    def _claim(self, message: Claim, size: int, now: float) -> None:
        self.carry_out(self.election.on_claim(message.term, message.peer, message.reason, message.members, now), now)

    def _retained_leader(self, message: Claim | Heartbeat, size: int, now: float) -> None:
        leader = message.peer if isinstance(message, Claim) else message.controller
        self.carry_out(self.election.on_retained(message.term, leader, now, claim=isinstance(message, Claim)), now)

    def _retained_model(self, message: Aggregation, size: int, now: float) -> None:
        self.carry_out(self.follower.on_retained_model(message, self.election.controller), now)

    def _run_finished(self, message: Finish, size: int, now: float) -> None:
        self.carry_out(self.follower.on_finished_run(message), now)

    def _from_controller(
        self, message: Heartbeat | Training | Aggregation | Metrics | Finish, size: int, now: float
    ) -> None:
        self.carry_out(self.election.on_controller_seen(message.term, message.controller, now), now)
        held = self.store.latest
        if (
            isinstance(message, Heartbeat)
            and message.phase == "evaluating"
            and (held is None or held.round < message.round)
        ):
            # its model is on the way, behind which the controller's next messages wait: a keepalive's grace
            self.election.expect_model(message.term, message.controller, now + 1.5 * self.settings.keepalive)
        verdict = entitled(message, self._view())
        if isinstance(verdict, Refused):
            if isinstance(message, Aggregation) and self.election.role is not Role.CONTROLLER:
                self.early_model = (message, size)
            self._refused(verdict, "admission")
        elif verdict is Route.RUN_OTHER_MODEL and isinstance(message, Heartbeat):
            self._run_other_model(message, size, now)
        else:
            self.carry_out(self.follower.on_controller(message), now)

    def _earlier_controller(
        self, message: Heartbeat | Training | Aggregation | Metrics | Finish, size: int, now: float
    ) -> None:
        self.log.debug("ignored a %s of stale term %d from %s", message.TYPE, message.term, message.controller)
        self.carry_out(self.election.on_controller_seen(message.term, message.controller, now), now)

    def _later_answer(self, message: Solution | Evaluation, size: int, now: float) -> None:
        self.log.debug(
            "ignored a %s of term %d from %s: not the controller of that term", message.TYPE, message.term, message.peer
        )
        self.carry_out(self.election.on_answer(message.peer, message.term, now), now)

    def _to_controller(self, message: Message, size: int, now: float) -> None:
        if self.controller:
            self.carry_out(self.controller.on_message(message, size, now), now)

    def _shares(self, message: Shares, size: int, now: float) -> None:
        """A trainer's encrypted shares (secure aggregation): the controller learns who shared, a trainer keeps its
        own."""
        if self.controller:
            self.carry_out(self.controller.on_secure(message, size, now), now)
        else:
            self.carry_out(self.follower.on_shares(message), now)

    def _server_state(self, message: ServerState, size: int, now: float) -> None:
        if self.controller:
            self.carry_out(self.controller.on_server_state(message, now), now)

    def _off_clock(self, refusal: OffClock, now: float) -> None:
        """A peer's newest message is off this peer's clock by more than the replay window: all its live messages
        will be refused, so it cannot take part; it is not counted (not waited for, not chosen, no election member)
        until a message of it passes. Said once per peer, on each side: the peer whose clock is wrong hears it from
        every other, the others each say it of that one."""
        peer = refusal.sender
        if peer not in self.skewed:
            self.skewed.add(peer)
            ahead = "ahead of" if refusal.offset > 0 else "behind"
            self.log.warning(
                "%s's clock is %.0fs %s this peer's, more than the %.0fs replay window: its messages are refused and "
                "it is not counted (if every other peer says this of one, that peer's clock is wrong: sync it, NTP)",
                peer,
                abs(refusal.offset),
                ahead,
                MAX_AGE_S,
            )
            self._event("clock-off", peer=peer, offset=round(refusal.offset, 3))
            others = len(self.election.live - {self.me, peer})
            if len(self.skewed) >= 2 and len(self.skewed) > others and not self._told_clock:
                # Most peers it hears are off its clock the same way: the odd one out is this peer.
                self._told_clock = True
                self.log.error(
                    "this peer's clock is about %.0fs %s the others': %d of the %d peers it hears are refused as "
                    "replays; it cannot take part until this machine's clock is set right (NTP)",
                    abs(refusal.offset),
                    "behind" if refusal.offset > 0 else "ahead of",
                    len(self.skewed),
                    len(self.skewed) + others,
                )
        self.peer_gone(peer, now)

    def _in_my_name(self, message: Message, incarnation: int, now: float) -> None:
        """A message in this peer's name, signed with the secret, that this process did not send: a second process
        with this id (its init says so), or a member forging. Said in one line (rate-limited), never obeyed. A forged
        finish the followers believe (a give-up reason they cannot check) ends the run for them: its controller ends
        it too, at once, rather than waiting --wait-timeout for peers that left."""
        self.quota.warn(
            "in-my-name",
            logging.ERROR,
            "a %s in this peer's name that it did not send (incarnation %x, this process is %x): another process "
            "signs as %s with the federation secret (a member forging, or a second process with this id); per-peer "
            "broker logins stop this (docs/SECURITY.md)",
            message.TYPE,
            incarnation,
            self.stamper.incarnation,
            self.me,
        )
        self._event("forged", kind=message.TOPIC, incarnation=incarnation)
        if self.controller and isinstance(message, Finish) and message.term == self.election.term:
            self.carry_out(self.controller.forged_finish(message, now), now)

    def _same_id(self, message: Init, incarnation: int) -> None:
        """Another process announced itself with our peer id: two peers cannot share one. The one started later
        leaves; the earlier one answers with its own init, so the later one learns it is the later one."""
        if incarnation > self.stamper.incarnation:
            self.quota.warn(
                "same-id",
                logging.WARNING,
                "another process (pid %d) started with this peer id %s; it started later and will exit",
                message.pid,
                self.me,
            )
            self._announce()
        else:
            self.log.error(
                "another process (pid %d) already runs as peer %s; this one exits: give every peer its own --peer-id",
                message.pid,
                self.me,
            )
            self.exit_code = EXIT_DUPLICATE

    def peer_up(self, peer: str, now: float, samples: tuple[int, int] | None = None, returned: bool = False) -> None:
        self.carry_out(self.election.peer_up(peer, now), now)
        if self.controller:
            self.carry_out(self.controller.peer_up(peer, now, samples, returned), now)

    def peer_gone(self, peer: str, now: float) -> None:
        if peer == self.me or peer not in self.election.live:
            return
        self.log.info("%s is gone", peer)
        self._event("peer-gone", peer=peer)
        self.carry_out(self.election.peer_down(peer, now), now)
        if self.controller:
            self.carry_out(self.controller.peer_down(peer, now), now)

    def _refused(self, refusal: Refused, where: str) -> None:
        level = logging.getLevelName(refusal.level.upper())
        if level >= logging.WARNING:
            self.quota.warn(f"{where}:{refusal.kind or refusal.reason[:40]}", level, "%s", refusal.reason)
        else:
            self.log.log(level, "%s", refusal.reason)

    # --- sending ----------------------------------------------------------------------------------------------------------

    def send(self, message: Message, retain: bool = False, expiry: int | None = None) -> None:
        """Publish `message`: one envelope, or, larger than the broker takes, one per chunk, paced."""
        publication = self.outbox.frames(message, retain, expiry)
        if publication.chunked:  # (a retained model's stale chunks are cleared at the end, retained too)
            self.transport.publish_paced(
                ((f.topic, f.payload) for f in publication.frames), retain=retain, expiry=expiry
            )
        else:
            for frame in publication.frames:
                self.transport.publish(frame.topic, frame.payload, retain=frame.retain, expiry=frame.expiry)
        if message.TYPE in EVENT_KINDS:
            fields = {
                name: getattr(message, name)
                for name in ("term", "round", "attempt", "trainers")
                if hasattr(message, name) and (name != "trainers" or message.TYPE == "training")
            }
            self._event("sent", kind=message.TYPE, **fields)

    def _announce(self, reply: bool = False) -> None:
        self._answer_due = None  # every init of ours reaches every newcomer heard so far: it answers them all
        self.send(
            Init(self.me, self.election.term, self.current_round, os.getpid(), *self.samples, reply, self.fingerprint)
        )

    def _answer_newcomer(self, now: float) -> None:
        """Answer a newcomer's init: the controller at once (it is the one a newcomer must know); every other peer
        within a heartbeat or so, with one init for all the newcomers heard meanwhile. Answering each at once cost
        N-1 answers per newcomer, each delivered to N peers: about a million deliveries when 100 peers start
        together, where a burst of newcomers (the K peers of one process) now costs one answer per peer. The
        delay is random so the answers do not all hit the broker in one instant, and it stays well inside the
        two heartbeat timeouts a reconnected peer waits to hear from each peer it counts live."""
        if self.controller:
            self._announce(reply=True)
        elif self._answer_due is None:
            self._answer_due = now + self.settings.heartbeat * random.uniform(0.5, 1.5)  # not self.rng: the votes'

    def _write(self, what: str, write: Callable, *args, **kwargs) -> None:
        """A record written, or the failure logged: a full or read-only disk never stops the training."""
        try:
            write(*args, **kwargs)
        except OSError as err:
            self.quota.warn(
                f"write:{what}", logging.ERROR, "could not write %s (%s); the run goes on without it", what, err
            )

    def _event(self, name: str, **fields) -> None:
        """One line of events.jsonl (docs/RECORDS.md), stamped with the term unless it names its own."""
        fields.setdefault("term", self.election.term)
        self._write("events.jsonl", self.event_log.write, name, **fields)

    # --- carrying out: one deed per kind of action ---------------------------------------------------------------------

    def carry_out(self, actions: Iterable[Action], now: float) -> None:
        """Do what the machines decided, in the order they decided it."""
        for action in actions:
            deed = DEEDS.get(type(action))
            if deed is None:
                raise TypeError(f"no way to carry out {action!r}")
            deed(self, action, now)

    def _cast_vote(self, action: CastVote, now: float) -> None:
        self.log.info(
            "election for term %d (%s): voting %.4f%s",
            action.term,
            action.reason,
            action.vote,
            f"; waiting {action.patience:g}x the usual (the last terms came to nothing)" if action.patience > 1 else "",
        )
        self._event("vote", term=action.term, reason=action.reason, patience=action.patience)
        self.send(Vote(action.term, self.me, action.vote, action.round, action.reason))

    def _send_claim(self, action: SendClaim, now: float) -> None:
        self.log.info("term %d: best vote is mine; claiming", action.term)
        # Retained, so that a peer subscribing later learns the decision it did not see go by.
        self.send(Claim(action.term, self.me, action.vote, action.round, action.reason, action.members), retain=True)

    def _take_office(self, action: TakeOffice, now: float) -> None:
        # Solutions and evaluations reach the controller only: subscribed before the first order goes out (the
        # broker handles one client's packets in order), so no answer comes before the subscription.
        self.transport.subscribe(self.topics.subscriptions(controller=True))
        self._event("office", term=action.term, reason=action.reason, members=action.members)
        initial = self.learner.initial_weights() if self.store.latest is None else None
        self.controller = Controller(
            self.me,
            dataclasses.replace(self.settings.round_rules(), count_bound=self.count_bound),
            action.term,
            action.reason,
            action.members,
            self.election.live,
            self.store,
            self.rng,
            wall_offset=time.time() - time.monotonic(),
            initial_weights=initial,
            announced=self.announced,
            model_fingerprint=self.fingerprint,
            wire_cost=self.outbox.cost,
        )
        self.carry_out(self.controller.take_office(now), now)

    def _follow(self, action: FollowController, now: float) -> None:
        self.log.info("term %d: controller is %s", action.term, action.controller)
        self._event("follow", term=action.term, controller=action.controller)
        self.carry_out(self.follower.on_follow(action.controller), now)
        early, self.early_model = self.early_model, None
        if early is not None and (early[0].term, early[0].controller) == (action.term, action.controller):
            self.log.info(
                "round %d: taking the model %s sent before this peer followed it", early[0].round, action.controller
            )
            self._from_controller(early[0], early[1], now)

    def _step_down(self, action: StepDown, now: float) -> None:
        self.log.warning("stepping down as controller of term %d: %s", action.term, action.reason)
        self._event("step-down", term=action.term, reason=action.reason)
        self.controller = None
        self.transport.unsubscribe([topic for topic, _ in self.topics.subscriptions(controller=True)])
        # The others may have counted us gone while we were silent: say we are here, as a peer now.
        self._announce()

    def _unconfirmed(self, action: Unconfirmed, now: float) -> None:
        self.log.info("%s was not heard from since this peer reconnected", action.peer)
        self.peer_gone(action.peer, now)

    def _announce_term(self, action: Announce, now: float) -> None:
        self._announce()

    def _publish(self, action: Publish, now: float) -> None:
        self.send(action.message, action.retain, action.expiry)

    def _log(self, action: Log, now: float) -> None:
        self.log.log(logging.getLevelName(action.level.upper()), "%s", action.text)

    def _start_job(self, action: StartJob, now: float) -> None:
        self._event("job-start", kind=action.kind, term=action.term, round=action.round, attempt=action.attempt)
        self.runner.submit(action)

    def _fetch_model(self, action: FetchModel, now: float) -> None:
        # A re-sent order must not make every waiting trainer fetch every model again at once.
        if now - self.last_fetch >= self.settings.heartbeat:
            self.last_fetch = now
            self.transport.fetch_retained(self.topics.aggregations())

    def _adopt_model(self, action: AdoptModel, now: float) -> None:
        model = action.model
        if self.store.offer(model.round, model.term, model.weights, model.trainers, model.controller):
            self.election.progress(model.round)
            if action.note:
                self.log.info("holding the global model of round %d (%s)", model.round, action.note)

    def _finish_round(self, action: FinishRound, now: float) -> None:
        self.store.finish_round(action.summary, action.run_started)

    def _record_round(self, action: RecordRound, now: float) -> None:
        self._write("rounds.csv", self.records.round, **action.row)
        self._event("round", **action.row)

    def _record_election(self, action: RecordElection, now: float) -> None:
        self._write(
            "elections.csv", self.records.election, action.term, action.controller, action.reason, action.members
        )

    def _record_evaluation(self, action: RecordEvaluation, now: float) -> None:
        self._write(
            "evaluations.csv",
            self.records.evaluation,
            action.round,
            action.term,
            action.accuracy,
            action.loss,
            action.samples,
        )

    def _record_run(self, action: RecordRun, now: float) -> None:
        self._write("run.json", self.records.run, action.summary)
        self._event("finish", **action.summary.get("outcome", {}))

    def _save_checkpoint(self, action: SaveCheckpoint, now: float) -> None:
        state = checkpoint_state(self.settings.run_id, action.model, action.rounds, action.run_started, action.server)
        server = WeightCodec.parts(action.server.optimizer.tensors()) if action.server else None
        self._write("the checkpoint", self.records.checkpoint, state, WeightCodec.parts(action.model.weights), server)

    def _record_event(self, action: RecordEvent, now: float) -> None:
        self._event(action.name, **action.fields)

    def _save_model(self, action: SaveModel, now: float) -> None:
        self._write("model.keras", self.records.model, lambda path: self.learner.save(action.weights, path))

    def _print(self, action: Print, now: float) -> None:
        print(action.text, flush=True)

    def _exit(self, action: Exit, now: float) -> None:
        self.exit_code = action.code

    def _job_wanted(self, job: StartJob) -> bool:
        """Whether a queued job is still worth its turn: not if its term is over, nor a fit for an attempt the
        controller has since ordered again (it ignores that attempt's solution: when fits take longer than the
        round's deadline, each retry would queue one more fit whose solution comes too late)."""
        superseded = job.kind == "fit" and (job.term, job.round, job.attempt) != self.follower.fitting
        return job.term == self.election.term and self.exit_code is None and not superseded


def client_id(peer: str) -> str:
    """This peer's MQTT client id: its id and 64 random bits drawn for the connection alone. Nothing on the wire
    (the incarnation travels in clear in every envelope's head) tells them, so nobody can compute it and take the
    session over."""
    return f"{peer}-{secrets.token_hex(8)}"


DEEDS: dict[type, Callable[..., None]] = {
    CastVote: Peer._cast_vote,
    SendClaim: Peer._send_claim,
    TakeOffice: Peer._take_office,
    FollowController: Peer._follow,
    StepDown: Peer._step_down,
    Unconfirmed: Peer._unconfirmed,
    Announce: Peer._announce_term,
    Publish: Peer._publish,
    Log: Peer._log,
    StartJob: Peer._start_job,
    FetchModel: Peer._fetch_model,
    AdoptModel: Peer._adopt_model,
    FinishRound: Peer._finish_round,
    RecordRound: Peer._record_round,
    RecordElection: Peer._record_election,
    RecordEvaluation: Peer._record_evaluation,
    RecordRun: Peer._record_run,
    SaveCheckpoint: Peer._save_checkpoint,
    RecordEvent: Peer._record_event,
    SaveModel: Peer._save_model,
    Print: Peer._print,
    Exit: Peer._exit,
}

ROUTES: dict[Route, Callable[..., None]] = {
    Route.PEER_OTHER_MODEL: Peer._peer_other_model,
    Route.RUN_OTHER_MODEL: Peer._run_other_model,
    Route.PRESENCE: Peer._presence,
    Route.RETAINED_PRESENCE: Peer._retained_presence,
    Route.ANNOUNCE: Peer._announcement,
    Route.BALLOT: Peer._ballot,
    Route.CLAIM: Peer._claim,
    Route.RETAINED_LEADER: Peer._retained_leader,
    Route.RETAINED_MODEL: Peer._retained_model,
    Route.RUN_FINISHED: Peer._run_finished,
    Route.FROM_CONTROLLER: Peer._from_controller,
    Route.EARLIER_CONTROLLER: Peer._earlier_controller,
    Route.LATER_ANSWER: Peer._later_answer,
    Route.TO_CONTROLLER: Peer._to_controller,
    Route.SHARES: Peer._shares,
    Route.SERVER_STATE: Peer._server_state,
}

EVENT_HANDLERS: dict[type, Callable[..., None]] = {
    Inbound: Peer._on_inbound,
    JobDone: Peer._on_job_done,
    Connected: Peer._on_connected,
    Disconnected: Peer._on_disconnected,
    BrokerRefused: Peer._on_broker_refused,
}
