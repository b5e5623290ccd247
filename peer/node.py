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
from dataclasses import dataclass
import random
import time

from .actions import (EXIT_DUPLICATE, EXIT_GAVE_UP, EXIT_REFUSED, AdoptModel, Exit, FetchModel, FinishRound, JobDone,
                      Log, Print, Publish, RecordElection, RecordEvaluation, RecordRound, RecordRun, SaveCheckpoint,
                      SaveModel, StartJob)
from .admission import Refused, ReplayGuard, Route, View, admit, entitled
from .config import Settings
from .controller import Controller
from .election import (CastVote, Election, ElectionTimings, FollowController, GiveUp, Note, Role, SendClaim,
                       StepDown, TakeOffice, Unconfirmed)
from .follower import Follower
from .jobs import JobRunner
from .learner import Learner
from .chunks import Complete, Dropped, Reassembler, is_chunk, split
from .protocol import (MAX_WEIGHT_BYTES, Claim, Init, Message, Presence, ProtocolError, Seal, Stamper, Topics, Vote,
                       WeightCodec, chunk_limit, decode, encode_parts, sealed_size)
from .records import Checkpoint, RunRecorder
from .rounds import GlobalModel, ModelStore, RoundSummary
from .transport import Connected, Disconnected, Inbound, MqttTransport, Refused as ConnectionRefused

TICK_S = 0.05
PRESENCE_EXPIRY_S = 3600   # a dead peer's "offline" will does not linger on a long-lived broker forever
QUIET_S = 10.0             # the same kind of warning (a malformed message, a failed write) at most once per this
CHUNK_TIMEOUT_S = 60.0     # a chunked message whose next chunk is this late is dropped (the round logic retries)
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
    # On the handler of a process's one peer; on the logger of each peer hosted with others (peer.host).
    for context in [*log.filters, *(f for handler in log.handlers for f in handler.filters)]:
        if isinstance(context, _LogContext):
            context.peer = peer


