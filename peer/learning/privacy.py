"""Client-level differential privacy (DP-FedAvg, McMahan et al., "Learning Differentially Private Recurrent Language
Models", ICLR 2018): clipping, Gaussian noise, the ledger of who was released how often, and the accountant. Pure:
no I/O, no clock; randomness comes from the `numpy.random.Generator` the caller passes in.

Two variants (`--dp-clip C`, `--dp-noise-multiplier Z`; docs/SECURITY.md says whom each trusts):

- central (the default): each trainer's update (its solution minus the global model) is clipped to L2 norm C (by the
  trainer, and again by the controller, which trusts no trainer to have done it); the controller sums the clipped
  updates of the round, adds N(0, (Z*C)^2) to every coordinate of the sum, and divides by the number of trainers the
  round's order chose (fixed before any update is seen, as the paper's fixed-denominator estimator). The controller
  sees the unnoised updates.
- local (`--dp-local`): each trainer clips its update to C and adds N(0, (Z*C)^2) to every coordinate before it
  sends it; nobody sees an unnoised update. The controller averages what comes as usual.

Accounting. Either way, each time a peer's clipped update is released (in the round's noised sum, or as its own
noised solution) that peer's data went through a Gaussian mechanism of L2 sensitivity C and noise multiplier Z. The
training order names every round's trainers to every peer, so the amplification by sampling the paper counts on (the
adversary must not know who was sampled) does not hold here: the accountant composes, for the peer released most
often, one Gaussian mechanism per release, with Google's `dp-accounting` (RDP or PLD), and reports epsilon at
`--dp-delta`. The `Ledger` counts releases per peer; rounds whose releases are unknown (a lost ledger) count against
every peer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np

ACCOUNTANTS = ("rdp", "pld")  # what --dp-accountant accepts; the first is the default
DEFAULT_DELTA = 1e-5
# The PLD accountant's value discretization: its estimate is pessimistic (an upper bound) at any interval; 0.01 is
# within 1e-4 of the library's default 1e-4 for these compositions and 200x faster (0.2 s, not 40 s, for 500
# releases), which matters in a controller's event loop.
PLD_DISCRETIZATION = 1e-2
INSTALL_HINT = "pip install dp-accounting (pinned in requirements.txt)"


# --- clipping and noise -----------------------------------------------------------------------------------------------


def l2_norm(tensors: Iterable[np.ndarray]) -> float:
    """The L2 norm over all the tensors' values, in float64."""
    return math.sqrt(math.fsum(float(np.square(np.asarray(t, dtype=np.float64)).sum()) for t in tensors))


def update_of(origin: Sequence[np.ndarray], weights: Sequence[np.ndarray]) -> list[np.ndarray]:
    """weights - origin, tensor by tensor, in float64."""
    return [np.asarray(w, dtype=np.float64) - np.asarray(o, dtype=np.float64) for o, w in zip(origin, weights)]


def clip(update: Sequence[np.ndarray], bound: float) -> tuple[list[np.ndarray], float]:
    """(the update scaled down to L2 norm `bound` if it is longer, direction kept; its norm before). An update within
    the bound comes back unchanged."""
    norm = l2_norm(update)
    if norm <= bound or norm == 0.0:
        return [np.asarray(u, dtype=np.float64) for u in update], norm
    scale = bound / norm
    return [np.asarray(u, dtype=np.float64) * scale for u in update], norm


def gaussian_noise(shapes: Sequence[tuple[int, ...]], std: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Independent N(0, std^2) values in the given shapes, float64."""
    return [rng.normal(0.0, std, size=shape) for shape in shapes]


def privatize_solution(
    origin: Sequence[np.ndarray],
    weights: Sequence[np.ndarray],
    clip_norm: float,
    noise_std: float = 0.0,
    rng: np.random.Generator | None = None,
) -> tuple[list[np.ndarray], float]:
    """A trainer's solution as it may leave: origin + clip(weights - origin, C) (+ N(0, noise_std^2) per coordinate
    when `noise_std` > 0, the local variant), float32; and the update's norm before clipping."""
    clipped, norm = clip(update_of(origin, weights), clip_norm)
    if noise_std > 0:
        if rng is None:
            raise ValueError("local noise needs a random generator")
        clipped = [u + n for u, n in zip(clipped, gaussian_noise([u.shape for u in clipped], noise_std, rng))]
    out = [(np.asarray(o, dtype=np.float64) + u).astype(np.float32) for o, u in zip(origin, clipped)]
    return out, norm


