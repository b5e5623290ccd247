"""How a run trained, in a few words: for graph titles, the comparison plot and the live page. Standard library only (the
live page's process does not import matplotlib)."""

from __future__ import annotations

from collections.abc import Mapping

# The settings (run.json) an aggregation's plan carries (peer.roles.controller.RoundRules.plan), by the same names.
PLAN_KEYS = (
    "aggregation",
    "server_optimizer",
    "server_lr",
    "server_momentum",
    "beta1",
    "beta2",
    "tau",
    "proximal_mu",
    "dp_clip",
    "dp_noise_multiplier",
    "dp_local",
    "dp_delta",
    "dp_accountant",
    "dp_target_epsilon",
)


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def strategy_label(settings: Mapping, epsilon: float | None = None) -> str:
    """How a run trained, in a few words, from its settings (run.json's, or an aggregation's plan, which names them
    alike): e.g. `FedAvg`, `FedProx mu 0.01`, `FedAdam lr 0.01`, `median + FedAvgM lr 1 m 0.9`, `DP-FedAvg (central
    DP C 1 z 1.1, eps 3.2 at delta 1e-05)`."""
    aggregation = str(settings.get("aggregation") or "fedavg")
    optimizer = str(settings.get("server_optimizer") or "sgd")
    lr = _number(settings.get("server_lr"))
    mu = _number(settings.get("proximal_mu")) or 0.0
    clip = _number(settings.get("dp_clip"))
    label = "FedAvg" if aggregation == "fedavg" else aggregation
    if mu:
        label = f"FedProx mu {mu:g}" if label == "FedAvg" else f"{label} + FedProx mu {mu:g}"
    server = ""
    if optimizer == "momentum":
        server = f"FedAvgM lr {lr or 0:g} m {_number(settings.get('server_momentum')) or 0:g}"
    elif optimizer != "sgd":
        server = f"Fed{optimizer.capitalize()} lr {lr or 0:g}"
    elif lr is not None and lr != 1.0:
        server = f"server lr {lr:g}"
    if server:
        label = server if label == "FedAvg" and optimizer != "sgd" else f"{label} + {server}"
    if clip is not None:
        label = "DP-FedAvg" if label == "FedAvg" else label
        where = "local" if settings.get("dp_local") else "central"
        privacy = f"{where} DP C {clip:g} z {_number(settings.get('dp_noise_multiplier')) or 0:g}"
        if epsilon is not None:
            privacy += f", eps {epsilon:.3g} at delta {_number(settings.get('dp_delta')) or 0:g}"
        label += f" ({privacy})"
    return label


def plan_of(settings: Mapping) -> dict:
    """The plan entries of a run's settings (run.json), those that are set."""
    return {key: settings[key] for key in PLAN_KEYS if settings.get(key) is not None}