class Peer:
    def __init__(self, settings: Settings, learner: Learner, rng: random.Random | None = None,
                 transport=None, runner=None, resume: "Resumed | None" = None, log: logging.Logger | None = None):
        """`transport` and `runner` default to the real MQTT adapter and learner thread; tests hand in fakes.
        `resume`: the run's state from its checkpoint, to go on from. `log`: this peer's own logger when several
        peers share the process (peer.host); by default the process's "peer" logger."""
        self.settings, self.me, self.learner = settings, settings.peer_id, learner
        self.rng = rng or random.Random()
        self.topics = Topics(settings.topic_prefix, settings.run_id)
        self.seal, self.stamper = Seal(settings.secret), Stamper()
        self.guard = ReplayGuard(self.me)
        self.events: queue.Queue = queue.Queue()
        self.election = Election(self.me, settings.min_peers,
                                 ElectionTimings.from_heartbeat(settings.heartbeat, settings.election_window,
                                                                settings.wait_timeout),
                                 self.rng, started_at=time.monotonic())
        self.store = ModelStore()          # written here only, by carrying out AdoptModel and FinishRound
        self.samples = learner.sample_counts()
        self.fingerprint = learner.fingerprint()
        self.misfits: set[str] = set()      # peers that announced another model: not part of this run
        # Chunked messages being put back together: at most two models per sender and four in all at once.
        self.reassembler = Reassembler(MAX_WEIGHT_BYTES + 4096, 4 * MAX_WEIGHT_BYTES, CHUNK_TIMEOUT_S)
        self.chunks_out: dict[str, int] = {}   # retained topic -> chunks its last model took (to clear them later)
        self.last_fetch = float("-inf")
        self.follower = Follower(self.me, self.store, tuple(tuple(w.shape) for w in learner.initial_weights()),
                                 keep_solutions_up_to=settings.max_message_bytes)
        self.controller: Controller | None = None
        # What each peer announced (init): (train samples, test samples), the most a controller lets it declare.
        self.announced: dict[str, tuple[int, int]] = {}
        self.records = RunRecorder(settings.run_dir, self.me)
        self.log = log or logging.getLogger("peer")
        if log is None and not self.log.handlers:
            configure_logging(self.me, settings.log_level)
        _attach_to_log(self.log, self)
        # The client id is ours alone (a random suffix): nobody can take our session over by guessing it. A broker
        # with a login per peer replaces it with the login (use_username_as_clientid).
        self.transport = transport or MqttTransport(
            settings.broker_host, settings.broker_port, f"{self.me}-{self.stamper.incarnation & 0xFFFFFF:06x}",
            self.topics.subscriptions(), self.events, settings.keepalive, settings.username, settings.password)
        self.runner = runner or JobRunner(learner, self.events, self._job_wanted, self.log)
        if resume:
            self.store.offer(resume.model.round, resume.model.term, resume.model.weights, resume.model.trainers)
            for summary in resume.rounds:
                self.store.finish_round(summary, resume.run_started)
            self.election.restore(resume.model.term, resume.model.round)
        self.exit_code: int | None = None
        self.quota = Quota(self.log)
        self._status: tuple = ()
        self._last_tick = time.monotonic()
        self._answer_due: float | None = None   # when this peer answers the newcomers heard since its last init

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
        return View(self.me, e.term, e.role, e.controller, self.fingerprint, frozenset(self.misfits))

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
        self.log.info("starting: broker %s, run %s, shard %s, model %s (fingerprint %s), waiting for %d peers",
                      self.settings.broker, self.settings.run_id, self.settings.shard_label,
                      self.learner.model_description(), self.fingerprint, self.settings.min_peers)
        if not self.seal.sealed:
            self.log.warning("no federation secret (--secret-file or FL_SECRET): any client of this broker can speak "
                             "for the federation; see docs/SECURITY.md")
        self.transport.start(self.topics.presence(self.me), self._sealed(Presence(self.me, "offline")),
                             will_expiry=PRESENCE_EXPIRY_S)
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
        if self.exit_code == EXIT_DUPLICATE:
            return []   # the id is the other process's: "offline" would be said in its name
        # A signed "offline" tells the others we left (an empty payload could come from anyone, so nobody acts on
        # one); then our retained presence is cleared, leaving no record on the broker.
        presence = self.topics.presence(self.me)
        last = [(presence, self._sealed(Presence(self.me, "offline")), False), (presence, b"", True)]
        if self.controller and self.controller.finished:
            # The run is over: its leader and model need not stay on the broker (the retained Finish does, for
            # peers that come back to this run later).
            last += [(self.topics.topic(kind, self.me), b"", True) for kind in ("election", "heartbeat", "aggregation")]
            model = self.topics.topic("aggregation", self.me)
            last += [(Topics.chunk(model, i), b"", True) for i in range(self.chunks_out.get(model, 0))]
        return last

    def tick(self, now: float) -> None:
        stalled_for = now - self._last_tick
        self._last_tick = now
        if stalled_for > self.election.silent_after:   # as long as the others wait for a controller's sign
            self.log.warning("this peer was frozen for %.1fs (stopped, or the host stalled)", stalled_for)
            actions = self.election.resumed(now)
            self.carry_out(actions, now)
            if not actions:   # (a controller stepping down announces itself anyway)
                self._announce()   # "I am back"
        self.carry_out(self.election.tick(now), now)
        if self.controller:
            self.carry_out(self.controller.tick(now), now)
        for dropped in self.reassembler.expire(now):
            self._dropped(dropped)
        if self._answer_due is not None and now >= self._answer_due and self.exit_code is None:
            self._announce(reply=True)

    def handle(self, event, now: float) -> None:
        if isinstance(event, Inbound):
            self.on_inbound(event, now)
        elif isinstance(event, JobDone):
            self.carry_out(self.follower.on_job_done(event, self.election.term), now)
        elif isinstance(event, Connected):
            self.log.info("connected to broker %s", self.settings.broker)
            self.election.reconnected(now)
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
        located = self.topics.locate(event.topic)
        if located is None or not event.payload:   # not ours; or a cleared retained slot, which anyone can send
            return
        kind, sender, index = located
        size = len(event.payload)
        try:
            body, stamp = self.seal.open(event.topic, event.payload)
            if index is not None or is_chunk(body):
                if index is None or not is_chunk(body):
                    raise ProtocolError("a chunk must come on a chunk's topic, and only a chunk")
                if refusal := self.guard.check(kind, sender, stamp, event.retained, time.time()):
                    return self._refused(refusal)
                result = self.reassembler.offer(sender, stamp.incarnation, kind, body, now)
                if isinstance(result, Dropped):
                    return self._dropped(result)
                if not isinstance(result, Complete):
                    return
                body = result.body
                size = sealed_size(len(body), self.seal.sealed)
            message = decode(kind, body, sender=sender)
        except ProtocolError as err:
            self.quota.warn(f"malformed:{kind}", logging.WARNING, "dropped a malformed message on %s (%d bytes): %s",
                            event.topic, len(event.payload), err)
            return
        if index is None:   # (a chunked message's chunks were each checked as they came)
            if sender == self.me and stamp.incarnation != self.stamper.incarnation and kind == "init" \
                    and not event.retained:
                return self._same_id(message, stamp.incarnation)
            refusal = self.guard.check(kind, sender, stamp, event.retained, time.time())
            if refusal:
                return self._refused(refusal)
        if not event.retained:
            self.election.heard_from(sender)
        verdict = admit(message, event.retained, self._view())
        if isinstance(verdict, Refused):
            self._refused(verdict)
            return
        self.route(verdict, message, size, now)

    def route(self, route: Route, message: Message, size: int, now: float) -> None:
        e = self.election
        if route is Route.PEER_OTHER_MODEL:
            return self._other_model(message)
        if route is Route.RUN_OTHER_MODEL:
            self.log.error("this run's model (fingerprint %s, controller %s) is not this peer's (%s, %s): start this "
                           "peer with the run's --model and --dataset", message.model, message.controller,
                           self.fingerprint, self.learner.model_description())
            self.exit_code = EXIT_REFUSED
            return
        if route is Route.PRESENCE:
            if message.peer in self.misfits:
                return
            if message.status == "online":
                self.peer_up(message.peer, now)
            elif message.peer == self.me:
                if self.transport.connected:   # the broker thought us dead (we hung); we are back
                    self.send(Presence(self.me, "online"), retain=True)
            else:
                self.peer_gone(message.peer, now)
        elif route is Route.ANNOUNCE:
            self.announced[message.peer] = (message.train_samples, message.test_samples)
            self.peer_up(message.peer, now, self.announced[message.peer])
            if message.peer != self.me and not message.reply:
                # A newcomer, or a peer back on the broker, learns from the answers who is here and what each holds.
                self._answer_newcomer(now)
        elif route is Route.BALLOT:
            self.carry_out(e.on_vote(message.term, message.peer, message.vote, message.round, message.reason, now), now)
        elif route is Route.CLAIM:
            self.carry_out(e.on_claim(message.term, message.peer, message.reason, message.members, now), now)
        elif route is Route.RETAINED_LEADER:
            leader = message.peer if isinstance(message, Claim) else message.controller
            self.carry_out(e.on_retained(message.term, leader, now), now)
        elif route is Route.RETAINED_MODEL:
            self.carry_out(self.follower.on_retained_model(message), now)
        elif route is Route.RUN_FINISHED:
            self.carry_out(self.follower.on_finished_run(message), now)
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

    def _other_model(self, message: Init) -> None:
        """A peer announced another model than ours: it cannot take part (its solutions would not fit), so it is not
        counted, in the election or as a trainer; it learns so from the controller's heartbeat and exits."""
        if message.peer not in self.misfits:
            self.misfits.add(message.peer)
            self.log.warning("%s runs another model (fingerprint %s; this peer's is %s): it is not counted in this "
                             "run (every peer needs the same --model and --dataset)", message.peer, message.model,
                             self.fingerprint)
        if message.peer in self.election.live:
            self.peer_gone(message.peer, time.monotonic())

    def _dropped(self, dropped: Dropped) -> None:
        level = logging.getLevelName(dropped.level.upper())
        self.quota.warn(f"chunks:{dropped.reason[:30]}", level, "%s", dropped.reason)

    def _same_id(self, message: Init, incarnation: int) -> None:
        """Another process announced itself with our peer id: two peers cannot share one. The one started later
        leaves; the earlier one answers with its own init, so the later one learns it is the later one."""
        if incarnation > self.stamper.incarnation:
            self.quota.warn("same-id", logging.WARNING, "another process (pid %d) started with this peer id %s; it "
                            "started later and will exit", message.pid, self.me)
            self._announce()
        else:
            self.log.error("another process (pid %d) already runs as peer %s; this one exits: give every peer its "
                           "own --peer-id", message.pid, self.me)
            self.exit_code = EXIT_DUPLICATE

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
        """Publish `message`: one envelope, or, larger than the broker takes, one per chunk (chunk i on topic/i)."""
        topic = self.topics.of(message)
        parts = encode_parts(message, self.settings.wire_dtype)
        size = sum(len(part) for part in parts)
        limit = self.settings.max_message_bytes
        chunks = 0
        if sealed_size(size, self.seal.sealed) <= limit:
            self.transport.publish(topic, self._seal(topic, b"".join(parts)), retain=retain, expiry=expiry)
        else:
            message_id = self.stamper.seq + 1
            bodies = split(parts, chunk_limit(limit, self.seal.sealed), message_id)
            counted = []

            def sealed_chunks():
                for index, body in enumerate(bodies):
                    counted.append(index)
                    chunk_topic = Topics.chunk(topic, index)
                    yield chunk_topic, self._seal(chunk_topic, body)
            self.transport.publish_paced(sealed_chunks(), retain=retain, expiry=expiry)
            chunks = len(counted)
        if retain:
            # A model of fewer chunks than the last one on this topic leaves no stale chunk behind.
            for index in range(chunks, self.chunks_out.get(topic, 0)):
                self.transport.publish(Topics.chunk(topic, index), b"", retain=True)
            self.chunks_out[topic] = chunks

    def _seal(self, topic: str, body: bytes) -> bytes:
        return self.seal.seal(topic, body, self.stamper.next())

    def _sealed(self, message: Message) -> bytes:
        return self._seal(self.topics.of(message), b"".join(encode_parts(message)))

    def _announce(self, reply: bool = False) -> None:
        self._answer_due = None   # every init of ours reaches every newcomer heard so far: it answers them all
        self.send(Init(self.me, self.election.term, self.current_round, os.getpid(), *self.samples, reply,
                       self.fingerprint))

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
            self._answer_due = now + self.settings.heartbeat * random.uniform(0.5, 1.5)   # not self.rng: the votes'

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
                self.log.info("election for term %d (%s): voting %.4f%s", action.term, action.reason, action.vote,
                              f"; waiting {action.patience:g}x the usual (the last terms came to nothing)"
                              if action.patience > 1 else "")
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
                self.transport.unsubscribe([topic for topic, _ in self.topics.subscriptions(controller=True)])
                # The others may have counted us gone while we were silent: say we are here, as a peer now.
                self._announce()
            elif isinstance(action, Note):
                self.log.info("%s", action.text)
            elif isinstance(action, Unconfirmed):
                self.log.info("%s was not heard from since this peer reconnected", action.peer)
                self.peer_gone(action.peer, now)
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
            elif isinstance(action, FetchModel):
                # A re-sent order must not make every waiting trainer fetch every model again at once.
                if now - self.last_fetch >= self.settings.heartbeat:
                    self.last_fetch = now
                    self.transport.fetch_retained(self.topics.aggregations())
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
            elif isinstance(action, SaveCheckpoint):
                self._write("the checkpoint", self.records.checkpoint, checkpoint_state(self.settings.run_id, action),
                            WeightCodec.parts(action.model.weights))
            elif isinstance(action, SaveModel):
                self._write("model.keras", self.learner.save, action.weights, self.records.model_path)
            elif isinstance(action, Print):
                print(action.text, flush=True)
            elif isinstance(action, Exit):
                self.exit_code = action.code
            else:
                raise TypeError(f"no way to carry out {action!r}")

    def take_office(self, action: TakeOffice, now: float) -> None:
        # Solutions and evaluations reach the controller only: subscribed before the first order goes out (the
        # broker handles one client's packets in order), so no answer comes before the subscription.
        self.transport.subscribe(self.topics.subscriptions(controller=True))
        initial = self.learner.initial_weights() if self.store.latest is None else None
        self.controller = Controller(self.settings, action.term, action.reason, action.members, self.election.live,
                                     self.store, self.rng, wall_offset=time.time() - time.monotonic(),
                                     initial_weights=initial,
                                     announced=self.announced, model_fingerprint=self.fingerprint)
        self.carry_out(self.controller.take_office(now), now)

    def _job_wanted(self, job: StartJob) -> bool:
        return job.term == self.election.term and self.exit_code is None