def noised_mean(
    origin: Sequence[np.ndarray],
    clipped_sum: Sequence[np.ndarray],
    denominator: int,
    noise_std: float,
    rng: np.random.Generator,
) -> list[np.ndarray]:
    """The central variant's aggregate: origin + (sum of clipped updates + N(0, noise_std^2)) / denominator, float32."""
    if denominator < 1:
        raise ValueError(f"the denominator must be at least 1, got {denominator}")
    noise = gaussian_noise([np.shape(s) for s in clipped_sum], noise_std, rng)
    return [
        (np.asarray(o, dtype=np.float64) + (np.asarray(s, dtype=np.float64) + n) / denominator).astype(np.float32)
        for o, s, n in zip(origin, clipped_sum, noise)
    ]


# --- the ledger -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ledger:
    """How often each peer's clipped update was released; `unattributed`: releases that may have been anyone's (the
    rounds of a ledger that was lost), counted against every peer."""

    counts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    unattributed: int = 0

    def released(self, peers: Iterable[str]) -> Ledger:
        counts = dict(self.counts)
        for peer in peers:
            counts[peer] = counts.get(peer, 0) + 1
        return Ledger(MappingProxyType(counts), self.unattributed)

    @property
    def most(self) -> int:
        """The releases of the peer released most often: what the accountant composes."""
        return self.unattributed + max(self.counts.values(), default=0)


# --- the settings and the accountant ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Privacy:
    """The DP settings of a run. `clip` None: no DP at all (then nothing here is used)."""

    clip: float | None = None
    noise_multiplier: float = 0.0
    local: bool = False
    delta: float = DEFAULT_DELTA
    target_epsilon: float | None = None
    accountant: str = "rdp"

    def __post_init__(self):
        if self.clip is not None and not (math.isfinite(self.clip) and self.clip > 0):
            raise ValueError(f"dp clip: expected a finite number above 0, got {self.clip!r}")
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier >= 0):
            raise ValueError(f"dp noise multiplier: expected a finite number >= 0, got {self.noise_multiplier!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp delta: expected a number between 0 and 1, got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"dp accountant {self.accountant!r}: expected one of {', '.join(ACCOUNTANTS)}")

    @property
    def on(self) -> bool:
        return self.clip is not None

    @property
    def central(self) -> bool:
        return self.on and not self.local

    @property
    def noise_std(self) -> float:
        """The standard deviation of the Gaussian noise per coordinate: Z * C."""
        return self.noise_multiplier * (self.clip or 0.0)

    def describe(self) -> str:
        """E.g. `central DP (C 1, z 1.1, delta 1e-05)`, for logs and titles; `` without DP."""
        if not self.on:
            return ""
        where = "local" if self.local else "central"
        return f"{where} DP (C {self.clip:g}, z {self.noise_multiplier:g}, delta {self.delta:g})"


def epsilon(noise_multiplier: float, releases: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` of `releases` compositions of the Gaussian mechanism with this noise multiplier, by Google's
    dp-accounting (`rdp`: RdpAccountant; `pld`: PLDAccountant at PLD_DISCRETIZATION). 0 for no release; infinity
    for no noise."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    import dp_accounting  # imported here: only a run with DP needs it (and scipy behind it)

    event = dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(noise_multiplier), releases)
    if accountant == "pld":
        from dp_accounting.pld import pld_privacy_accountant

        ledger = pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)
    else:
        from dp_accounting.rdp import rdp_privacy_accountant

        ledger = rdp_privacy_accountant.RdpAccountant()
    ledger.compose(event)
    return float(ledger.get_epsilon(delta))


def accountant_available() -> bool:
    """Whether Google's dp-accounting can be imported here."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        return False
    return True
