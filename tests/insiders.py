"""A lying member, built on the real peer (issue 19): `python -m tests.insiders --lie LIE[,LIE...] [peer flags]`.

It is `python -m peer` with the federation secret (and, against the container broker configuration, its own login
only), whose learner, announcement and publications lie. Everything else is the real `peer.node.loop.Peer`: it
elects, follows, trains and evaluates like any member, except where a lie says otherwise. Its votes are always 0.0,
so it never wins an election (what an elected liar can do is out of the rows' scope: docs/SECURITY.md).

The lies, as the rows of the issue name them:
  counts               its init announces 10^12 train and 10^12 test samples, and every solution and evaluation
                       declares them
  flip                 its solution is the model it was sent minus twice its honest update (a step back, sign-flipped,
                       small enough to escape the clipping bound of 3x the round's median step); every other round,
                       with `x100`, plus 100 times its honest update instead
  x100                 its solution is the model plus 100 times its honest update (with `flip`: alternating)
  evaluations          every evaluation reports accuracy 1.0 and loss 0
  no-show              it takes every training order and never answers it, nor evaluates anything
  clock+300            its clock runs 300 s ahead
  retained-huge-claim  before anything else, one retained claim as itself of term 2^31 - 2
  foreign-heartbeat    before anything else, one retained heartbeat as itself, term 0, naming another model
  claims-ahead         once it holds round 1: a claim as itself of (its term + 1000) every 50 ms
  votes                once it holds round 1: a vote for (its term + 1) every 2 s, vote 0.0
  chunk-flood          once it holds round 1: 20 chunks a second, each opening a new message of 1 GiB with 64 KiB
                       of data, on its aggregation topic (every peer hears it) and its solution topic (the
                       controller does)
  forge-finish         once it holds round 1: a finish (max-rounds, after round 1) signed in the controller's name,
                       once (a login per peer stops that; local mode has none)

It logs each lie it tells once, as `insider: <what>`, so a test can tell it did.

The module also holds what the end-to-end tests of these rows need around it: the container broker's configuration
(logins and ACL, `scripts.up.logins.make_credentials`) on a real mosquitto, and a way to start the liar among a
`LocalNetwork`'s peers.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from peer.wire.chunks import CHUNK_MAGIC, CHUNK_VERSION

HUGE_TERM = 2**31 - 2
LIES = (
    "counts",
    "flip",
    "x100",
    "evaluations",
    "no-show",
    "clock+300",
    "retained-huge-claim",
    "foreign-heartbeat",
    "claims-ahead",
    "votes",
    "chunk-flood",
    "forge-finish",
)
LOTS = 10**12
FOREIGN_MODEL = "f" * 16
# What a flooding chunk declares: 1 GiB (INSIDER_FLOOD_BYTES to declare less, e.g. on a shared machine against a
# peer that allocates what a chunk declares, as 672ce7a did)
GIB = int(os.environ.get("INSIDER_FLOOD_BYTES", 1024**3))
FLOOD_DATA = 65536


class NeverWins(random.Random):
    """The liar's random numbers: its votes are 0.0, so it never wins an election."""

    def random(self) -> float:
        return 0.0


class LyingLearner:
    """The real learner (fits and evaluates for real), with what it reports changed by the lies."""

    def __init__(self, learner, lies: set[str]):
        self.real, self.lies = learner, lies
        self.fits = 0

    def __getattr__(self, name):
        return getattr(self.real, name)

    def sample_counts(self) -> tuple[int, int]:
        return (LOTS, LOTS) if "counts" in self.lies else self.real.sample_counts()

    def fit(self, weights):
        new, samples, loss = self.real.fit(weights)
        self.fits += 1
        step = [n - w for n, w in zip(new, weights)]
        x100 = "x100" in self.lies and ("flip" not in self.lies or self.fits % 2 == 0)
        if x100:
            new = [w + 100.0 * s for w, s in zip(weights, step)]
        elif "flip" in self.lies:
            new = [w - 2.0 * s for w, s in zip(weights, step)]
        return [np.asarray(w, np.float32) for w in new], (LOTS if "counts" in self.lies else samples), loss

    def evaluate(self, weights):
        accuracy, loss, samples = self.real.evaluate(weights)
        if "evaluations" in self.lies:
            accuracy, loss = 1.0, 0.0
        return accuracy, loss, (LOTS if "counts" in self.lies else samples)


