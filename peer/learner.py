"""The model and the local learning: build, fit on this peer's shard, evaluate, save. The only module that touches
TensorFlow/Keras, imported lazily so the rest of the peer (and its tests) start fast."""
from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np

from .data import SHAPES, Shard

_configured = False


def _keras():
    """Import Keras with TensorFlow kept small: several peers share two cores, so one thread each."""
    global _configured
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # oneDNN's start-up notice bypasses TF_CPP_MIN_LOG_LEVEL and would break the one-line-per-event logs; its
    # speed-up on models this small is within noise. Set TF_ENABLE_ONEDNN_OPTS=1 to have it anyway.
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    import keras
    import tensorflow as tf
    if not _configured:
        tf.config.threading.set_intra_op_parallelism_threads(1)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        _configured = True
    return keras


def build_model(dataset: str, num_classes: int = 10, seed: int = 0):
    keras = _keras()
    keras.utils.set_random_seed(seed)  # every controller starts the same run from the same initial model
    layers = keras.layers
    if dataset == "cifar10":
        body = [layers.Conv2D(32, 3, activation="relu", padding="same"), layers.Conv2D(32, 3, activation="relu"),
                layers.MaxPooling2D(), layers.Conv2D(64, 3, activation="relu"), layers.MaxPooling2D(),
                layers.Flatten(), layers.Dropout(0.3), layers.Dense(128, activation="relu")]
    else:
        body = [layers.Conv2D(16, 3, activation="relu"), layers.MaxPooling2D(),
                layers.Conv2D(32, 3, activation="relu"), layers.MaxPooling2D(),
                layers.Flatten(), layers.Dense(64, activation="relu")]
    model = keras.Sequential([keras.Input(SHAPES[dataset]), *body, layers.Dense(num_classes, activation="softmax")])
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


class Learner:
    def __init__(self, dataset: str, shard: Shard | None, epochs: int = 1, batch_size: int = 32, seed: int = 0):
        self.dataset, self.shard = dataset, shard
        self.epochs, self.batch_size, self.seed = epochs, batch_size, seed
        self._model = None
        self._initial: list[np.ndarray] | None = None
        # The learner thread fits while the main loop may save the final model: one user of the model at a time.
        self._lock = threading.Lock()

    def prepare(self) -> None:
        """Import TensorFlow and build the model now, before joining: seconds of work that would otherwise stall
        the peer's loop the first time it becomes controller."""
        with self._lock:
            if self._model is None:
                self._model = build_model(self.dataset, self.shard.num_classes if self.shard else 10, self.seed)
                self._initial = self._weights()

    def twin(self, shard: Shard) -> "Learner":
        """A learner for another peer hosted in this process (peer.host): its own shard, this learner's model and
        lock. One Keras model per process, not per peer (each would cost its memory and its own traced functions),
        and one learning job at a time in the process: its peers share its one or two cores anyway."""
        self.prepare()
        other = Learner(self.dataset, shard, self.epochs, self.batch_size, self.seed)
        other._model, other._initial, other._lock = self._model, self._initial, self._lock
        return other

    def sample_counts(self) -> tuple[int, int]:
        """(train, test) samples of this peer's shard: announced to the others, the most it may declare."""
        return (int(len(self.shard.y_train)), int(len(self.shard.y_test))) if self.shard else (0, 0)

    def _weights(self) -> list[np.ndarray]:
        return [np.asarray(w, np.float32) for w in self._model.get_weights()]

    def initial_weights(self) -> list[np.ndarray]:
        self.prepare()
        return [w.copy() for w in self._initial]

    def fit(self, weights: list[np.ndarray]) -> tuple[list[np.ndarray], int, float]:
        """Train the given global weights on this peer's shard: (new weights, samples, last training loss)."""
        self.prepare()
        with self._lock:
            self._model.set_weights(weights)
            history = self._model.fit(self.shard.x_train, self.shard.y_train, epochs=self.epochs,
                                      batch_size=self.batch_size, shuffle=True, verbose=0)
            return self._weights(), int(len(self.shard.y_train)), float(history.history["loss"][-1])

    def evaluate(self, weights: list[np.ndarray]) -> tuple[float, float, int]:
        """(accuracy, loss, samples) of the given weights on this peer's test shard."""
        self.prepare()
        with self._lock:
            self._model.set_weights(weights)
            loss, accuracy = self._model.evaluate(self.shard.x_test, self.shard.y_test, batch_size=256, verbose=0)
        return float(accuracy), float(loss), int(len(self.shard.y_test))

    def save(self, weights: list[np.ndarray], path: Path) -> None:
        self.prepare()
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._lock:
            self._model.set_weights(weights)
            self._model.save(path)
