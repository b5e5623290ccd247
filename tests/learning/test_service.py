"""The learning service and its link: frames, the model facts cache, and a real service process (TensorFlow) doing a
peer's jobs; a private service started when the machine's does not answer, and started again when it dies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from peer.learning import link
from peer.learning.data import DatasetError, ShardSpec, load_shard
from peer.learning.facts import ModelFacts, facts_key, read_facts, write_facts
from peer.learning.models import ModelError
from peer.learning.remote import RemoteLearner, ServiceHandle, machine_cpus
from tests.netutil import FASHION, ROOT

SPEC = ShardSpec("fashion-mnist", FASHION, 1, 5, train_samples=200, test_samples=100)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SDFL_CACHE_DIR", str(tmp_path / "cache"))


def test_a_frame_carries_a_header_and_weights_and_nothing_else():
    left, right = socket.socketpair()
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.float32(7.5) * np.ones(1, np.float32)]
    link.send(left, {"op": "fit", "n": 1}, weights)
    link.send(left, {"op": "ping"})
    header, got = link.receive(right)
    assert header == {"op": "fit", "n": 1} and all(np.array_equal(a, b) for a, b in zip(got, weights))
    assert link.receive(right) == ({"op": "ping"}, None)
    left.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
    with pytest.raises(link.LinkError, match="not a frame"):
        link.receive(right)
    left.close()
    with pytest.raises(link.LinkError):
        link.receive(right)


def test_model_facts_are_kept_per_model_file_content_and_versions_and_never_for_a_module(tmp_path):
    facts = ModelFacts(
        "cnn-small",
        "ab" * 8,
        "cnn-small, 2 tensors, 7 parameters",
        [np.ones((2, 3), np.float32), np.zeros(1, np.float32)],
    )
    key = facts_key("cnn-small", (28, 28, 1), 10, 42)
    assert key and key != facts_key("cnn-small", (28, 28, 1), 10, 43) != facts_key("seed-cnn", (28, 28, 1), 10, 42)
    assert read_facts(key) is None
    write_facts(key, facts)
    back = read_facts(key)
    assert back.fingerprint == facts.fingerprint and all(
        np.array_equal(a, b) for a, b in zip(back.initial, facts.initial)
    )
    model_file = tmp_path / "m.py"
    model_file.write_text("def build(s, n): pass\n")
    first = facts_key(f"{model_file}:build", (28, 28, 1), 10, 42)
    model_file.write_text("def build(s, n): return None\n")
    assert first and facts_key(f"{model_file}:build", (28, 28, 1), 10, 42) != first
    assert facts_key("mymodels:build", (28, 28, 1), 10, 42) is None


def test_damaged_facts_are_built_again_not_trusted(tmp_path):
    key = facts_key("cnn-small", (28, 28, 1), 10, 42)
    write_facts(key, ModelFacts("cnn-small", "ab" * 8, "d", [np.ones(3, np.float32)]))
    weights = next((tmp_path / "cache" / "models").glob("*.weights"))
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    assert read_facts(key) is None


def test_a_peer_reads_its_labels_without_the_images():
    labels = load_shard(SPEC, images=False)
    full = load_shard(SPEC)
    assert labels.x_train is None and full.x_train.shape == (200, 28, 28, 1)
    assert np.array_equal(labels.y_train, full.y_train) and np.array_equal(labels.y_test, full.y_test)


def test_the_dataset_is_decompressed_once_then_memory_mapped(tmp_path):
    load_shard(SPEC)
    cached = sorted(p.name for p in (tmp_path / "cache" / "idx").glob("*.npy"))
    assert len(cached) == 4 and cached[0].startswith("t10k-images-idx3-ubyte-")
    again = load_shard(SPEC)
    assert np.array_equal(again.x_train, load_shard(SPEC).x_train)


def test_machine_cpus_is_at_least_one_and_at_most_the_cores():
    import os

    assert 1 <= machine_cpus() <= (os.cpu_count() or 1)


# --- a real service ------------------------------------------------------------------------------------------------


@pytest.fixture
def service(tmp_path):
    """The machine's learning service, as a launcher starts it."""
    path = tmp_path / "learn.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer.learning.service", "--socket", str(path), "--threads", "1"], cwd=ROOT
    )
    deadline = time.monotonic() + 60  # against a hang only: it listens at once
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert path.exists(), "the learning service did not listen within 60 s"
        yield path, proc
    finally:  # even when it never listened: no service outlives its test
        proc.terminate()
        proc.wait(10)


def learner(path, spec=SPEC, model="cnn-small", peer="peer-2") -> RemoteLearner:
    return RemoteLearner(ServiceHandle(path), peer, spec, load_shard(spec, images=False), model, 42, 1, 32)


