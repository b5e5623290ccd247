"""The peer: one event loop that ties the parts together.

Events come from one queue: MQTT messages and connection changes (from the transport's thread), finished learning
jobs (from the learner's thread). The loop decodes each message with the protocol module, feeds the election state
machine, carries out its actions, and hands the rest to the current role: the controller, or the trainer that every
other peer is. Between events it ticks the election (timeouts) and the controller (heartbeat, deadlines).
"""
from __future__ import annotations

import logging
import os
import queue
import random
import time

from .config import Settings
from .controller import Controller
from .election import (CastVote, Election, ElectionTimings, FollowController, Note, Role, SendClaim, StepDown,
                       TakeOffice)
from .learner import Learner
from .protocol import (Aggregation, Claim, Evaluation, Finish, Heartbeat, Init, Message, Metrics, Presence,
                       ProtocolError, Solution, Topics, Training, Vote, decode, encode)
from .records import RunRecords
from .rounds import ModelStore, RoundSummary
from .trainer import Job, JobDone, JobRunner, Trainer
from .transport import Connected, Disconnected, Inbound, MqttTransport, Refused

TICK_S = 0.05
EXIT_OK, EXIT_REFUSED = 0, 3
PRESENCE_EXPIRY_S = 3600   # a dead peer's "offline" will does not linger on a long-lived broker forever


class _LogContext(logging.Filter):
    """Stamps every log line with the peer's id, role, term and round, so one line tells the whole state."""

    def __init__(self, peer: "Peer"):
        super().__init__()
        self.peer = peer

    def filter(self, record: logging.LogRecord) -> bool:
        record.peer, record.role = self.peer.me, self.peer.role_name
        record.term, record.round = self.peer.election.term, self.peer.current_round
        return True


def configure_logging(peer: "Peer", level: str) -> logging.Logger:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(levelname)-7s peer=%(peer)s role=%(role)s term=%(term)s round=%(round)s | %(message)s"))
    handler.addFilter(_LogContext(peer))
    log = logging.getLogger("peer")
    log.handlers[:] = [handler]
    log.setLevel(level.upper())
    log.propagate = False
    return log


