"""A trainer's fit options (FedProx's mu, DP clipping and local noise) reach the machine's learning service in the
session hello, and the service fits as they say: a real service process (TensorFlow)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from peer.learning.data import DatasetError, load_shard
from peer.learning.remote import RemoteLearner, ServiceHandle
from tests.learning.test_service import SPEC
from tests.netutil import ROOT


@pytest.fixture
def service(tmp_path, monkeypatch):
    """The machine's learning service, as a launcher starts it (its model facts cached in the test's folder)."""
    monkeypatch.setenv("SDFL_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "learn.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer.learning.service", "--socket", str(path), "--threads", "1"], cwd=ROOT
    )
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    yield path, proc
    proc.terminate()
    proc.wait(10)


def test_a_trainer_fits_as_its_hello_says_its_update_clipped_and_bad_options_refused(service):
    from peer.learning.privacy import l2_norm, update_of

    path, _ = service
    clipped = RemoteLearner(
        ServiceHandle(path),
        "peer-2",
        SPEC,
        load_shard(SPEC, images=False),
        "cnn-small",
        42,
        1,
        32,
        {"proximal_mu": 0.01, "dp_clip": 0.05, "dp_noise_std": 0.0},
    )
    start = clipped.prepare().initial
    trained, samples, _ = clipped.fit(start)
    assert samples == 200 and 0.049 < l2_norm(update_of(start, trained)) <= 0.05 * (1 + 1e-5)
    noised = RemoteLearner(
        ServiceHandle(path),
        "peer-4",
        SPEC,
        load_shard(SPEC, images=False),
        "cnn-small",
        42,
        1,
        32,
        {"dp_clip": 0.05, "dp_noise_std": 0.01},
    )
    trained, _, _ = noised.fit(start)
    update = np.concatenate([u.ravel() for u in update_of(start, trained)])
    # --dp-local: the clipped update (norm 0.05 over all coordinates) plus N(0, 0.01^2) on each of them
    assert abs(update.std() / 0.01 - 1) < 0.05 and update.size > 50_000
    for bad in ({"dp_clip": 0}, {"proximal_mu": -1}, {"dp_noise_std": "x"}, {"dp_clip": float("inf")}):
        peer = RemoteLearner(
            ServiceHandle(path), "p3", SPEC, load_shard(SPEC, images=False), "cnn-small", 42, 1, 32, bad
        )
        with pytest.raises(DatasetError, match="bad fit options"):
            peer.fit(start)
