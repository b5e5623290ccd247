"""`python -m peer.host`: several peers in one process, each a whole peer of its own.

    python -m peer.host --hosted peer-1=0/100,peer-2=1/100,peer-3=2/100 --broker 127.0.0.1:1883 [peer flags]

A peer process costs about 470 MB, nearly all of it TensorFlow, so one machine holds about 45 of them. A host runs
K logical peers on one TensorFlow runtime: each has its own MQTT client (its own connection, Last Will and
subscription), id, shard, election, roles, records and event loop, exactly as if it were its own process; the
broker and the protocol cannot tell the difference. Only the model object is shared (`Learner.twin`), with its lock:
one learning job at a time in the process. Killing the process kills its K peers at once, as a machine crash would.

The peer flags are those of `python -m peer` (the same FL_* variables) except --peer-id and --shard, which
`--hosted` gives per peer. A broker that wants a login per peer (as `./up.sh`'s does: its ACL lets a login publish
only as that peer) gets them from `--login-dir DIR` [FL_LOGIN_DIR]: `DIR/<id>.env` holds that peer's
`FL_USERNAME=` and `FL_PASSWORD=` lines, as `./up.sh credentials` writes them; --username/--password would give
every hosted peer the same login.

Every log line names its own peer (id, role, term, round, phase); lines of the process itself (loading, TensorFlow)
name the host. Exit status: 0 if every hosted peer exited 0, else the first other code in `--hosted` order (2 for
bad flags, as `python -m peer`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from peer.config import SettingsError, _peer_id, build_parser, load_settings, parse_shard
from peer.node.banners import without_tensorflow_banners
from peer.node.signals import StopSignals

STOPPED = 130  # as `python -m peer` stopped by a signal
CRASHED = 1
JOIN_S = 0.2
LEAVE_S = 60  # after a signal, how long the peers get to end their jobs and leave (a fit ends first)


def parse_hosted(text: str) -> list[tuple[str, int, int]]:
    """`ID=K/N,ID=K/N,...` as [(peer id, shard K, shards N)]; SettingsError says what is wrong."""
    hosted = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        peer, sep, shard = item.partition("=")
        if not sep:
            raise SettingsError(f"--hosted {item!r}: expected ID=K/N, e.g. peer-1=0/100")
        k, n = parse_shard(shard)
        hosted.append((_peer_id(peer.strip()), k, n))
    if not hosted:
        raise SettingsError("--hosted: name at least one peer as ID=K/N")
    ids = [peer for peer, _, _ in hosted]
    if len(set(ids)) != len(ids):
        raise SettingsError(
            f"--hosted: a peer id appears twice ({', '.join(sorted({p for p in ids if ids.count(p) > 1}))})"
        )
    return hosted


def read_login(login_dir: str | Path, peer_id: str) -> tuple[str, str]:
    """`peer_id`'s broker login (user name, password) from `login_dir/<peer_id>.env`: `KEY=VALUE` lines, `#` comments.
    SettingsError names the file and what is missing."""
    path = Path(login_dir) / f"{peer_id}.env"
    try:
        text = path.read_text()
    except OSError as err:
        raise SettingsError(f"--login-dir: no login for {peer_id}: {path} ({err.strerror or err})") from None
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and not key.startswith("#"):
            values[key.strip()] = value.strip()
    missing = [key for key in ("FL_USERNAME", "FL_PASSWORD") if not values.get(key)]
    if missing:
        raise SettingsError(f"--login-dir: {path} has no {' or '.join(missing)} line")
    return values["FL_USERNAME"], values["FL_PASSWORD"]


class Loops:
    """The hosted peers' threads, and a wait for all of them to end that a signal cannot spoil.

    Not Thread.join: a KeyboardInterrupt raised inside join() leaves Python 3.11 believing the thread ended
    (bpo-45274's clean-up releases the live thread's lock), so the process would exit under a peer still fitting in
    TensorFlow, which aborts it ("FATAL: exception not rethrown", exit -6; CI saw it). An Event.wait interrupted by
    a signal is only a wait cut short."""

    def __init__(self):
        self._running = 0
        self._counting = threading.Lock()
        self._all_ended = threading.Event()
        self._all_ended.set()  # none running: none to wait for

    def start(self, target, *args, name: str) -> None:
        with self._counting:
            self._running += 1
            self._all_ended.clear()
        threading.Thread(target=self._run, args=(target, *args), name=name, daemon=True).start()

    def _run(self, target, *args) -> None:
        try:
            target(*args)
        finally:
            with self._counting:
                self._running -= 1
                if self._running == 0:
                    self._all_ended.set()

    def wait(self, timeout: float = float("inf")) -> bool:
        """Until every thread has ended (True) or `timeout` passed (False). A signal gets in every JOIN_S."""
        deadline = time.monotonic() + timeout
        while not self._all_ended.wait(JOIN_S):
            if time.monotonic() >= deadline:
                return False
        return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m peer.host", add_help=False)
    parser.add_argument("--hosted", required=False)
    parser.add_argument("--login-dir", default=os.environ.get("FL_LOGIN_DIR") or None)
    parser.add_argument("-h", "--help", action="store_true")
    own, rest = parser.parse_known_args(argv)
    if own.help:
        print(__doc__)
        return 0
    try:
        if not own.hosted:
            raise SettingsError("--hosted ID=K/N,... is required: the peers this process hosts")
        hosted = parse_hosted(own.hosted)
        for flag in ("--peer-id", "--shard", "--resume"):
            if any(arg == flag or arg.startswith(flag + "=") for arg in rest):
                raise SettingsError(
                    f"{flag} is not a host flag: --hosted names each peer and its shard"
                    + (" (--resume needs one peer per process)" if flag == "--resume" else "")
                )
        base = load_settings(rest)
        if base.resume:
            raise SettingsError("FL_RESUME: --resume needs one peer per process")
        logins = {peer: read_login(own.login_dir, peer) for peer, _, _ in hosted} if own.login_dir else {}
    except SettingsError as err:
        build_parser().print_usage(sys.stderr)
        print(f"python -m peer.host: error: {err}", file=sys.stderr)
        return 2
    try:
        return _run(base, hosted, logins)
    except KeyboardInterrupt:
        print("python -m peer.host: stopped", file=sys.stderr)
        return STOPPED


def _run(base, hosted: list[tuple[str, int, int]], logins: dict[str, tuple[str, str]]) -> int:
    from peer.learning.data import DatasetError, load_shard
    from peer.learning.link import LinkError
    from peer.learning.models import ModelError
    from peer.learning.remote import ServiceHandle
    from peer.node.jobs import remote_learner
    from peer.node.loop import Peer
    from peer.records.events import record_exit
    from peer.records.run_dir import RunRecorder

    ids = [peer for peer, _, _ in hosted]
    host = f"host-{ids[0]}"
    from peer.node.logs import configure_host_logging

    loggers = configure_host_logging(host, ids, base.log_level)
    log = logging.getLogger("peer")
    service = ServiceHandle(base.learning_service)  # the K peers' learning: the machine's service, or one of theirs
    learners = []
    # Every shard first, then every peer: a peer's loop counts from its construction, and one built before seconds
    # of loading would start out believing it had been frozen.
    with without_tensorflow_banners():
        for peer_id, k, n in hosted:
            settings = dataclasses.replace(base, peer_id=peer_id, shard=k, num_shards=n)
            if peer_id in logins:
                settings = dataclasses.replace(settings, username=logins[peer_id][0], password=logins[peer_id][1])
            recorder = RunRecorder(settings.run_dir, peer_id)
            try:
                recorder.check_writable()
            except OSError as err:
                service.close()
                return _error(f"the run dir {settings.run_dir} is not writable ({err.strerror or err})")
            try:
                labels = load_shard(settings.shard_spec, images=False)  # the images are the learning service's
            except DatasetError as err:
                service.close()
                return _error(f"{peer_id}: {err}", base.run_dir, ids)
            recorder.data(labels.describe(settings.shard_spec, settings.peer_id))
            try:
                learner = remote_learner(settings, service, labels)
            except (ModelError, DatasetError, LinkError) as err:
                service.close()
                return _error(f"{peer_id}: {err}", base.run_dir, ids)
            learners.append((settings, learner))
    peers = [Peer(settings, mine, log=loggers[settings.peer_id]) for settings, mine in learners]
    log.info("hosting %d peers: %s", len(peers), ",".join(ids))

    codes: dict[str, int] = {}

    def run(peer: Peer) -> None:
        try:
            codes[peer.me] = peer.run()
        except Exception as err:  # one peer's bug must not take the others down silently: say which, with the trace
            peer.log.exception("the peer's loop failed")
            codes[peer.me] = CRASHED
            record_exit(base.run_dir, peer.me, CRASHED, f"crashed: {type(err).__name__}: {err}")

    loops = Loops()
    # SIGTERM (launcher shutdown, docker stop): every peer leaves cleanly, as on Ctrl-C.
    with StopSignals() as stops:
        for peer in peers:
            loops.start(run, peer, name=f"peer-loop-{peer.me}")
        try:
            loops.wait()
        except KeyboardInterrupt:
            # Leaving takes a moment (a fit in progress ends first): a second signal must not cut it short.
            stops.shield()
            log.info("stopped by signal: every hosted peer leaves")
            for peer in peers:
                if peer.exit_code is None:
                    peer.log.info("stopped by signal")  # in each peer's own log, as a peer of its own says it
                    peer.exit_code = STOPPED  # its loop sees it within one tick and says goodbye on the broker
            loops.wait(LEAVE_S)
        finally:
            service.close()
    failed = [codes.get(peer_id, STOPPED) for peer_id in ids if codes.get(peer_id, STOPPED) != 0]
    return failed[0] if failed else 0


def _error(text: str, run_dir: Path | None = None, peers: Sequence[str] = ()) -> int:
    """Say why the host cannot run its peers; each of `peers` records it as its `exit` event's reason too."""
    print(f"python -m peer.host: error: {text}", file=sys.stderr)
    if run_dir is not None:
        from peer.records.events import record_exit

        for peer_id in peers:
            record_exit(run_dir, peer_id, 2, text)
    return 2


if __name__ == "__main__":
    sys.exit(main())
