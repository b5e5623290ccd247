"""The server optimizers against the formulas of Reddi et al. 2021 (Algorithm 2) and Hsu et al. 2019 (FedAvgM), on
hand-made updates: each formula is written out here coordinate by coordinate, in plain Python floats, and the
optimizer must agree to float32 precision over several rounds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peer.learning.server_optimizers import (
    DEFAULT_LR,
    OPTIMIZERS,
    OptimizerError,
    ServerOptimizer,
    state_from_tensors,
)

X0 = [np.array([[0.5, -1.0], [2.0, 0.0]], np.float32), np.array([0.25, -0.75, 1.5], np.float32)]
# The round's mean updates (pseudo-gradients) Delta_1..Delta_4, per coordinate of the flattened model.
DELTAS = [
    [0.1, -0.2, 0.05, 0.0, 0.3, -0.1, 0.02],
    [0.08, -0.1, -0.05, 0.01, 0.2, -0.3, 0.0],
    [-0.02, 0.05, 0.1, -0.01, 0.1, 0.1, -0.04],
    [0.05, 0.0, 0.02, 0.03, -0.2, 0.05, 0.01],
]


def flat(weights) -> list[float]:
    return [float(v) for t in weights for v in np.asarray(t, np.float64).ravel()]


def shaped(values: list[float]) -> list[np.ndarray]:
    return [np.array(values[:4], np.float64).reshape(2, 2), np.array(values[4:], np.float64)]


class ByHand:
    """The papers' recurrences, one coordinate at a time, in plain Python floats (float64)."""

    def __init__(self, name: str, lr: float, beta: float, beta1: float, beta2: float, tau: float, size: int):
        self.name, self.lr, self.beta, self.beta1, self.beta2, self.tau = name, lr, beta, beta1, beta2, tau
        self.m = [0.0] * size
        self.v = [tau * tau if name in ("adam", "yogi", "adagrad") else 0.0] * size

    def next(self, x: list[float], delta: list[float]) -> list[float]:
        """x_{t+1} from x_t and Delta_t."""
        out = []
        for i, d in enumerate(delta):
            if self.name == "sgd":
                step = d
            elif self.name == "momentum":
                self.v[i] = self.beta * self.v[i] + d  # v_t = beta v_{t-1} + Delta_t
                step = self.v[i]
            else:
                self.m[i] = self.beta1 * self.m[i] + (1 - self.beta1) * d
                if self.name == "adagrad":
                    self.v[i] = self.v[i] + d * d
                elif self.name == "yogi":
                    sign = math.copysign(1.0, self.v[i] - d * d) if self.v[i] != d * d else 0.0
                    self.v[i] = self.v[i] - (1 - self.beta2) * d * d * sign
                else:
                    self.v[i] = self.beta2 * self.v[i] + (1 - self.beta2) * d * d
                step = self.m[i] / (math.sqrt(self.v[i]) + self.tau)
            out.append(x[i] + self.lr * step)
        return out


@pytest.mark.parametrize("name", OPTIMIZERS)
@pytest.mark.parametrize("lr, tau", [(0.5, 1e-3), (0.05, 0.1), (1.0, 1e-3)])
def test_each_optimizer_follows_its_formula_round_after_round(name, lr, tau):
    optimizer = ServerOptimizer(name, lr=lr, momentum=0.8, beta1=0.85, beta2=0.95, tau=tau)
    hand = ByHand(name, lr, 0.8, 0.85, 0.95, tau, len(flat(X0)))
    weights, state = [w.copy() for w in X0], None
    for round_, delta in enumerate(DELTAS):
        # the round's aggregate: the model plus the mean update, as a FedAvg would hand it over (float32)
        aggregate = [(w.astype(np.float64) + d).astype(np.float32) for w, d in zip(weights, shaped(delta))]
        x = flat(weights)
        expected = hand.next(x, [a - b for a, b in zip(flat(aggregate), x)])
        weights, state = optimizer.apply(weights, aggregate, state)
        assert state.step == round_ + 1 and all(w.dtype == np.float32 for w in weights)
        np.testing.assert_allclose(flat(weights), expected, rtol=1e-6, atol=1e-7)
    if optimizer.stateful:
        names = optimizer.slots
        for slot_name, slot in zip(names, state.slots):
            values = hand.m if slot_name == "m" else hand.v
            np.testing.assert_allclose(flat(slot), values, rtol=1e-6, atol=1e-12)