# --- checkpoints: the run dir's format is peer.records'; the weights are the wire's -----------------------------------

@dataclass(frozen=True)
class Resumed:
    """A run's state read back from its checkpoint."""
    run_id: str
    model: GlobalModel
    rounds: tuple[RoundSummary, ...]
    run_started: float | None


def checkpoint_state(run_id: str, action: SaveCheckpoint) -> dict:
    model = action.model
    return {"run_id": run_id, "round": model.round, "term": model.term, "trainers": list(model.trainers),
            "run_started": action.run_started,
            "rounds": [{"round": r.round, "term": r.term, "accuracy": r.accuracy, "loss": r.loss, "bytes": r.bytes}
                       for r in action.rounds]}


def resumed(checkpoint: Checkpoint) -> Resumed:
    """The checkpoint as the peer holds a run: ProtocolError if its weights are damaged, KeyError/TypeError/ValueError
    if a round is."""
    weights = WeightCodec.decode(checkpoint.weights)
    rounds = tuple(RoundSummary(int(r["round"]), int(r["term"]), float(r["accuracy"]), float(r["loss"]),
                                int(r["bytes"])) for r in checkpoint.rounds)
    return Resumed(checkpoint.run_id, GlobalModel(checkpoint.round, checkpoint.term, weights,
                                                  tuple(checkpoint.trainers)), rounds, checkpoint.run_started)

