"""The local learning: fit the model on this peer's shard, evaluate, save. With peer.models (which builds the model)
the only modules that touch TensorFlow/Keras, imported lazily so the rest of the peer (and its tests) start fast."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np

from peer.learning import models
from peer.learning.data import SHAPES, Shard


class Learner:
    def __init__(
        self,
        dataset: str,
        shard: Shard | None,
        epochs: int = 1,
        batch_size: int = 32,
        seed: int = 0,
        model: str | None = None,
    ):
        """`model` is a --model spec (peer.models); None means the dataset's default."""
        self.dataset, self.shard = dataset, shard
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self.model_name = models.check_spec(model) if model else models.default_model(dataset)
        self._model: Any = None  # the Keras model, built by prepare()
        self._initial: list[np.ndarray] = []
        self._tensors: list[tuple[tuple[int, ...], str]] = []  # (shape, dtype) of each weight tensor, once built
        # The learner thread fits while the main loop may save the final model: one user of the model at a time.
        self._lock = threading.Lock()
        # The digest of the weights the Keras model holds now, if they are a known model's (shared with the twins,
        # like the model): a second evaluation of one global model skips setting 1.6M weights again.
        self._holds: dict[str, str | None] = {"digest": None}

    def prepare(self) -> None:
        """Import TensorFlow and build the model now, before joining: seconds of work that would otherwise stall
        the peer's loop the first time it becomes controller. ModelError if --model gives no usable model."""
        with self._lock:
            if self._model is None:
                self._model = models.build(
                    self.model_name, SHAPES[self.dataset], self.shard.num_classes if self.shard else 10, self.seed
                )
                self._initial = self._weights()
                self._tensors = models.tensors_of(self._model)

    def fingerprint(self) -> str:
        """The model's architecture as a short hex string (peer.models.fingerprint): equal on every peer that runs the
        same --model on the same dataset."""
        self.prepare()
        return models.fingerprint(self._tensors)

    def model_description(self) -> str:
        """E.g. "seed-cnn, 8 tensors, 1,199,882 parameters"."""
        self.prepare()
        return models.describe(self.model_name, self._tensors)

    def twin(self, shard: Shard) -> Learner:
        """A learner for another peer hosted in this process (peer.host): its own shard, this learner's model and
        lock. One Keras model per process, not per peer (each would cost its memory and its own traced functions),
        and one learning job at a time in the process: its peers share its one or two cores anyway."""
        self.prepare()
        other = Learner(self.dataset, shard, self.epochs, self.batch_size, self.seed, self.model_name)
        other._model, other._initial, other._lock, other._holds = self._model, self._initial, self._lock, self._holds
        other._tensors = self._tensors
        return other

    def sample_counts(self) -> tuple[int, int]:
        """(train, test) samples of this peer's shard: announced to the others, the most it may declare."""
        return (int(len(self.shard.y_train)), int(len(self.shard.y_test))) if self.shard else (0, 0)

    def _weights(self) -> list[np.ndarray]:
        return [np.asarray(w, np.float32) for w in self._model.get_weights()]

    def initial_weights(self) -> list[np.ndarray]:
        self.prepare()
        return [w.copy() for w in self._initial]

    def _hold(self, weights: list[np.ndarray], digest: str | None) -> None:
        if digest is None or digest != self._holds["digest"]:
            self._model.set_weights(weights)
        self._holds["digest"] = digest

    def fit(self, weights: list[np.ndarray], digest: str | None = None) -> tuple[list[np.ndarray], int, float]:
        """Train the given global weights (named `digest`, if known) on this peer's shard: (new weights, samples,
        last training loss)."""
        self.prepare()
        with self._lock:
            self._hold(weights, digest)
            self._holds["digest"] = None  # trained: no longer the model it started from
            x_train, y_train, _, _ = self._data()
            history = self._model.fit(
                x_train,
                y_train,
                epochs=self.epochs,
                batch_size=self.batch_size,
                shuffle=True,
                verbose=0,
            )
            return self._weights(), int(len(y_train)), float(history.history["loss"][-1])

    def evaluate(self, weights: list[np.ndarray], digest: str | None = None) -> tuple[float, float, int]:
        """(accuracy, loss, samples) of the given weights (named `digest`, if known) on this peer's test shard."""
        self.prepare()
        with self._lock:
            self._hold(weights, digest)
            _, _, x_test, y_test = self._data()
            results = self._model.evaluate(x_test, y_test, batch_size=256, verbose=0, return_dict=True)
        return models.accuracy_of(results), float(results["loss"]), int(len(y_test))

    def warm(self) -> None:
        """Fit and evaluate one batch, so that the first real job does not pay for tracing Keras's functions (a
        second or so, which would otherwise land in the first round)."""
        self.prepare()
        with self._lock:
            x_train, y_train, x_test, y_test = self._data()
            self._holds["digest"] = None
            n = min(self.batch_size, len(y_train), len(y_test))
            self._model.fit(x_train[:n], y_train[:n], epochs=1, batch_size=n, verbose=0)
            self._model.evaluate(x_test[:n], y_test[:n], batch_size=256, verbose=0)

    def _data(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(x_train, y_train, x_test, y_test) of this learner's shard, images included."""
        shard = self.shard
        if shard is None or shard.x_train is None or shard.x_test is None:
            raise RuntimeError("this learner holds no images: it can build the model, not fit or evaluate it")
        return shard.x_train, shard.y_train, shard.x_test, shard.y_test

    def save(self, weights: list[np.ndarray], path: Path) -> None:
        self.prepare()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._model.set_weights(weights)
            self._holds["digest"] = None
            self._model.save(path)