def test_a_peer_learns_through_the_service_and_the_next_one_reads_the_facts_from_the_cache(service, tmp_path):
    path, proc = service
    first = learner(path)
    facts = first.prepare()
    assert facts.fingerprint == first.fingerprint() and len(facts.initial) == 8
    assert "cnn-small" in first.model_description()
    assert first.sample_counts() == (200, 100)
    trained, samples, loss = first.fit(first.initial_weights())
    assert samples == 200 and loss > 0 and [w.shape for w in trained] == [w.shape for w in facts.initial]
    assert not all(np.array_equal(a, b) for a, b in zip(trained, facts.initial))
    accuracy, loss, samples = first.evaluate(trained)
    assert 0 <= accuracy <= 1 and samples == 100
    first.save(trained, tmp_path / "model.keras")
    assert (tmp_path / "model.keras").stat().st_size > 1000
    # A save the service cannot do is a failed write for the peer (OSError: logged, the run goes on), not a crash.
    with pytest.raises(OSError, match="could not save"):
        first.save(trained, tmp_path / "model.keras" / "inside-a-file.keras")
    # The most samples any peer of this partition may claim, from the labels alone (the caps apply).
    assert first.count_bound() == (200, 100)
    # A second peer of the machine: the facts come from the cache, not from a model built again.
    second = learner(path, ShardSpec("fashion-mnist", FASHION, 2, 5, train_samples=200, test_samples=100), peer="p3")
    assert read_facts(facts_key("cnn-small", (28, 28, 1), 10, 42)) is not None
    assert second.prepare().fingerprint == facts.fingerprint


def test_a_model_that_cannot_be_built_is_a_model_error_with_the_services_reason(service, tmp_path):
    path, _ = service
    broken = tmp_path / "broken.py"
    broken.write_text("def build(input_shape, num_classes):\n    raise RuntimeError('no such layer')\n")
    with pytest.raises(ModelError, match="no such layer"):
        learner(path, model=f"{broken}:build").prepare()


def test_a_shard_the_service_cannot_load_is_a_dataset_error(service, tmp_path):
    path, _ = service
    peer = learner(path)
    peer.spec = ShardSpec("fashion-mnist", tmp_path / "gone", 0, 5)
    with pytest.raises(DatasetError, match="not a folder"):
        peer.fit([np.zeros(1, np.float32)])


def test_without_the_machines_service_a_peer_starts_its_own_and_again_after_it_dies(tmp_path):
    handle = ServiceHandle(tmp_path / "nobody-listens.sock")
    peer = RemoteLearner(handle, "peer-2", SPEC, load_shard(SPEC, images=False), "cnn-small", 42, 1, 32)
    try:
        weights = peer.prepare().initial
        assert peer.evaluate(weights)[2] == 100
        first = handle._private
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert peer.evaluate(weights)[2] == 100  # the link broke: a new private service, the request again
        assert handle._private is not first and handle._private.poll() is None
    finally:
        handle.close()
    assert handle._private.wait(10) is not None


def test_a_private_service_ends_with_the_process_that_started_it_even_a_killed_one(tmp_path):
    script = (
        "import sys, time\n"
        "from peer.learning.data import load_shard\n"
        "from peer.learning.remote import RemoteLearner, ServiceHandle\n"
        "from tests.learning.test_service import SPEC\n"
        "handle = ServiceHandle()\n"
        "handle.connect().close()\n"
        "print(handle._private.pid, flush=True)\n"
        "time.sleep(600)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait(10)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def test_the_peers_of_a_round_send_its_model_once_then_name_it_by_digest(service, monkeypatch):
    path, _ = service
    sent = []
    real = link.send

    def counting(sock, header, weights=None):
        sent.append((header.get("op"), header.get("digest") is not None, weights is not None))
        real(sock, header, weights)

    monkeypatch.setattr(link, "send", counting)
    first, second = learner(path), learner(path, ShardSpec("fashion-mnist", FASHION, 3, 5, test_samples=50), peer="p4")
    weights = first.prepare().initial
    first.evaluate(weights)
    second.evaluate(weights)
    evaluations = [s for s in sent if s[0] == "evaluate"]
    # the first asks by digest, is told to send it, sends it; the second asks by digest and is served
    assert evaluations == [("evaluate", True, False), ("evaluate", False, True), ("evaluate", True, False)]
    changed = [w + 1 for w in weights]
    assert second.evaluate(changed)[2] == 50  # another model: sent, not mistaken for the last


def test_worker_processes_run_the_jobs_hold_a_round_s_model_and_come_back_if_killed(tmp_path):
    path = tmp_path / "learn.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "peer.learning.service", "--socket", str(path), "--workers", "2", "--processes"],
        cwd=ROOT,
    )
    try:
        deadline = time.monotonic() + 30
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        children = lambda: [  # noqa: E731  (of every thread: each worker's thread starts its process)
            int(pid)
            for task in Path(f"/proc/{proc.pid}/task").iterdir()
            for pid in (task / "children").read_text().split()
        ]
        first, second = (
            learner(path),
            learner(path, ShardSpec("fashion-mnist", FASHION, 3, 5, test_samples=50), peer="p4"),
        )
        weights = first.prepare().initial
        trained, samples, _ = first.fit(weights)
        assert samples == 200 and not all(np.array_equal(a, b) for a, b in zip(trained, weights))
        assert first.evaluate(trained)[2] == 100 and second.evaluate(trained)[2] == 50  # the same model, twice
        deadline = time.monotonic() + 60  # the second starts once the first has imported TensorFlow
        while len(children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(children()) == 2  # TensorFlow is theirs: the service's own process never imports it
        assert second.evaluate(weights)[2] == 50
        for child in children():
            os.kill(child, signal.SIGKILL)
        assert first.evaluate(trained)[2] == 100  # a worker process started again for it
        kids = children()
    finally:
        proc.terminate()
        proc.wait(30)
    deadline = time.monotonic() + 30  # a guard against a hang only: they end at once
    while any(_alive(kid) for kid in kids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(kid) for kid in kids), "the worker processes end with the service"
