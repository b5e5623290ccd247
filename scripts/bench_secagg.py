"""Secure aggregation benchmark: the bytes and seconds its masking and unmasking add to a round, pure, in one process.

    python -m scripts.bench_secagg [--trainers 5,20,50] [--params 56714,1663370] [--dropped 0,1] [--json OUT]

For each count of trainers n, model size L (parameters; 56,714 is cnn-small, 1,663,370 fedavg-cnn) and count of
trainers that drop out after sharing their keys (before their masked vector), one round attempt runs through
`peer.learning.secagg` exactly as the peers would run it, every party in this one process, one after another:
each trainer makes its keys, shares, decrypts the shares sent to it, quantizes a random update and masks it; the
controller unmasks the survivors' sum, which is checked against the exact sum (a wrong sum stops the bench).

Seconds (wall clock, `time.perf_counter`, on whatever else the machine is doing):
- `trainer s`: one trainer's work, the mean over the n trainers (keys, shares out, shares in, quantize, mask,
  reveal); trainers work in parallel on their own machines, so this is what a round waits for;
- `controller s`: rebuilding the seeds and the dropped trainers' keys, removing their masks, and decoding the mean;
- `fedavg s`: what the controller does without secure aggregation, `Aggregator("fedavg").aggregate` of the same
  updates as float32 solutions (admission, norms, clipping, the mean): the comparison.

Bytes are the protocol's payloads (the values: keys, ciphertexts, masked vectors, shares; not the JSON, envelopes
or MQTT headers around them, which docs/PROTOCOL.md gives):
- `up B/trainer`: what one trainer publishes: 96 bytes of keys, 80 per other roster member of encrypted shares,
  4 L of masked vector, 32 per share it reveals;
- `delivered B`: what the broker hands out for the round's secure-aggregation messages: each trainer's shares go to
  the n - 1 other trainers and the controller, keys, masked vectors and reveals to the controller, the roster
  (128 bytes a member) to every trainer (in a federation of more peers than the trainers and the controller, every
  other peer also receives every trainer's shares and the roster: n(n - 1) * 80 + 128 n bytes more each); `plain B`: the n float32 solutions of the same round without it (4 L each);
  the aggregation that follows is the same size either way and left out of both.

A benchmark, not a test: it prints figures and asserts nothing about their size.
"""

from __future__ import annotations

import argparse
import json
import secrets
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from peer.learning.aggregation import Aggregator
from peer.learning.secagg import crypto
from peer.learning.secagg.masking import CIPHERTEXT_BYTES, Roster, Trainer, Unmasker, minimum_threshold
from peer.learning.secagg.quantize import Quantizer, weight_of
from peer.learning.secagg.shamir import SHARE_BYTES

MODEL_NAMES = {56_714: "cnn-small", 1_663_370: "fedavg-cnn"}
KEYS_BYTES = 3 * crypto.KEY_BYTES  # share key, mask key, seed commitment
ROSTER_ROW_BYTES = 4 * crypto.KEY_BYTES  # a peer id (counted as 32) and its three values


@dataclass(frozen=True)
class Figures:
    trainers: int
    params: int
    dropped: int
    threshold: int
    trainer_s: float
    controller_s: float
    fedavg_s: float
    up_bytes_per_trainer: int
    delivered_bytes: int
    plain_bytes: int
    max_error: float
    error_bound: float


def payload_bytes(n: int, params: int, dropped: int) -> tuple[int, int, int]:
    """(bytes one surviving trainer publishes, bytes the broker delivers for the round's secure aggregation, bytes of
    the plain round's solutions)."""
    survivors = n - dropped
    shares = (n - 1) * CIPHERTEXT_BYTES
    masked = 4 * params
    reveal = n * SHARE_BYTES  # a share of each masker: the survivors' seeds, the dropped trainers' keys
    up = KEYS_BYTES + shares + masked + reveal
    delivered = (
        n * KEYS_BYTES  # keys to the controller
        + n * n * ROSTER_ROW_BYTES  # the roster to every trainer
        + n * shares * n  # each trainer's shares to the n - 1 others and the controller
        + survivors * masked  # masked vectors to the controller
        + survivors * reveal  # reveals to the controller
    )
    return up, delivered, n * 4 * params