class Peer:
    def __init__(self, settings: Settings, learner: Learner, rng: random.Random | None = None):
        self.settings, self.me, self.learner = settings, settings.peer_id, learner
        self.rng = rng or random.Random()
        self.topics = Topics(settings.topic_prefix)
        self.events: queue.Queue = queue.Queue()
        self.election = Election(self.me, settings.min_peers,
                                 ElectionTimings.from_heartbeat(settings.heartbeat, settings.election_window),
                                 self.rng, started_at=time.monotonic())
        self.store = ModelStore()
        self.records = RunRecords(settings.run_dir, self.me)
        self.log = configure_logging(self, settings.log_level)
        self.transport = MqttTransport(settings.broker_host, settings.broker_port, self.me, self.topics.subscription,
                                       self.events, settings.keepalive, settings.username, settings.password)
        self.runner = JobRunner(learner, self.events, self._job_wanted, self.log)
        self.trainer = Trainer(settings, self.records, self.runner, self.send, self.log)
        self.controller: Controller | None = None
        self.exit_code: int | None = None
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

    def _write_status(self) -> None:
        last = self.store.last_finished
        state = (self.role_name, self.election.term, self.current_round, self.election.controller,
                 last.accuracy if last else None)
        if state != self._status:
            self._status = state
            self.records.status(peer=self.me, role=state[0], term=state[1], round=state[2], controller=state[3],
                                accuracy=state[4])

    # --- output ---------------------------------------------------------------------------------------------------------

    def send(self, message: Message, retain: bool = False, expiry: int | None = None) -> int:
        payload = encode(message)
        self.transport.publish(self.topics.of(message), payload, retain=retain, expiry=expiry)
        return len(payload)

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
            # Clearing our retained presence (empty payload) says "gone" without leaving a record on the broker.
            last = [(self.topics.presence(self.me), b"", True)]
            if self.controller and self.controller.finished:
                # The run is over: leave no leader or model behind for the next run on this broker (the retained
                # Finish stays a minute for peers that reconnect late, then expires).
                last += [(self.topics.of(kind), b"", True) for kind in (Claim, Heartbeat, Aggregation)]
            self.transport.close(last=last)
        return self.exit_code

    def tick(self, now: float) -> None:
        stalled_for = now - self._last_tick
        self._last_tick = now
        if stalled_for > self.election.timings.heartbeat_timeout:
            self.log.warning("this peer was frozen for %.1fs (stopped, or the host stalled)", stalled_for)
            actions = self.election.resumed(now)
            self.apply(actions, now)
            if not actions:   # (a controller stepping down announces itself anyway)
                self.send(Init(self.me, self.election.term, self.current_round, os.getpid()))   # "I am back"
        self.apply(self.election.tick(now), now)
        if self.controller:
            self.controller.tick(now)
            if self.controller.finished:
                self.exit_code = EXIT_OK

    def handle(self, event, now: float) -> None:
        if isinstance(event, Inbound):
            self.on_inbound(event, now)
        elif isinstance(event, JobDone):
            self.trainer.on_job_done(event, self.election.term)
        elif isinstance(event, Connected):
            self.log.info("connected to broker %s", self.settings.broker)
            self.send(Presence(self.me, "online"), retain=True)
            self.send(Init(self.me, self.election.term, self.current_round, os.getpid()))
        elif isinstance(event, Disconnected):
            self.log.warning("disconnected from broker (%s); reconnecting", event.reason)
        elif isinstance(event, Refused):
            self.log.error("broker refused the connection: %s%s", event.reason,
                           " (check --username/--password and the broker's ACL)" if event.fatal else "")
            if event.fatal:
                self.exit_code = EXIT_REFUSED

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
            if short == "presence" and event.topic != self.topics.presence(message.peer):
                raise ProtocolError(f"presence of {message.peer} on another peer's topic")
        except ProtocolError as err:
            self.log.warning("dropped a malformed message on %s (%d bytes): %s", event.topic, len(event.payload), err)
            return
        self.dispatch(message, len(event.payload), event.retained, now)

    def dispatch(self, message: Message, size: int, retained: bool, now: float) -> None:
        e = self.election
        if isinstance(message, Presence):
            if message.status == "online":
                self.apply(e.peer_up(message.peer, now), now)
            elif message.peer == self.me:
                if self.transport.connected:   # the broker thought us dead (we hung); we are back
                    self.send(Presence(self.me, "online"), retain=True)
            else:
                self.peer_gone(message.peer, now)
        elif isinstance(message, Init):
            self.apply(e.peer_up(message.peer, now), now)
            if self.controller and message.peer != self.me:
                self.log.info("%s joined", message.peer)
                self.controller.peer_up(message.peer, now)
                self.controller.next_heartbeat = 0.0   # tell the newcomer at once who leads
        elif isinstance(message, Vote):
            self.apply(e.on_vote(message.term, message.peer, message.vote, message.round, message.reason, now), now)
        elif isinstance(message, (Claim, Heartbeat)) and retained:
            leader = message.peer if isinstance(message, Claim) else message.controller
            self.apply(e.on_retained(message.term, leader, now), now)
        elif isinstance(message, Claim):
            self.apply(e.on_claim(message.term, message.peer, message.reason, message.members, now), now)
        elif isinstance(message, Aggregation) and retained:
            # Delivered because we subscribed: the model a late joiner starts from, not a live order.
            if self.store.offer(message.round, message.term, message.weights, message.trainers):
                e.progress(message.round)
                self.log.info("holding the global model of round %d (retained by the broker)", message.round)
        elif isinstance(message, Finish) and retained and e.term == 0:
            # A peer that never saw this run: the finish is an earlier run's (within its minute of expiry) on a
            # broker being reused. It ends runs it belongs to, not the next one.
            self.log.info("ignoring the retained finish of an earlier run (term %d)", message.term)
        elif isinstance(message, (Heartbeat, Training, Aggregation, Metrics, Finish)):
            self.from_controller(message, now)
        elif isinstance(message, (Solution, Evaluation)):
            if self.controller and message.term == e.term:
                self.controller.on_message(message, size, now)

    def from_controller(self, message, now: float) -> None:
        e = self.election
        if e.is_stale(message.term):
            self.log.debug("ignored a %s of stale term %d from %s", message.TYPE, message.term, message.controller)
            return
        self.apply(e.on_controller_seen(message.term, message.controller, now), now)
        if e.is_stale(message.term) or (self.controller and message.controller != self.me):
            return
        if isinstance(message, Training) and not self.controller:
            self.trainer.on_training(message)
        elif isinstance(message, Aggregation):
            if self.store.offer(message.round, message.term, message.weights, message.trainers):
                e.progress(message.round)
            if not self.controller:
                self.trainer.on_aggregation(message)
        elif isinstance(message, Metrics):
            self.store.finish_round(RoundSummary(message.round, message.term, message.accuracy, message.loss,
                                                 message.bytes), message.run_started)
        elif isinstance(message, Finish) and not self.controller:
            self.log.info("finish received from %s (%s) after round %d: accuracy %.4f", message.controller,
                          message.reason, message.round, message.accuracy)
            self.exit_code = EXIT_OK

    def peer_gone(self, peer: str, now: float) -> None:
        if peer == self.me or peer not in self.election.live:
            return
        self.log.info("%s is gone", peer)
        self.apply(self.election.peer_down(peer, now), now)
        if self.controller:
            self.controller.peer_down(peer, now)

    def apply(self, actions, now: float) -> None:
        """Carry out what the election decided."""
        e = self.election
        for action in actions:
            if isinstance(action, CastVote):
                self.log.info("election for term %d (%s): voting %.4f", action.term, action.reason, action.vote)
                self.send(Vote(action.term, self.me, action.vote, action.round, action.reason))
            elif isinstance(action, SendClaim):
                self.log.info("term %d: best vote is mine; claiming", action.term)
                # Retained, so that a peer subscribing later learns the decision it did not see go by.
                self.send(Claim(action.term, self.me, action.vote, action.round, action.reason, action.members),
                          retain=True)
            elif isinstance(action, TakeOffice):
                self.controller = Controller(self.settings, action.term, action.reason, e.live, self.store,
                                             self.records, self.learner, self.send, self.log, self.rng)
                self.controller.take_office(action.members, now)
            elif isinstance(action, FollowController):
                self.log.info("term %d: controller is %s", action.term, action.controller)
            elif isinstance(action, StepDown):
                self.log.warning("stepping down as controller of term %d: %s", action.term, action.reason)
                self.controller = None
                # The others may have counted us gone while we were silent: say we are here, as a peer now.
                self.send(Init(self.me, self.election.term, self.current_round, os.getpid()))
            elif isinstance(action, Note):
                self.log.info("%s", action.text)

    def _job_wanted(self, job: Job) -> bool:
        return job.term == self.election.term and self.exit_code is None