def lying_peer_class():
    """The Peer subclass (imported here: the module must load without TensorFlow for the tests' helpers)."""
    from peer.node.loop import Peer
    from peer.node.transport import Connected
    from peer.roles.actions import StartJob
    from peer.wire.messages import Claim, Finish, Heartbeat, Vote

    class LyingPeer(Peer):
        def __init__(self, settings, learner, lies: set[str], **kwargs):
            super().__init__(settings, LyingLearner(learner, lies), rng=NeverWins(), **kwargs)
            self.lies = lies
            self.told: set[str] = set()
            self.next_claim = self.next_vote = self.next_chunk = 0.0
            self.flood_id = 1
            self.planted = False
            if "clock+300" in lies:
                self.wall_clock = lambda: time.time() + 300

        def tell(self, what: str) -> None:
            if what not in self.told:
                self.told.add(what)
                self.log.warning("insider: %s", what)

        # The peer's tables (EVENT_HANDLERS, DEEDS) name its own methods: a liar steps in where events come in
        # (`handle`) and where actions are carried out (`carry_out`), both public.

        def handle(self, event, now: float) -> None:
            if isinstance(event, Connected) and not self.planted:  # before its presence and init: lying in wait
                self.planted = True
                if "retained-huge-claim" in self.lies:
                    self.send(Claim(HUGE_TERM, self.me, 1.0, 0, "start", (self.me,)), retain=True)
                    self.tell(f"planted a retained claim of term {HUGE_TERM}")
                if "foreign-heartbeat" in self.lies:
                    self.send(Heartbeat(0, self.me, 0, "training", FOREIGN_MODEL), retain=True)
                    self.tell("planted a retained heartbeat of term 0 naming another model")
            super().handle(event, now)

        def carry_out(self, actions, now: float) -> None:
            if "no-show" in self.lies:
                actions = list(actions)
                for job in [a for a in actions if isinstance(a, StartJob)]:
                    self.tell(f"took a {job.kind} order and will never answer it")
                actions = [a for a in actions if not isinstance(a, StartJob)]
            super().carry_out(actions, now)

        def tick(self, now: float) -> None:
            super().tick(now)
            if self.exit_code is not None or self.store.latest is None or self.store.latest.round < 1:
                return
            term = self.election.term
            if "claims-ahead" in self.lies and now >= self.next_claim:
                self.next_claim = now + 0.05
                self.send(Claim(min(term + 1000, HUGE_TERM), self.me, 1.0, 10**6, "start", (self.me,)))
                self.tell("claims of term + 1000 every 50 ms")
            if "votes" in self.lies and now >= self.next_vote:
                self.next_vote = now + 2.0
                self.send(Vote(term + 1, self.me, 0.0, 0, "controller-silent"))
                self.tell("a vote for term + 1 every 2 s")
            if "chunk-flood" in self.lies and now >= self.next_chunk:
                self.next_chunk = now + 0.05
                for kind in ("aggregation", "solution"):
                    self.flood(kind)
                self.tell("chunks opening a new 1 GiB message, 20 a second")
            if "forge-finish" in self.lies and self.election.controller not in (None, self.me):
                self.lies = self.lies - {"forge-finish"}
                self.send(Finish(term, self.election.controller, 1, "max-rounds", 0.99))
                self.tell(f"signed a finish in the name of {self.election.controller}")

        def flood(self, kind: str) -> None:
            """One chunk opening a new message of 1 GiB (64 KiB of data), sealed as itself, on its own topic."""
            import struct

            self.flood_id += 1
            count = -(-GIB // FLOOD_DATA)
            head = struct.pack(
                "<4sBxxxQIIIQ32s", CHUNK_MAGIC, CHUNK_VERSION, self.flood_id, 0, count, FLOOD_DATA, GIB, bytes(32)
            )
            topic = self.topics.chunk(self.topics.topic(kind, self.me), 0)
            payload = self.outbox.seal.seal(topic, head + bytes(FLOOD_DATA), self.stamper.next())
            self.transport.publish(topic, payload)

    return LyingPeer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.insiders", add_help=False)
    parser.add_argument("--lie", required=True)
    own, rest = parser.parse_known_args(argv)
    lies = {lie.strip() for lie in own.lie.split(",") if lie.strip()}
    unknown = lies - set(LIES)
    if unknown:
        print(f"python -m tests.insiders: unknown lies {sorted(unknown)} (known: {', '.join(LIES)})", file=sys.stderr)
        return 2

    from peer.config import load_settings
    from peer.learning.data import load_shard
    from peer.learning.remote import RemoteLearner, ServiceHandle
    from peer.node.logs import configure_logging
    from peer.node.signals import StopSignals
    from peer.records.run_dir import RunRecorder

    # As `python -m peer` does it (the labels here, the images and the model in the learning service), without its
    # friendly errors: the tests give it valid flags.
    settings = load_settings(rest)
    recorder = RunRecorder(settings.run_dir, settings.peer_id)
    configure_logging(settings.peer_id, settings.log_level)
    spec = settings.shard_spec
    labels = load_shard(spec, images=False)
    recorder.data(labels.describe(spec, settings.peer_id))
    service = ServiceHandle(settings.learning_service)
    learner = RemoteLearner(
        service, settings.peer_id, spec, labels, settings.model, settings.seed, settings.epochs, settings.batch_size
    )
    learner.prepare()
    peer = lying_peer_class()(settings, learner, lies)
    with StopSignals():
        try:
            return peer.run()
        except KeyboardInterrupt:
            return 130
        finally:
            service.close()


# --- around it: the container broker's configuration, and starting the liar among a network's peers ------------------


class ContainerBroker:
    """A real mosquitto with broker/mosquitto.conf, the containers' configuration: no anonymous clients, a login per
    peer (made by scripts.up.logins.make_credentials, as ./up.sh makes them), the ACL that lets a login publish only as
    itself, and the login as client id. On a free loopback port; the login folder is private and removed at close."""

    def __init__(self, peers: list[str], log_path: Path | None = None):
        from scripts.localnet import free_port
        from scripts.up.logins import make_credentials

        self.port = free_port()
        self._dir = Path(tempfile.mkdtemp(prefix="fl-acl-broker-"))
        self.login = make_credentials(self._dir / "login", peers)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        root = Path(__file__).resolve().parent.parent
        conf = (root / "broker" / "mosquitto.conf").read_text()
        conf = re.sub(r"^listener 1883$", f"listener {self.port} 127.0.0.1", conf, flags=re.M)
        conf = conf.replace("/etc/sdfl/login/", f"{self.login.folder}/")
        if os.geteuid() == 0:  # as root, mosquitto would drop to its own user, which cannot read this private folder
            conf += "\nuser root\n"
        self.conf = self._dir / "mosquitto.conf"
        self.conf.write_text(conf)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, peer: str) -> dict[str, str]:
        """The FL_USERNAME / FL_PASSWORD of `peer`'s own login."""
        from scripts.up.common import read_env_file

        values = read_env_file(self.login.env_file(peer))
        return {"FL_USERNAME": values["FL_USERNAME"], "FL_PASSWORD": values["FL_PASSWORD"]}

    def start(self) -> ContainerBroker:
        from scripts.localnet import find_mosquitto, wait_for_port

        binary = find_mosquitto() or "mosquitto"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen([binary, "-c", str(self.conf)], stdout=out, stderr=subprocess.STDOUT)
        if not wait_for_port(self.port, 10):
            self.close()
            raise RuntimeError(f"mosquitto did not start on port {self.port}")
        return self

    def close(self) -> None:
        from scripts.localnet import end_process

        end_process(self.proc, 5)
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()


def start_insider(net, peer_id: str, shard: str, lies: list[str], extra_args=(), env=None) -> subprocess.Popen:
    """Start the liar as one of `net`'s peers (a `scripts.localnet.LocalNetwork`): the same broker, run, secret,
    learning service, run dir and peer flags, its log in its peer dir; `net.stop()` stops it with the others. The
    network's services start first if they have not (a liar may come before the honest peers)."""
    net.start_services()
    if net.learning is not None:  # (its socket within a second or two; else the liar would start a service of its own)
        deadline = time.monotonic() + 30
        while not net.learning.socket.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    if env:
        net.peer_env[peer_id] = {**net.peer_env.get(peer_id, {}), **env}
    return net.start_peer(peer_id, shard, ["--lie", ",".join(lies), *extra_args], module="tests.insiders")


if __name__ == "__main__":
    sys.exit(main())
