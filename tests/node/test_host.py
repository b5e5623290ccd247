"""peer.host, without a broker or TensorFlow: its command line, and that each hosted peer's log lines name that peer
(the end-to-end run of hosted peers is tests/test_e2e_many.py)."""

from __future__ import annotations

import io
import logging
import random
import subprocess
import sys

import pytest

from peer.config import Settings, SettingsError
from peer.host import parse_hosted, read_login
from peer.node.logs import configure_host_logging
from peer.node.loop import Peer
from tests.netutil import ROOT
from tests.node.test_node import FakeLearner, FakeRunner, FakeTransport


def test_hosted_peers_are_id_and_shard_pairs():
    assert parse_hosted("peer-1=0/3, peer-2=1/3,") == [("peer-1", 0, 3), ("peer-2", 1, 3)]


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "name at least one peer"),
        ("peer-1", "expected ID=K/N"),
        ("peer-1=3/3", "need 0 <= K < N"),
        ("bad id=0/2", "peer id 'bad id'"),
        ("p=0/2,p=1/2", "a peer id appears twice (p)"),
    ],
)
def test_bad_hosted_lists_are_refused_clearly(text, message):
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_hosted(text)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "--hosted ID=K/N,... is required"),
        (["--hosted", "p1=0/2", "--peer-id", "x"], "--peer-id is not a host flag"),
        (["--hosted", "p1=0/2", "--shard=1/2"], "--shard is not a host flag"),
        (["--hosted", "p1=0/2", "--max-rounds", "0"], "--max-rounds: must be at least 1"),
        (["--hosted", "p1=0/2", "--login-dir", "/no/such/dir"], "--login-dir: no login for p1: /no/such/dir/p1.env"),
    ],
)
def test_the_host_refuses_bad_flags_before_loading_anything(args, message):
    result = subprocess.run(
        [sys.executable, "-m", "peer.host", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and f"python -m peer.host: error: {message}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_each_hosted_peer_reads_its_own_login(tmp_path):
    (tmp_path / "peer-1.env").write_text("# Broker login of peer-1\nFL_USERNAME=peer-1\nFL_PASSWORD=s3=cret\n")
    (tmp_path / "peer-2.env").write_text("FL_USERNAME=peer-2\n")
    assert read_login(tmp_path, "peer-1") == ("peer-1", "s3=cret")
    with pytest.raises(SettingsError, match="peer-2.env has no FL_PASSWORD line"):
        read_login(tmp_path, "peer-2")
    with pytest.raises(SettingsError, match="no login for peer-3"):
        read_login(tmp_path, "peer-3")


def test_every_line_names_the_hosted_peer_it_is_about(tmp_path):
    root = logging.getLogger("peer")
    saved = (root.handlers[:], root.level, root.propagate)
    try:
        loggers = configure_host_logging("host-a", ["a", "b"], "info")
        out = io.StringIO()
        root.handlers[0].setStream(out)
        peers = []
        for me in ("a", "b"):
            transport = FakeTransport()
            peer = Peer(
                Settings(peer_id=me, min_peers=2, run_dir=tmp_path),
                FakeLearner(),
                rng=random.Random(1),
                transport=transport,
                runner=FakeRunner(),
                log=loggers[me],
            )
            transport.events = peer.events
            peers.append(peer)
        peers[0].log.info("one")
        peers[1].log.warning("two")
        logging.getLogger("peer.learning.data").info("loading")  # the process's own line
        lines = out.getvalue().splitlines()
        assert " peer=a role=waiting term=0 round=0 phase=- | one" in lines[0]
        assert " peer=b role=waiting term=0 round=0 phase=- | two" in lines[1]
        assert " peer=host-a role=host " in lines[2] and lines[2].endswith("| loading")
    finally:
        root.handlers[:], root.level, root.propagate = saved
        for me in ("a", "b"):
            logging.getLogger(f"peer.{me}").filters.clear()


def test_a_signal_while_waiting_for_the_loops_does_not_lose_track_of_a_live_one():
    """The host waits for its peers' loops; a Ctrl-C/SIGTERM (KeyboardInterrupt) lands in that wait, and then the host
    waits again for the peers to leave. It must still see the loop that was running (Thread.join would not: Python
    3.11 marks a thread whose join was interrupted as ended, and the process exits under it)."""
    import signal
    import threading
    import time

    from peer.host import Loops

    release, ended = threading.Event(), []

    def peer_loop(name):
        release.wait(10)
        time.sleep({"a": 1.0, "b": 0.1}[name])  # leaving takes a moment (a fit in progress ends first)
        ended.append(name)

    loops = Loops()
    loops.start(peer_loop, "a", name="loop-a")
    loops.start(peer_loop, "b", name="loop-b")
    # (Python's own Ctrl-C handler, whatever an earlier test of this process left installed)
    saved = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Timer(0.3, signal.raise_signal, args=(signal.SIGINT,)).start()
        with pytest.raises(KeyboardInterrupt):
            loops.wait()
    finally:
        release.set()  # "every hosted peer leaves"
        signal.signal(signal.SIGINT, saved)
    assert loops.wait(10) is True and sorted(ended) == ["a", "b"]
    assert Loops().wait(0) is True  # nothing to wait for
