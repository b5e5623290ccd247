"""The peer: one event loop, and the one place where decisions become deeds.

Events come from one queue: MQTT messages and connection changes (from the transport's thread) and finished
learning jobs (from the learner thread). Each message is decoded (`protocol`), admitted or refused (`admission`), and
handed to the machine it is for: the election, then the controller (while this peer leads a term) or the follower
(every other peer). Between events the loop ticks the election and the controller with the time.

The machines are pure; everything they decide comes back as actions, and `carry_out` is where those happen:
publishing, records, learning jobs, the model store (this module is its only writer), the final model, the exit.
"""
from __future__ import annotations

import logging
import os
import queue
import random
import time

from .actions import (EXIT_GAVE_UP, EXIT_REFUSED, AdoptModel, Exit, FinishRound, JobDone, Log, Print, Publish,
                      RecordElection, RecordEvaluation, RecordRound, RecordRun, SaveModel, StartJob)
from .admission import Refused, Route, View, admit, entitled
from .config import Settings
from .controller import Controller
from .election import (CastVote, Election, ElectionTimings, FollowController, GiveUp, Note, Role, SendClaim,
                       StepDown, TakeOffice)
from .follower import Follower
from .jobs import JobRunner
from .learner import Learner
from .protocol import (Aggregation, Claim, Heartbeat, Init, Message, Presence, ProtocolError, Topics, Vote, decode,
                       encode)
from .records import RunRecorder
from .rounds import ModelStore
from .transport import Connected, Disconnected, Inbound, MqttTransport, Refused as ConnectionRefused

TICK_S = 0.05
PRESENCE_EXPIRY_S = 3600   # a dead peer's "offline" will does not linger on a long-lived broker forever
QUIET_S = 10.0             # the same kind of warning (a malformed message, a failed write) at most once per this
LOG_FORMAT = "%(asctime)s %(levelname)-7s peer=%(peer)s role=%(role)s term=%(term)s round=%(round)s " \
             "phase=%(phase)s | %(message)s"


class _LogContext(logging.Filter):
    """Stamps every log line with the peer's id, role, term, round and phase, so one line tells the whole state.
    Installed before the dataset loads (the peer does not exist yet: role `starting`)."""

    def __init__(self, peer_id: str):
        super().__init__()
        self.peer_id = peer_id
        self.peer: Peer | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        peer = self.peer
        record.peer = self.peer_id
        if peer is None:
            record.role, record.term, record.round, record.phase = "starting", 0, 0, "-"
        else:
            record.role, record.term, record.round = peer.role_name, peer.election.term, peer.current_round
            record.phase = peer.phase or "-"
        return True


def configure_logging(peer_id: str, level: str) -> logging.Logger:
    context = _LogContext(peer_id)
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(context)
    log = logging.getLogger("peer")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return log


class Quota:
    """One log line per kind of trouble per QUIET_S, with the count of those it kept quiet: a flood of bad messages
    (or a full disk) must not flood the log."""

    def __init__(self, log: logging.Logger, clock=time.monotonic):
        self.log, self.clock = log, clock
        self.last: dict[str, float] = {}
        self.quiet: dict[str, int] = {}

    def warn(self, kind: str, level: int, text: str, *args) -> None:
        now = self.clock()
        if now - self.last.get(kind, -QUIET_S) < QUIET_S:
            self.quiet[kind] = self.quiet.get(kind, 0) + 1
            return
        self.last[kind] = now
        kept = self.quiet.pop(kind, 0)
        self.log.log(level, text + (f" ({kept} more like it in the last {QUIET_S:.0f}s)" if kept else ""), *args)


def _attach_to_log(log: logging.Logger, peer: "Peer") -> None:
    for handler in log.handlers:
        for context in handler.filters:
            if isinstance(context, _LogContext):
                context.peer = peer


