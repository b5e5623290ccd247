"""scripts.localnet's command line: the peers wait for the N peers it starts unless told otherwise (no broker, no
peers: LocalNetwork is replaced by a stand-in that records what it was given)."""

from __future__ import annotations

import pytest

from peer.config import load_settings
from scripts import localnet


class FakeNetwork:
    started: list[tuple[int, list[str]]] = []

    def __init__(self, run_dir, peers, peer_args, **options):
        FakeNetwork.started.append((peers, list(peer_args)))
        FakeNetwork.options = options
        self.broker = type("Broker", (), {"address": "127.0.0.1:1"})()
        self.run_id = "test-run"

    def processes(self):
        return []

    def host_of(self, peer_id):
        return [peer_id]

    def start(self):
        return self

    def wait(self, timeout):
        return {}

    def stop(self):
        pass


@pytest.fixture
def run(monkeypatch, tmp_path):
    monkeypatch.setattr(localnet, "LocalNetwork", FakeNetwork)
    monkeypatch.setattr(localnet.signal, "signal", lambda *args: None)  # main's SIGTERM handler is not pytest's
    monkeypatch.delenv("FL_MIN_PEERS", raising=False)
    FakeNetwork.started = []

    def run(*argv: str) -> list[str]:
        assert localnet.main(["--run-dir", str(tmp_path), "--quiet", *argv]) == 0
        [(_, peer_args)] = FakeNetwork.started
        return peer_args

    return run


def min_peers(peer_args: list[str], environ: dict | None = None) -> int:
    return load_settings(peer_args, environ or {}).min_peers


def test_min_peers_defaults_to_the_number_of_peers(run):
    assert min_peers(run("--peers", "3")) == 3
    FakeNetwork.started = []
    assert min_peers(run("--peers", "7", "--", "--max-rounds", "2")) == 7


@pytest.mark.parametrize("flags", [["--min-peers", "2"], ["--min-peers=2"], ["--trainers", "1", "--min-peers", "2"]])
def test_a_min_peers_among_the_peer_flags_wins(run, flags):
    assert min_peers(run("--peers", "4", "--", *flags)) == 2


def test_fl_min_peers_in_the_environment_wins(run, monkeypatch):
    monkeypatch.setenv("FL_MIN_PEERS", "2")
    peer_args = run("--peers", "4")
    assert "--min-peers" not in peer_args and min_peers(peer_args, {"FL_MIN_PEERS": "2"}) == 2


def test_a_single_peer_gets_no_default(run):
    assert run("--peers", "1") == []  # --min-peers 1 would be refused; the peer's own default applies


def test_peers_per_process_reaches_the_network(run):
    run("--peers", "6", "--peers-per-process", "3")
    assert FakeNetwork.options["peers_per_process"] == 3
