"""Server optimizers (Reddi et al., "Adaptive Federated Optimization", ICLR 2021): the round's aggregate update is a
pseudo-gradient that a server optimizer applies to the global model. Pure functions and values: no I/O, no clock.

The round's aggregate (the FedAvg mean, or a robust rule's choice; `peer.learning.aggregation`) minus the global model
x_t the round started from is the pseudo-gradient Delta_t (the mean of the trainers' updates, for FedAvg). Then, with
server learning rate eta (`--server-lr`):

- `sgd`:      x_{t+1} = x_t + eta * Delta_t. With eta = 1 that is the aggregate itself: FedAvg, the default, and the
              model is then the aggregate bit for bit (no arithmetic is done at all).
- `momentum`: v_t = beta * v_{t-1} + Delta_t;  x_{t+1} = x_t + eta * v_t  (FedAvgM, Hsu et al. 2019; beta is
              `--server-momentum`).
- `adagrad`, `yogi`, `adam` (the paper's Algorithm 2, FedAdagrad / FedYogi / FedAdam; beta1, beta2, tau are
  `--beta1`, `--beta2`, `--tau`):
              m_t = beta1 * m_{t-1} + (1 - beta1) * Delta_t
              adagrad: v_t = v_{t-1} + Delta_t^2
              yogi:    v_t = v_{t-1} - (1 - beta2) * Delta_t^2 * sign(v_{t-1} - Delta_t^2)
              adam:    v_t = beta2 * v_{t-1} + (1 - beta2) * Delta_t^2
              x_{t+1} = x_t + eta * m_t / (sqrt(v_t) + tau)
              with m_{-1} = 0 and v_{-1} = tau^2 (the paper asks v_{-1} >= tau^2), and no bias correction (the
              paper has none).

The state (v for momentum; m and v for the adaptive ones; nothing for sgd) is an `OptimizerState`: its slots, one
tensor per model tensor, float32, and the step count. Arithmetic is float64 per tensor; the state and the new
weights are stored as float32. The controller keeps the state with the global model it belongs to, sends it to the
next controller (retained, see docs/PROTOCOL.md) and writes it in its checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np

OPTIMIZERS = ("sgd", "momentum", "adam", "yogi", "adagrad")  # what --server-optimizer accepts; the first is default
SLOTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {"sgd": (), "momentum": ("v",), "adam": ("m", "v"), "yogi": ("m", "v"), "adagrad": ("m", "v")}
)
# --server-lr when none is given: FedAvg's 1 for the plain and momentum steps; the adaptive ones step every coordinate
# by about eta, so they start from the paper's order of magnitude.
DEFAULT_LR: Mapping[str, float] = MappingProxyType(
    {"sgd": 1.0, "momentum": 1.0, "adam": 0.01, "yogi": 0.01, "adagrad": 0.01}
)


class OptimizerError(ValueError):
    """A state that does not fit this optimizer or this model; the message says why."""


@dataclass(frozen=True)
class OptimizerState:
    """What a server optimizer carries from round to round: `step` updates made so far, and per slot (`SLOTS`) one
    float32 tensor per model tensor."""

    optimizer: str
    step: int
    slots: tuple[tuple[np.ndarray, ...], ...] = ()

    def tensors(self) -> list[np.ndarray]:
        """Every slot's tensors, slot after slot: what travels and what the checkpoint holds."""
        return [t for slot in self.slots for t in slot]

    def norms(self) -> dict[str, float]:
        """Each slot's L2 norm over all its tensors (for the records: the moments a controller continues)."""
        names = SLOTS.get(self.optimizer, ())
        return {
            name: math.sqrt(math.fsum(float(np.square(t, dtype=np.float64).sum()) for t in slot))
            for name, slot in zip(names, self.slots)
        }


