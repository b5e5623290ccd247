"""A full disk (issue 19): every file a peer replaces whole (model.keras, the checkpoint, status.json, run.json) is
written to a temporary file beside it and renamed over it: a write that fails leaves the file as it was (or no file),
never a truncated one, and no temporary file behind.

The disk is made full for real: a child process with a file size limit (RLIMIT_FSIZE: every write past it fails with
EFBIG, SIGXFSZ ignored) runs the peer's own deeds, with the learning service's real learner (Keras) for model.keras,
in process: the peer hands it a temporary path and renames what it wrote."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.netutil import ROOT

resource = pytest.importorskip("resource")

CHILD = textwrap.dedent(
    """
    import json, random, resource, signal, sys, time
    from pathlib import Path

    from peer.config import Settings
    from peer.learning.learner import Learner
    from peer.node.loop import Peer
    from peer.roles.actions import RecordRun, SaveCheckpoint, SaveModel
    from peer.roles.rounds import GlobalModel, RoundSummary

    run_dir = Path(sys.argv[1])

    class Quiet:  # a transport and a runner that do nothing: only the deeds that write files run
        connected = True
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    class InProcess(Learner):  # the learning service's own learner, in this process: the file size limit binds it too
        def count_bound(self):
            return None

    learner = InProcess("fashion-mnist", None, model="cnn-small")
    weights = learner.initial_weights()
    peer = Peer(
        Settings(peer_id="p1", run_dir=run_dir, dataset="fashion-mnist", model="cnn-small"),
        learner, rng=random.Random(1), transport=Quiet(), runner=Quiet(),
    )
    model = GlobalModel(1, 1, weights)
    deeds = [
        SaveModel(weights),
        SaveCheckpoint(model, (RoundSummary(1, 1, 0.5, 1.0, 10),), 1.0),
        RecordRun({"settings": {}, "outcome": {"reason": "max-rounds", "padding": "x" * 100_000}}),
    ]
    # What is on disk before the disk fills up: a status.json, and (as after an earlier round) a checkpoint.
    peer._write_status()
    peer.carry_out(deeds[1:2], time.monotonic())
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file can grow past 4 KiB any more
    peer.carry_out(deeds, time.monotonic())
    peer.election.term = 7  # a new state to write
    peer._write_status()
    """
)


def test_a_full_disk_leaves_every_file_as_it_was_and_no_truncated_model(tmp_path):
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(run_dir)], cwd=ROOT, capture_output=True, text=True, timeout=180
    )
    assert result.returncode == 0, result.stderr[-3000:]
    # Each failed write was logged (once per file), and the run would go on.
    for what in ("model.keras", "the checkpoint", "run.json"):
        assert f"could not write {what}" in result.stderr, result.stderr[-3000:]
    assert not (run_dir / "model.keras").exists()  # no truncated model
    assert not (run_dir / "run.json").exists()
    checkpoint = json.loads((run_dir / "checkpoint" / "checkpoint.json").read_text())
    weights = run_dir / "checkpoint" / checkpoint["weights_file"]
    assert weights.stat().st_size > 4096  # the one written before the disk filled up, whole
    status = json.loads((run_dir / "peers" / "p1" / "status.json").read_text())  # small: it still fits, whole
    assert status["term"] == 7
    leftovers = [p.name for p in run_dir.rglob("*") if ".tmp" in p.name]
    assert leftovers == []