class Peer:
    def __init__(self, settings: Settings, learner: Learner, rng: random.Random | None = None,
                 transport=None, runner=None):
        """`transport` and `runner` default to the real MQTT adapter and learner thread; tests hand in fakes."""
        self.settings, self.me, self.learner = settings, settings.peer_id, learner
        self.rng = rng or random.Random()
        self.topics = Topics(settings.topic_prefix)
        self.events: queue.Queue = queue.Queue()
        self.election = Election(self.me, settings.min_peers,
                                 ElectionTimings.from_heartbeat(settings.heartbeat, settings.election_window,
                                                                settings.wait_timeout),
                                 self.rng, started_at=time.monotonic())
        self.store = ModelStore()          # written here only, by carrying out AdoptModel and FinishRound
        self.samples = learner.sample_counts()
        self.follower = Follower(self.me, self.store, tuple(tuple(w.shape) for w in learner.initial_weights()))
        self.controller: Controller | None = None
        # What each peer announced (init): (pid, train samples, test samples). A controller bounds declared sample
        # counts by it; a newcomer (or a new process under a known id) is answered with our own init.
        self.announced: dict[str, tuple[int, int, int]] = {}
        self.records = RunRecorder(settings.run_dir, self.me)
        self.log = logging.getLogger("peer")
        if not self.log.handlers:
            configure_logging(self.me, settings.log_level)
        _attach_to_log(self.log, self)
        self.transport = transport or MqttTransport(
            settings.broker_host, settings.broker_port, self.me, self.topics.subscription, self.events,
            settings.keepalive, settings.username, settings.password)
        self.runner = runner or JobRunner(learner, self.events, self._job_wanted, self.log)
        self.exit_code: int | None = None
        self.quota = Quota(self.log)
        self._status: tuple = ()
        self._last_tick = time.monotonic()

    # --- state shown in logs and status.json ----------------------------------------------------------------------------

    @property
    def role_name(self) -> str:
        if self.exit_code is not None:
            return "finished"
        return {Role.FOLLOWER: "trainer"}.get(self.election.role, self.election.role.value)

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
        return View(self.me, e.term, e.role, e.controller)

    def _write_status(self) -> None:
        last = self.store.last_finished
        state = (self.role_name, self.election.term, self.current_round, self.phase, self.election.controller,
                 last.accuracy if last else None)
        if state != self._status:
            self._status = state
            self._write("status.json", self.records.status, peer=self.me, role=state[0], term=state[1],
                        round=state[2], phase=state[3], controller=state[4], accuracy=state[5])

    # --- main loop ------------------------------------------------------------------------------------------------------

    def run(self) -> int:
        self.log.info("starting: broker %s, shard %s, waiting for %d peers", self.settings.broker,
                      self.settings.shard_label, self.settings.min_peers)
        will = encode(Presence(self.me, "offline"))
        self.transport.start(self.topics.presence(self.me), will, will_expiry=PRESENCE_EXPIRY_S)
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
        return self.exit_code

    def _last_words(self) -> list[tuple[str, bytes, bool]]:
        # Clearing our retained presence (empty payload) says "gone" without leaving a record on the broker.
        last = [(self.topics.presence(self.me), b"", True)]
        if self.controller and self.controller.finished:
            # The run is over: leave no leader or model behind for the next run on this broker (the retained
            # Finish stays a minute for peers that reconnect late, then expires).
            last += [(self.topics.of(kind), b"", True) for kind in (Claim, Heartbeat, Aggregation)]
        return last

    def tick(self, now: float) -> None:
        stalled_for = now - self._last_tick
        self._last_tick = now
        if stalled_for > self.election.timings.heartbeat_timeout:
            self.log.warning("this peer was frozen for %.1fs (stopped, or the host stalled)", stalled_for)
            actions = self.election.resumed(now)
            self.carry_out(actions, now)
            if not actions:   # (a controller stepping down announces itself anyway)
                self._announce()   # "I am back"
        self.carry_out(self.election.tick(now), now)
        if self.controller:
            self.carry_out(self.controller.tick(now), now)

    def handle(self, event, now: float) -> None:
        if isinstance(event, Inbound):
            self.on_inbound(event, now)
        elif isinstance(event, JobDone):
            self.carry_out(self.follower.on_job_done(event, self.election.term), now)
        elif isinstance(event, Connected):
            self.log.info("connected to broker %s", self.settings.broker)
            self.send(Presence(self.me, "online"), retain=True)
            self._announce()
            # What went out while the broker was away may be lost: the controller's order, our answers to it.
            if self.controller:
                self.carry_out(self.controller.reconnected(now), now)
            else:
                self.carry_out(self.follower.reconnected(self.election.term), now)
        elif isinstance(event, Disconnected):
            self.log.warning("disconnected from broker (%s); reconnecting", event.reason)
        elif isinstance(event, ConnectionRefused):
            self.log.error("broker refused the connection: %s%s", event.reason,
                           " (check --username/--password and the broker's ACL)" if event.fatal else "")
            if event.fatal:
                self.exit_code = EXIT_REFUSED

    # --- inbound: decode, admit, route ----------------------------------------------------------------------------------

    def on_inbound(self, event: Inbound, now: float) -> None:
        short = self.topics.short(event.topic)
        if short is None:
            return
        if not event.payload:   # a cleared retained message
            if short == "presence":
                self.peer_gone(event.topic.rsplit("/", 1)[-1], now)
            return
        try:
            message = decode(short, event.payload)
        except ProtocolError as err:
            self.quota.warn(f"malformed:{short}", logging.WARNING, "dropped a malformed message on %s (%d bytes): %s",
                            event.topic, len(event.payload), err)
            return
        verdict = admit(message, event.topic, event.retained, self._view(), self.topics)
        if isinstance(verdict, Refused):
            self._refused(verdict)
            return
        self.route(verdict, message, len(event.payload), now)

    def route(self, route: Route, message: Message, size: int, now: float) -> None:
        e = self.election
        if route is Route.PRESENCE:
            if message.status == "online":
                self.peer_up(message.peer, now)
            elif message.peer == self.me:
                if self.transport.connected:   # the broker thought us dead (we hung); we are back
                    self.send(Presence(self.me, "online"), retain=True)
            else:
                self.peer_gone(message.peer, now)
        elif route is Route.ANNOUNCE:
            known = self.announced.get(message.peer)
            self.announced[message.peer] = (message.pid, message.train_samples, message.test_samples)
            self.peer_up(message.peer, now, (message.train_samples, message.test_samples))
            if message.peer != self.me and (known is None or known[0] != message.pid):
                self._announce()   # a newcomer learns who is here, and what each holds, from the answers
        elif route is Route.BALLOT:
            self.carry_out(e.on_vote(message.term, message.peer, message.vote, message.round, message.reason, now), now)
        elif route is Route.CLAIM:
            self.carry_out(e.on_claim(message.term, message.peer, message.reason, message.members, now), now)
        elif route is Route.RETAINED_LEADER:
            leader = message.peer if isinstance(message, Claim) else message.controller
            self.carry_out(e.on_retained(message.term, leader, now), now)
        elif route is Route.RETAINED_MODEL:
            self.carry_out(self.follower.on_retained_model(message), now)
        elif route is Route.FROM_CONTROLLER:
            self.carry_out(e.on_controller_seen(message.term, message.controller, now), now)
            refusal = entitled(message, self._view())
            if refusal:
                self._refused(refusal)
            else:
                self.carry_out(self.follower.on_controller(message), now)
        elif route is Route.TO_CONTROLLER:
            if self.controller:
                self.carry_out(self.controller.on_message(message, size, now), now)

    def peer_up(self, peer: str, now: float, samples: tuple[int, int] | None = None) -> None:
        self.carry_out(self.election.peer_up(peer, now), now)
        if self.controller:
            self.carry_out(self.controller.peer_up(peer, now, samples), now)

    def peer_gone(self, peer: str, now: float) -> None:
        if peer == self.me or peer not in self.election.live:
            return
        self.log.info("%s is gone", peer)
        self.carry_out(self.election.peer_down(peer, now), now)
        if self.controller:
            self.carry_out(self.controller.peer_down(peer, now), now)

    def _refused(self, refusal: Refused) -> None:
        level = logging.getLevelName(refusal.level.upper())
        if level >= logging.WARNING:
            self.quota.warn(f"refused:{refusal.reason[:40]}", level, "%s", refusal.reason)
        else:
            self.log.log(level, "%s", refusal.reason)

    # --- carrying out ---------------------------------------------------------------------------------------------------

    def send(self, message: Message, retain: bool = False, expiry: int | None = None) -> None:
        self.transport.publish(self.topics.of(message), encode(message), retain=retain, expiry=expiry)

    def _announce(self) -> None:
        self.send(Init(self.me, self.election.term, self.current_round, os.getpid(), *self.samples))

    def _write(self, what: str, write, *args, **kwargs) -> None:
        """A record written, or the failure logged: a full or read-only disk never stops the training."""
        try:
            write(*args, **kwargs)
        except OSError as err:
            self.quota.warn(f"write:{what}", logging.ERROR, "could not write %s (%s); the run goes on without it",
                            what, err)

    def carry_out(self, actions, now: float) -> None:
        """Do what the machines decided, in the order they decided it."""
        for action in actions:
            # --- the election's decisions
            if isinstance(action, CastVote):
                self.log.info("election for term %d (%s): voting %.4f", action.term, action.reason, action.vote)
                self.send(Vote(action.term, self.me, action.vote, action.round, action.reason))
            elif isinstance(action, SendClaim):
                self.log.info("term %d: best vote is mine; claiming", action.term)
                # Retained, so that a peer subscribing later learns the decision it did not see go by.
                self.send(Claim(action.term, self.me, action.vote, action.round, action.reason, action.members),
                          retain=True)
            elif isinstance(action, TakeOffice):
                self.take_office(action, now)
            elif isinstance(action, FollowController):
                self.log.info("term %d: controller is %s", action.term, action.controller)
            elif isinstance(action, StepDown):
                self.log.warning("stepping down as controller of term %d: %s", action.term, action.reason)
                self.controller = None
                # The others may have counted us gone while we were silent: say we are here, as a peer now.
                self._announce()
            elif isinstance(action, Note):
                self.log.info("%s", action.text)
            elif isinstance(action, GiveUp):
                self.log.error("giving up: %s", action.text)
                self.exit_code = EXIT_GAVE_UP
            # --- the roles' decisions
            elif isinstance(action, Publish):
                self.send(action.message, action.retain, action.expiry)
            elif isinstance(action, Log):
                self.log.log(logging.getLevelName(action.level.upper()), "%s", action.text)
            elif isinstance(action, StartJob):
                self.runner.submit(action)
            elif isinstance(action, AdoptModel):
                model = action.model
                if self.store.offer(model.round, model.term, model.weights, model.trainers):
                    self.election.progress(model.round)
                    if action.note:
                        self.log.info("holding the global model of round %d (%s)", model.round, action.note)
            elif isinstance(action, FinishRound):
                self.store.finish_round(action.summary, action.run_started)
            elif isinstance(action, RecordRound):
                self._write("rounds.csv", self.records.round, **action.row)
            elif isinstance(action, RecordElection):
                self._write("elections.csv", self.records.election, action.term, action.controller, action.reason,
                            action.members)
            elif isinstance(action, RecordEvaluation):
                self._write("evaluations.csv", self.records.evaluation, action.round, action.term, action.accuracy,
                            action.loss, action.samples)
            elif isinstance(action, RecordRun):
                self._write("run.json", self.records.run, action.summary)
            elif isinstance(action, SaveModel):
                self._write("model.keras", self.learner.save, action.weights, self.records.model_path)
            elif isinstance(action, Print):
                print(action.text, flush=True)
            elif isinstance(action, Exit):
                self.exit_code = action.code
            else:
                raise TypeError(f"no way to carry out {action!r}")

    def take_office(self, action: TakeOffice, now: float) -> None:
        initial = self.learner.initial_weights() if self.store.latest is None else None
        self.controller = Controller(self.settings, action.term, action.reason, action.members, self.election.live,
                                     self.store, self.rng, wall_offset=time.time() - time.monotonic(),
                                     initial_weights=initial,
                                     announced={p: (train, test) for p, (_, train, test) in self.announced.items()})
        self.carry_out(self.controller.take_office(now), now)

    def _job_wanted(self, job: StartJob) -> bool:
        return job.term == self.election.term and self.exit_code is None
