"""The one formula of the global metric, standard library only: the pure round logic (`peer.roles.rounds`) computes it
live, and the run-dir reader (`peer.records.run_dir`, which must run on a bare host Python) rebuilds it from records."""

from __future__ import annotations

from collections.abc import Iterable


def weighted_mean(values: Iterable[tuple[float, int]]) -> float | None:
    """Mean of the values weighted by their counts (pairs with a count <= 0 are left out); None when there is
    nothing to weigh. The global accuracy and loss of a round are this mean of the peers' evaluations."""
    pairs = [(v, n) for v, n in values if n > 0]
    total = sum(n for _, n in pairs)
    return sum(v * n for v, n in pairs) / total if total else None