def _finite_number(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bounds = f"{'above' if low_open else 'at least'} {low:g}" + (f" and below {high:g}" if high is not None else "")
        raise ValueError(f"{name}: expected a finite number {bounds}, got {value!r}")


@dataclass(frozen=True)
class ServerOptimizer:
    """An optimizer by name and its hyperparameters; `apply` is pure. Invalid ones raise ValueError here."""

    name: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self):
        if self.name not in OPTIMIZERS:
            raise ValueError(f"server optimizer {self.name!r}: expected one of {', '.join(OPTIMIZERS)}")
        _finite_number("server lr", self.lr, 0.0, low_open=True)
        _finite_number("server momentum", self.momentum, 0.0, 1.0)
        _finite_number("beta1", self.beta1, 0.0, 1.0)
        _finite_number("beta2", self.beta2, 0.0, 1.0)
        _finite_number("tau", self.tau, 0.0, low_open=True)

    @property
    def slots(self) -> tuple[str, ...]:
        return SLOTS[self.name]

    @property
    def stateful(self) -> bool:
        """Whether it carries state from round to round (which must then survive a failover)."""
        return bool(self.slots)

    @property
    def is_fedavg(self) -> bool:
        """`sgd` at learning rate 1: the aggregate is the new model, untouched."""
        return self.name == "sgd" and self.lr == 1.0

    def describe(self) -> str:
        """E.g. `adam (lr 0.01, beta1 0.9, beta2 0.99, tau 0.001)`, for logs and titles."""
        if self.name == "sgd":
            return "sgd" if self.is_fedavg else f"sgd (lr {self.lr:g})"
        if self.name == "momentum":
            return f"momentum (lr {self.lr:g}, momentum {self.momentum:g})"
        betas = f"beta1 {self.beta1:g}" + (f", beta2 {self.beta2:g}" if self.name != "adagrad" else "")
        return f"{self.name} (lr {self.lr:g}, {betas}, tau {self.tau:g})"

    def initial(self, weights: Sequence[np.ndarray]) -> OptimizerState:
        """The state before the first update: zero moments, and tau^2 for the adaptive second moment."""
        shapes = [np.shape(w) for w in weights]
        slots = []
        for name in self.slots:
            fill = self.tau**2 if name == "v" and self.name != "momentum" else 0.0
            slots.append(tuple(np.full(shape, fill, dtype=np.float32) for shape in shapes))
        return OptimizerState(self.name, 0, tuple(slots))

    def restore(self, step: int, tensors: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> OptimizerState:
        """A state of this optimizer from its tensors as they travel; OptimizerError says why it does not fit."""
        return state_from_tensors(self.name, step, tensors, [tuple(np.shape(w)) for w in weights])

    def apply(
        self, weights: Sequence[np.ndarray], aggregate: Sequence[np.ndarray], state: OptimizerState | None = None
    ) -> tuple[list[np.ndarray], OptimizerState]:
        """(the new global model, the new state) from the global model x_t the round started from and the round's
        aggregate (Delta_t = aggregate - x_t). `state` None: the initial one."""
        state = self.initial(weights) if state is None else state
        if state.optimizer != self.name or len(state.slots) != len(self.slots):
            raise OptimizerError(f"a {state.optimizer} state cannot drive the {self.name} optimizer")
        if self.is_fedavg:
            return [np.asarray(a, dtype=np.float32) for a in aggregate], OptimizerState(self.name, state.step + 1)
        new_weights: list[np.ndarray] = []
        new_slots: list[list[np.ndarray]] = [[] for _ in self.slots]
        for index, (x32, a32) in enumerate(zip(weights, aggregate)):
            x = np.asarray(x32, dtype=np.float64)
            delta = np.asarray(a32, dtype=np.float64) - x
            old = [np.asarray(slot[index], dtype=np.float64) for slot in state.slots]
            step, kept = self._step(delta, old)
            new_weights.append((x + self.lr * step).astype(np.float32))
            for slot, value in zip(new_slots, kept):
                slot.append(value.astype(np.float32))
        return new_weights, OptimizerState(self.name, state.step + 1, tuple(tuple(s) for s in new_slots))

    def _step(self, delta: np.ndarray, old: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(the step to scale by eta, the new slots) of one tensor."""
        if self.name == "sgd":
            return delta, []
        if self.name == "momentum":
            v = self.momentum * old[0] + delta
            return v, [v]
        m_old, v_old = old
        m = self.beta1 * m_old + (1.0 - self.beta1) * delta
        square = np.square(delta)
        if self.name == "adagrad":
            v = v_old + square
        elif self.name == "yogi":
            v = v_old - (1.0 - self.beta2) * square * np.sign(v_old - square)
        else:  # adam
            v = self.beta2 * v_old + (1.0 - self.beta2) * square
        return m / (np.sqrt(v) + self.tau), [m, v]


def state_from_tensors(
    optimizer: str, step: int, tensors: Sequence[np.ndarray], shapes: Sequence[tuple[int, ...]]
) -> OptimizerState:
    """The state of `optimizer` from its tensors as they travel (`OptimizerState.tensors`), checked against the
    model's tensor shapes; OptimizerError says why it does not fit."""
    if optimizer not in SLOTS:
        raise OptimizerError(f"unknown server optimizer {optimizer!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise OptimizerError(f"step {step!r} is not a whole number >= 0")
    names, shapes = SLOTS[optimizer], [tuple(s) for s in shapes]
    if len(tensors) != len(names) * len(shapes):
        raise OptimizerError(
            f"{len(tensors)} tensors, not {len(names)} slots x {len(shapes)} model tensors for {optimizer}"
        )
    slots = []
    for index in range(len(names)):
        slot = tuple(np.asarray(t, dtype=np.float32) for t in tensors[index * len(shapes) : (index + 1) * len(shapes)])
        if [t.shape for t in slot] != shapes:
            raise OptimizerError("its tensors do not have the model's shapes")
        if not all(np.isfinite(t).all() for t in slot):
            raise OptimizerError("its tensors hold NaN or infinite values")
        slots.append(slot)
    return OptimizerState(optimizer, step, tuple(slots))