def run_once(n: int, params: int, dropped: int, seed: int = 0) -> Figures:
    context = f"bench|1|1|{n}x{params}x{dropped}".encode()
    rng = np.random.default_rng(seed)
    peers = [f"peer-{i:03d}" for i in range(1, n + 1)]
    samples = {p: int(rng.integers(500, 1500)) for p in peers}
    bound = sum(samples.values())
    updates = {p: rng.normal(0.0, 0.01, params) for p in peers}
    quantizer = Quantizer()
    threshold = minimum_threshold(n)
    if n - dropped < threshold:
        raise SystemExit(f"bench_secagg: {dropped} dropped of {n} leaves fewer than the threshold {threshold}")
    spent = dict.fromkeys(peers, 0.0)

    def timed(peer, work, *args):
        start = time.perf_counter()
        result = work(*args)
        spent[peer] += time.perf_counter() - start
        return result

    trainers = {p: timed(p, Trainer, p, context, secrets.token_bytes) for p in peers}
    roster = Roster.of(context, threshold, [t.advertisement for t in trainers.values()])
    sent = {p: timed(p, trainers[p].share, roster) for p in peers}
    for sender, ciphertexts in sent.items():
        for recipient, ciphertext in ciphertexts.items():
            timed(recipient, trainers[recipient].receive, sender, ciphertext)
    survivors = peers[dropped:]
    unmasker = Unmasker(roster, tuple(peers), params)
    for p in survivors:
        encoded = timed(p, quantizer.encode, updates[p], weight_of(samples[p], bound))
        unmasker.offer_masked(p, timed(p, trainers[p].mask, encoded, peers))
    request = unmasker.close()
    for p in survivors:
        unmasker.offer_reveal(p, timed(p, trainers[p].reveal, request))

    start = time.perf_counter()
    result = unmasker.total()
    weight = sum(samples[p] for p in survivors) / bound
    mean = quantizer.decode(result.total, weight)
    controller_s = time.perf_counter() - start

    exact = sum(updates[p] * (samples[p] / bound) for p in survivors) / weight
    max_error = float(np.abs(mean - exact).max())
    error_bound = quantizer.error_bound(len(survivors), weight)
    if not max_error <= error_bound * (1 + 1e-9):
        raise SystemExit(
            f"bench_secagg: the unmasked mean is off by {max_error:.3g}, above the bound {error_bound:.3g}"
        )

    origin = [np.zeros(params, np.float32)]
    solutions = [(p, [updates[p].astype(np.float32)], samples[p]) for p in survivors]
    start = time.perf_counter()
    Aggregator("fedavg").aggregate(origin, solutions)
    fedavg_s = time.perf_counter() - start

    up, delivered, plain = payload_bytes(n, params, dropped)
    return Figures(
        n,
        params,
        dropped,
        threshold,
        statistics.fmean(spent[p] for p in survivors),
        controller_s,
        fedavg_s,
        up,
        delivered,
        plain,
        max_error,
        error_bound,
    )


COLUMNS = (
    "trainers",
    "model",
    "dropped",
    "t",
    "trainer s",
    "controller s",
    "fedavg s",
    "up B/trainer",
    "delivered B",
    "plain B",
    "max error",
)


def row(f: Figures) -> tuple[str, ...]:
    return (
        str(f.trainers),
        f"{MODEL_NAMES.get(f.params, 'model')} ({f.params:,})",
        str(f.dropped),
        str(f.threshold),
        f"{f.trainer_s:.3f}",
        f"{f.controller_s:.3f}",
        f"{f.fedavg_s:.3f}",
        f"{f.up_bytes_per_trainer:,}",
        f"{f.delivered_bytes:,}",
        f"{f.plain_bytes:,}",
        f"{f.max_error:.1e}",
    )


def format_table(figures: list[Figures]) -> str:
    rows = [COLUMNS, *(row(f) for f in figures)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(r, widths)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _counts(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers >= 0 separated by commas, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.bench_secagg", description=__doc__.split("\n\n")[0])
    parser.add_argument("--trainers", type=_counts, default=[5, 20, 50], help="trainer counts (default 5,20,50)")
    parser.add_argument("--params", type=_counts, default=[56_714, 1_663_370], help="model sizes in parameters")
    parser.add_argument("--dropped", type=_counts, default=[0, 1], help="trainers that drop before masking")
    parser.add_argument("--json", metavar="OUT", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if any(n < 2 for n in args.trainers):
        parser.error("--trainers: secure aggregation needs at least 2 trainers")
    figures = []
    for params in args.params:
        for n in args.trainers:
            for dropped in args.dropped:
                figures.append(run_once(n, params, dropped))
                print(format_table(figures[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(format_table(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([asdict(f) for f in figures], out, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
