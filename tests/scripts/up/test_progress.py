"""The launcher's progress lines and verdict: peers killed on purpose (with those sharing their container) are no
failure, and peers that exit alike are one line."""

from __future__ import annotations

from scripts import chaos
from scripts.up import progress
from tests.scripts.up.test_compose import make_network


def test_a_kill_counts_for_every_peer_of_the_killed_container(tmp_path, capsys):
    net = make_network(tmp_path, peers=[f"peer-{k}" for k in range(1, 7)], total=6, per_process=3)
    net.run_dir.mkdir()
    chaos.record(net.run_dir, "kill", "peer-2", "KILL")
    assert net.killed_on_purpose() == {"peer-1", "peer-2", "peer-3"}
    codes = {"peer-1": 137, "peer-2": 137, "peer-3": 137, "peer-4": 0, "peer-5": 1, "peer-6": None}
    assert progress.verdict(codes, net.killed_on_purpose()) == {"peer-5": 1, "peer-6": None}
    assert make_network(tmp_path, peers=["peer-1", "peer-2", "peer-3"]).killed_on_purpose() == {"peer-2"}
    # The launcher's progress says it once for the three, and apart for a peer that exited otherwise.
    lines = progress.Progress(net, 0)
    lines.update(
        {
            "peer-1": "exited 137",
            "peer-2": "exited 137",
            "peer-3": "exited 137",
            "peer-4": "running",
            "peer-5": "exited 1",
        }
    )
    lines.update({"peer-1": "exited 137", "peer-4": "exited 0"})
    said = [line.split(": ", 1)[1] for line in capsys.readouterr().out.splitlines() if " exited " in line]
    assert said == ["peer-1..peer-3 exited 137 (killed on purpose)", "peer-5 exited 1", "peer-4 exited 0"]
    assert (
        progress.spans(["peer-10", "peer-2", "peer-1", "peer-3", "peer-4", "peer-7", "peer-8"])
        == "peer-1..peer-4, peer-7, peer-8, peer-10"
    )
    assert progress.spans(["peer-1", "x"]) == "peer-1, x"
