"""FedProx's proximal term on a tiny Keras model: one SGD step on (loss + mu/2 ||w - w_global||^2) moves the weights
by exactly -lr * mu * (w - w_global) more than the step on the loss alone, whatever the model's compiled optimizer
would do with that gradient and whether the model has a train step of its own; and the learner anchors it at the
global model of each fit."""

from __future__ import annotations

import numpy as np

from peer.learning.data import Shard
from peer.learning.learner import Learner
from peer.learning.models import keras_module
from peer.learning.proximal import ProximalTerm

K = keras_module  # Keras set up as the learners set it up (TensorFlow's threads are configured before its first use)

LR = 0.1


def tiny_model(optimizer=None):
    K().utils.set_random_seed(0)
    model = K().Sequential([K().Input((3,)), K().layers.Dense(2), K().layers.BatchNormalization()])
    model.compile(optimizer=optimizer or K().optimizers.SGD(learning_rate=LR), loss="mse")
    return model


def one_step(model, start, x, y):
    model.set_weights(start)
    model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return [np.asarray(w, np.float64) for w in model.get_weights()]


def test_the_proximal_gradient_is_mu_times_w_minus_w_global():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    model = tiny_model()
    start = [w + rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()]
    anchor = [w + rng.normal(0, 0.5, w.shape).astype("float32") for w in start]
    plain = one_step(model, start, x, y)  # before the term is installed: Keras's own step

    installed: dict = {}
    term = ProximalTerm.of(model, installed)
    assert ProximalTerm.of(model, installed) is term  # installed once
    for mu in (0.0, 0.5, 2.0):
        term.anchor(anchor, mu)
        proximal = one_step(model, start, x, y)
        trainable = {id(w) for w in model.trainable_weights}
        for index, variable in enumerate(model.weights):
            if id(variable) in trainable:  # kernel, bias, gamma, beta: the extra step is -lr * mu * (w - w_global)
                extra = -LR * mu * (start[index].astype(np.float64) - anchor[index])
                np.testing.assert_allclose(proximal[index] - plain[index], extra, rtol=1e-4, atol=1e-6)
            else:  # the batch norm's moving statistics are no trainable weights: the term leaves them alone
                np.testing.assert_allclose(proximal[index], plain[index], rtol=1e-6)
    assert len(model.weights) > len(model.trainable_weights)


def custom_step_model(pass_variables: bool):
    """A user's model with its own train step, as Keras's guide writes one: it calls the optimizer's `apply` itself
    (with the variables, or without them on an optimizer built already)."""
    import tensorflow as tf

    keras = K()

    class OwnStep(keras.Model):
        def train_step(self, data):
            x, y = data
            with tf.GradientTape() as tape:
                loss = self.compute_loss(y=y, y_pred=self(x, training=True))
            grads = tape.gradient(loss, self.trainable_variables)
            if pass_variables:
                self.optimizer.apply(grads, self.trainable_variables)
            else:
                self.optimizer.apply(grads)
            return {"loss": loss}

    keras.utils.set_random_seed(0)
    inputs = keras.Input((3,))
    model = OwnStep(inputs, keras.layers.Dense(2)(keras.layers.Dense(4)(inputs)))
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=LR), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def test_a_model_with_its_own_train_step_gets_the_proximal_gradient_too():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(8, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32")
    for pass_variables in (True, False):
        model = custom_step_model(pass_variables)
        start = [w + rng.normal(0, 0.5, w.shape).astype("float32") for w in model.get_weights()]
        anchor = [w + rng.normal(0, 0.5, w.shape).astype("float32") for w in start]
        plain = one_step(model, start, x, y)
        ProximalTerm.of(model, {}).anchor(anchor, 0.7)
        proximal = one_step(model, start, x, y)
        for index in range(len(start)):  # every weight is trainable here
            extra = -LR * 0.7 * (start[index].astype(np.float64) - anchor[index])
            np.testing.assert_allclose(proximal[index] - plain[index], extra, rtol=1e-4, atol=1e-6)


def test_with_adam_the_optimizer_sees_the_proximal_gradient():
    # Adam's first step is lr * sign(g) (up to epsilon): a proximal term larger than the loss's gradient flips it.
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(4, 3)).astype("float32"), np.zeros((4, 2), "float32")
    model = tiny_model(K().optimizers.Adam(learning_rate=0.01))
    start = model.get_weights()
    anchor = [w - 100.0 for w in start]  # w - w_global = +100: the proximal gradient dominates
    term = ProximalTerm.of(model, {})
    term.anchor(anchor, 1.0)
    after = one_step(model, start, x, y)
    kernel = model.weights.index(model.trainable_weights[0])
    np.testing.assert_allclose(after[kernel] - start[kernel], -0.01, rtol=1e-3)


def test_the_learner_anchors_at_each_fits_global_model_and_leaves_mu_0_untouched():
    rng = np.random.default_rng(2)
    shard = Shard(
        "mnist",
        rng.random((16, 28, 28, 1), dtype=np.float32),
        np.arange(16) % 10,
        rng.random((8, 28, 28, 1), dtype=np.float32),
        np.arange(8) % 10,
        10,
        "test",
    )
    plain = Learner("mnist", shard, epochs=3, batch_size=4, seed=1, model="cnn-small")
    start = plain.initial_weights()
    K().utils.set_random_seed(5)
    free, _, _ = plain.fit(start)
    assert plain._proximal == {}  # nothing installed at mu 0
    pulled = Learner("mnist", shard, epochs=3, batch_size=4, seed=1, model="cnn-small")
    pulled.proximal_mu = 5.0
    K().utils.set_random_seed(5)
    held, _, _ = pulled.fit(start)
    distance = lambda ws: np.sqrt(sum(float(np.square(w - s).sum()) for w, s in zip(ws, start)))  # noqa: E731
    assert 0 < distance(held) < distance(free)  # the term pulls the local model toward the global one
