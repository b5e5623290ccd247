"""scripts.localnet, the one local-network implementation (the launcher's --local mode, the tests, the benchmarks):
its command line (no broker, no peers: LocalNetwork is replaced by a stand-in that records what it was given), the
roster (peer-K on shard K-1, K to a process), where each line of a process's output goes, and finding mosquitto."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from peer.config import load_settings
from scripts import localnet


class FakeNetwork:
    started: list[tuple[int, list[str]]] = []

    def __init__(self, run_dir, peers, peer_args, **options):
        FakeNetwork.started.append((peers, list(peer_args)))
        FakeNetwork.options = options
        self.broker = type("Broker", (), {"address": "127.0.0.1:1"})()
        self.brokers = [self.broker]
        self.certs = None
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


def test_the_roster_puts_peer_k_on_shard_k_minus_1_and_k_to_a_process():
    assert localnet.roster(3) == [("peer-1", "0/3"), ("peer-2", "1/3"), ("peer-3", "2/3")]
    assert localnet.roster(2, shards=5, first=4) == [("peer-4", "3/5"), ("peer-5", "4/5")]
    assert localnet.launched_shard("peer-12", 100) == "11/100"
    peers = [peer for peer, _ in localnet.roster(7)]
    assert localnet.processes_of(peers, 3) == [
        ["peer-1", "peer-2", "peer-3"],
        ["peer-4", "peer-5", "peer-6"],
        ["peer-7"],
    ]


def test_a_lone_peer_s_lines_all_go_to_its_log(tmp_path):
    with localnet.PeerLogs(tmp_path, ["peer-3"]) as logs:
        assert logs.write(b"t INFO peer=peer-3 role=waiting | one\n") == "peer-3"
        assert logs.write(b"Traceback (most recent call last):\n") == "peer-3"
    assert (tmp_path / "peers" / "peer-3" / "peer.log").read_bytes().count(b"\n") == 2
    assert not (tmp_path / "hosts").exists()


def test_a_hosts_lines_go_to_the_peer_they_name_and_all_of_them_to_the_hosts_log(tmp_path):
    lines = [
        b"t INFO peer=host-peer-1 role=host | loading\n",
        b"t INFO peer=peer-1 role=waiting | one\n",
        b"t INFO peer=peer-2 role=controller | two\n",
        b"  summary table row\n",
        b"t INFO peer=peer-1 role=trainer | three\n",
    ]
    combined = tmp_path / "hosts" / "peer-1.log"
    with localnet.PeerLogs(tmp_path, ["peer-1", "peer-2"], combined) as logs:
        whose = [logs.write(line) for line in lines]
    assert whose == ["host-peer-1", "peer-1", "peer-2", "peer-2", "peer-1"]
    assert combined.read_bytes() == b"".join(lines)
    assert (tmp_path / "peers" / "peer-1" / "peer.log").read_text().splitlines() == [
        "t INFO peer=peer-1 role=waiting | one",
        "t INFO peer=peer-1 role=trainer | three",
    ]
    assert (tmp_path / "peers" / "peer-2" / "peer.log").read_text().splitlines() == [
        "t INFO peer=peer-2 role=controller | two",
        "  summary table row",
    ]
    # A container's log, saved after it ran, is split the same way.
    saved = tmp_path / "saved"
    localnet.split_host_log(combined, ["peer-1", "peer-2"], saved)
    assert (saved / "peers" / "peer-2" / "peer.log").read_bytes() == lines[2] + lines[3]


def test_mosquitto_is_found_outside_the_path_and_its_absence_says_how_to_install_it(monkeypatch, tmp_path):
    fake = tmp_path / "mosquitto"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(localnet, "MOSQUITTO_PLACES", (str(fake),))
    assert localnet.find_mosquitto() == str(fake)
    monkeypatch.setattr(localnet, "MOSQUITTO_PLACES", ())
    assert localnet.find_mosquitto() is None
    with pytest.raises(localnet.MosquittoMissing, match=r"needs the mosquitto broker: .*install.* mosquitto$"):
        localnet.Broker().start()


def test_install_command_follows_the_distribution(monkeypatch):
    assert localnet.install_command("mosquitto").endswith(" mosquitto")
    monkeypatch.setattr(localnet.platform, "system", lambda: "Darwin")
    assert localnet.install_command("mosquitto") == "brew install mosquitto"


def test_sigterm_stops_the_network_like_ctrl_c(run, monkeypatch, capsys):
    def interrupted(self, timeout):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        raise AssertionError("SIGTERM did not stop the wait")

    monkeypatch.setattr(FakeNetwork, "wait", interrupted)
    stopped = []
    monkeypatch.setattr(FakeNetwork, "stop", lambda self: stopped.append(True))
    before = signal.getsignal(signal.SIGTERM)
    assert localnet.main(["--run-dir", "x", "--quiet", "--peers", "2"]) == 130
    assert stopped and "stopping every peer and the broker" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is before


def test_peers_spread_over_the_brokers_each_given_every_broker_its_own_first(tmp_path):
    assert localnet.broker_order(0, 3) == [0, 1, 2] and localnet.broker_order(2, 3) == [2, 0, 1]
    net = localnet.LocalNetwork(tmp_path, 6, brokers=3, learning_workers=0, secret=False)
    net.brokers = localnet.bridged_brokers(3)  # (not started: only their addresses are used)
    a, b, c = (broker.address for broker in net.brokers)
    assert [localnet.home_broker(f"peer-{k}", 3) for k in range(1, 7)] == [0, 1, 2, 0, 1, 2]
    assert net.broker_list("peer-1") == f"{a},{b},{c}"
    assert net.broker_list("peer-5") == f"{b},{c},{a}"
    assert net.broker_list("peer-3") == f"{c},{a},{b}"
    for broker in net.brokers:
        broker.close()


def test_the_bridges_carry_the_peers_topic_prefix():
    assert localnet.peers_topic_prefix([], {}) == "sd"
    assert localnet.peers_topic_prefix([], {"FL_TOPIC_PREFIX": "lab"}) == "lab"
    assert localnet.peers_topic_prefix(["--topic-prefix", "a/b", "--topic-prefix=c"], {"FL_TOPIC_PREFIX": "x"}) == "c"


def test_brokers_option_reaches_the_network(tmp_path, monkeypatch):
    monkeypatch.setattr(localnet, "LocalNetwork", FakeNetwork)
    assert localnet.main(["--run-dir", str(tmp_path), "--quiet", "--brokers", "3"]) == 0
    assert FakeNetwork.options["brokers"] == 3


# --- ports --------------------------------------------------------------------------------------------------------------


def test_a_free_port_is_below_the_ephemeral_range_and_nothing_listens_there():
    # (a broker that restarts must get its port back; an outgoing connection may meanwhile take an ephemeral one)
    low = int(localnet.EPHEMERAL_PORTS.read_text().split()[0])
    for _ in range(20):
        port = localnet.free_port()
        assert localnet.LOWEST_PORT <= port < low
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


def test_without_room_below_the_ephemeral_range_the_kernel_picks_the_port(tmp_path, monkeypatch):
    monkeypatch.setattr(localnet, "EPHEMERAL_PORTS", tmp_path / "range")
    assert 0 < localnet.free_port() < 65536  # no such file (not Linux)
    for text in ("1024\t60999\n", "garbage", ""):
        (tmp_path / "range").write_text(text)
        assert 0 < localnet.free_port() < 65536


def test_a_port_taken_below_the_ephemeral_range_is_passed_over(tmp_path, monkeypatch):
    (tmp_path / "range").write_text("65000\t65535\n")
    monkeypatch.setattr(localnet, "EPHEMERAL_PORTS", tmp_path / "range")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        offsets = iter([taken.getsockname()[1] - localnet.LOWEST_PORT, 7])
        monkeypatch.setattr(localnet.secrets, "randbelow", lambda n: next(offsets))
        assert localnet.free_port() == localnet.LOWEST_PORT + 7
