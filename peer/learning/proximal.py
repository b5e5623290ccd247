"""FedProx's proximal term (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020) for any
compiled Keras model: a trainer minimises its loss plus (mu/2) * ||w - w_global||^2 over the trainable weights w.

The term is added where Keras takes a training step: the gradient of (mu/2) * ||w - w_global||^2 is
mu * (w - w_global), and `ProximalTerm` wraps the model's optimizer's `apply` (which `apply_gradients`, Keras's own
train step and the custom train steps of Keras's guides all go through) so that every gradient it receives gets
that added, evaluated at the same weights as the loss's gradient. So the step each optimizer takes is the one it
would take on the proximal objective, whatever the model (a built-in or a user's `--model`, with its own train step
or not) and whatever its compiled optimizer (SGD, Adam, ...): no train step of ours, no change to the model's
weights or its saved file. `mu` and w_global live in Keras variables outside the model, so a new round (or a
peer with another mu) only assigns them: the traced training function is made once. With a mixed-precision
(loss-scaling) optimizer the term is scaled like the loss, as the gradients it is added to are.

The loss Keras reports is the model's loss, without the term (the federation's records compare trainers' losses).
TensorFlow/Keras are imported lazily, as in `peer.learning.learner`.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ProximalTerm:
    """The proximal term of one Keras model: installed once (on the first fit with mu > 0), then re-anchored for
    every fit."""

    def __init__(self, model: Any):
        from peer.learning.models import keras_module

        keras = keras_module()
        self.model = model
        self.weights = list(model.trainable_weights)
        self.mu = keras.Variable(0.0, dtype="float32", trainable=False, name="proximal_mu")
        self.anchors = [
            keras.Variable(np.zeros(tuple(w.shape), dtype="float32"), trainable=False, name="proximal_anchor")
            for w in self.weights
        ]
        anchor_of = {id(w): a for w, a in zip(self.weights, self.anchors)}
        optimizer = model.optimizer
        original = optimizer.apply
        ops = keras.ops

        def apply(grads, trainable_variables=None):
            # mu * (w - w_global), scaled as a loss-scaling optimizer scales the loss and so the gradients. Without
            # variables, the gradients are those of the variables the optimizer was built with, in its order.
            variables = (
                getattr(optimizer, "_trainable_variables", [])
                if trainable_variables is None
                else list(trainable_variables)
            )
            scaled_mu = optimizer.scale_loss(self.mu)
            grads = list(grads)
            for index, (grad, var) in enumerate(zip(grads, variables)):
                anchor = anchor_of.get(id(var))
                if grad is not None and anchor is not None:
                    grads[index] = grad + ops.cast(scaled_mu * (var - anchor), grad.dtype)
            return original(grads, trainable_variables)

        optimizer.apply = apply
        # A training function traced before (a warm-up fit) called the unwrapped optimizer: trace it again.
        model.train_function = None

    @classmethod
    def of(cls, model: Any, installed: dict) -> ProximalTerm:
        """The model's term, installed now if it has none yet (`installed`: id(model) -> its term, kept by the
        caller for as long as the model)."""
        term = installed.get(id(model))
        if term is None or term.model is not model:
            term = installed[id(model)] = cls(model)
        return term

    def anchor(self, weights: list[np.ndarray], mu: float) -> None:
        """The next fit minimises its loss plus (mu/2) * ||w - w_global||^2, w_global the trainable weights among
        `weights` (a full `model.get_weights()` list)."""
        self.mu.assign(float(mu))
        trainable = _trainable_of(self.model, weights)
        for variable, value in zip(self.anchors, trainable):
            variable.assign(np.asarray(value, dtype="float32"))


def _trainable_of(model: Any, weights: list[np.ndarray]) -> list[np.ndarray]:
    """The values among `weights` (in `model.weights` order, as get_weights gives them) of the model's trainable
    weights, in `model.trainable_weights` order."""
    position = {id(w): index for index, w in enumerate(model.weights)}
    return [weights[position[id(w)]] for w in model.trainable_weights]