def test_the_first_adam_step_by_the_numbers():
    # Delta = 0.1 everywhere; beta1 0.9, beta2 0.99, tau 1e-3, v_{-1} = tau^2:
    # m = 0.01, v = 0.99e-6 + 0.01 * 0.01 = 1.0099e-4, step = 0.01 / (sqrt(1.0099e-4) + 1e-3)
    optimizer = ServerOptimizer("adam", lr=0.01)
    weights, state = optimizer.apply([np.zeros(3, np.float32)], [np.full(3, 0.1, np.float32)])
    step = 0.01 / (math.sqrt(1.0099e-4) + 1e-3)
    np.testing.assert_allclose(weights[0], 0.01 * step, rtol=1e-5)
    m, v = state.slots
    np.testing.assert_allclose(m[0], 0.01, rtol=1e-5)
    np.testing.assert_allclose(v[0], 1.0099e-4, rtol=1e-5)


def test_fedavg_is_the_aggregate_bit_for_bit_and_keeps_no_state():
    optimizer = ServerOptimizer()
    assert optimizer.is_fedavg and not optimizer.stateful and optimizer.initial(X0).tensors() == []
    aggregate = [np.array([[0.1, 1e-30], [np.float32(1) / 3, -7.0]], np.float32), np.array([1, 2, 3], np.float32)]
    weights, state = optimizer.apply(X0, aggregate)
    assert all(np.array_equal(a, w) and a.tobytes() == w.tobytes() for a, w in zip(aggregate, weights))
    assert state.step == 1 and state.slots == ()
    assert not ServerOptimizer("sgd", lr=0.5).is_fedavg


def test_initial_state_zero_moments_and_tau_squared_second_moment():
    for name in ("adam", "yogi", "adagrad"):
        m, v = ServerOptimizer(name, tau=0.01).initial(X0).slots
        assert all(np.all(t == 0) for t in m) and all(np.allclose(t, 1e-4) for t in v)
    [velocity] = ServerOptimizer("momentum").initial(X0).slots
    assert all(np.all(t == 0) for t in velocity)


def test_yogi_lowers_its_second_moment_additively_where_adam_decays_it():
    # v well above Delta^2: Yogi takes (1 - beta2) * Delta^2 off, Adam multiplies by beta2
    yogi, adam = ServerOptimizer("yogi", tau=1.0), ServerOptimizer("adam", tau=1.0)
    start = [np.zeros(1, np.float32)]
    _, y = yogi.apply(start, [np.full(1, 0.1, np.float32)])
    _, a = adam.apply(start, [np.full(1, 0.1, np.float32)])
    np.testing.assert_allclose(y.slots[1][0], 1.0 - 0.01 * 0.01, rtol=1e-6)
    np.testing.assert_allclose(a.slots[1][0], 0.99 * 1.0 + 0.01 * 0.01, rtol=1e-6)


def test_a_state_travels_as_tensors_and_comes_back_checked():
    optimizer = ServerOptimizer("adam")
    weights, state = optimizer.apply(X0, [w + 0.1 for w in X0])
    tensors = state.tensors()
    assert len(tensors) == 2 * len(X0) and all(t.dtype == np.float32 for t in tensors)
    back = optimizer.restore(state.step, tensors, weights)
    assert back.step == 1 and all(np.array_equal(a, b) for a, b in zip(back.tensors(), tensors))
    assert set(state.norms()) == {"m", "v"} and state.norms()["m"] > 0
    with pytest.raises(OptimizerError, match="tensors"):
        optimizer.restore(1, tensors[:-1], weights)
    with pytest.raises(OptimizerError, match="shapes"):
        optimizer.restore(1, [np.zeros(5, np.float32)] + tensors[1:], weights)
    with pytest.raises(OptimizerError, match="NaN"):
        optimizer.restore(1, [np.full_like(tensors[0], np.nan)] + tensors[1:], weights)
    with pytest.raises(OptimizerError, match="step"):
        optimizer.restore(-1, tensors, weights)
    with pytest.raises(OptimizerError, match="unknown"):
        state_from_tensors("lion", 1, tensors, [w.shape for w in weights])
    with pytest.raises(OptimizerError, match="cannot drive"):
        ServerOptimizer("yogi").apply(weights, weights, state)


def test_bad_hyperparameters_are_refused_at_once():
    for bad in (
        dict(name="rmsprop"),
        dict(lr=0),
        dict(lr=float("nan")),
        dict(beta1=1.0),
        dict(beta2=-0.1),
        dict(tau=0),
        dict(momentum=1.5),
    ):
        with pytest.raises(ValueError):
            ServerOptimizer(**bad)
    assert DEFAULT_LR["sgd"] == 1.0 and ServerOptimizer("adam").describe().startswith("adam (lr")
