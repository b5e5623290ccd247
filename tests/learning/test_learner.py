"""The model: built for each dataset's input, trains and evaluates on a few samples, saves a loadable .keras file,
and every peer builds the same initial weights (so any controller starts the same run)."""

from __future__ import annotations

import numpy as np
import pytest

from peer.learning.data import Shard
from peer.learning.learner import Learner


def tiny_shard(dataset: str, shape) -> Shard:
    rng = np.random.default_rng(0)
    y = np.arange(40) % 10
    return Shard(
        dataset,
        rng.random((40, *shape), dtype=np.float32),
        y,
        rng.random((20, *shape), dtype=np.float32),
        y[:20],
        10,
        "test",
    )


@pytest.mark.parametrize("dataset, shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))])
def test_fit_evaluate_save(tmp_path, dataset, shape):
    learner = Learner(dataset, tiny_shard(dataset, shape), epochs=1, batch_size=8, seed=1)
    start = learner.initial_weights()
    new, samples, loss = learner.fit(start)
    assert samples == 40 and np.isfinite(loss)
    assert [w.shape for w in new] == [w.shape for w in start] and all(w.dtype == np.float32 for w in new)
    assert any(not np.array_equal(a, b) for a, b in zip(new, start))
    accuracy, loss, n = learner.evaluate(new)
    assert 0.0 <= accuracy <= 1.0 and n == 20
    path = tmp_path / "model.keras"
    learner.save(new, path)
    import keras

    loaded = keras.models.load_model(path)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.get_weights(), new))


def test_every_peer_builds_the_same_initial_model():
    a = Learner("mnist", None, seed=42).initial_weights()
    b = Learner("mnist", None, seed=42).initial_weights()
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
