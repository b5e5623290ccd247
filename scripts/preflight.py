"""Would a peer start here with these flags? Asked once by the launcher before it starts N peers, so that a typo in a
flag or a missing dataset is said once, in the peer's own words, instead of by N peers in N logs.

    python -m scripts.preflight [--shards N] [--load-data] [-- PEER_FLAGS...]      (FL_* variables count too)

Run by a Python that has the project's packages (the local peers' own; for containers, the peer image, with this
file mounted: `python /app/preflight.py ...`), never imported by the launcher, which is standard library only. It
needs nothing of scripts/.

Prints one JSON object on stdout: the settings the launcher needs (`dataset`, `max_rounds`, `topic_prefix`,
`run_id`, and `env_names`, the FL_* variables a peer reads) and, with --load-data, what peer-1's shard (0 of N) holds (`data`: source, train and test samples); or
`{"error": ...}`, the reason as a peer would print it. Exit status: 0, 2 (the peer flags are refused), 3 (the dataset
cannot be loaded), 4 (the project's packages are missing).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

REFUSED, NO_DATA, NO_PACKAGES = 2, 3, 4
PACKAGES = {"numpy": "numpy", "paho": "paho-mqtt", "tensorflow": "tensorflow"}


def answer(status: int, **fields) -> int:
    print(json.dumps(fields), flush=True)
    return status


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, flags = argv[:split], argv[split + 1 :]
    parser = argparse.ArgumentParser(prog="python -m scripts.preflight", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=2, help="peers in the federation (default 2)")
    parser.add_argument("--load-data", action="store_true", help="also load peer-1's shard (0 of N)")
    args = parser.parse_args(own)
    missing = [name for module, name in PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        return answer(NO_PACKAGES, error=f"{sys.executable} cannot import {', '.join(missing)}")

    from peer.config import ENV_NAMES, SettingsError, build_parser, load_settings

    class Refusal(Exception):
        pass

    class Strict(type(build_parser())):  # type: ignore[misc]  # argparse's own class, raising instead of exiting
        def error(self, message):
            raise Refusal(message)

    strict = build_parser()
    strict.__class__ = Strict
    shards = max(2, args.shards)
    try:
        strict.parse_args(flags)
        settings = load_settings(
            [*flags, "--peer-id", "peer-1", "--shard", f"0/{shards}"], {**os.environ, "FL_MIN_PEERS": "2"}
        )
    except (Refusal, SettingsError) as err:
        return answer(REFUSED, error=f"peer flags: {err} (python -m peer --help lists them)")
    found = {
        "dataset": settings.dataset,
        "max_rounds": settings.max_rounds,
        "topic_prefix": settings.topic_prefix,
        "run_id": settings.run_id,
        "env_names": sorted(ENV_NAMES),  # the FL_* variables a peer reads
    }
    if not args.load_data:
        return answer(0, **found)

    from peer.learning.data import DatasetError, load_shard
    from peer.node.banners import without_tensorflow_banners

    try:
        with without_tensorflow_banners():  # (the Keras download path imports TensorFlow)
            shard = load_shard(settings.shard_spec)
    except DatasetError as err:
        return answer(NO_DATA, error=str(err))
    data = {
        "source": shard.source,
        "shard": settings.shard_label,
        "train": len(shard.y_train),
        "test": len(shard.y_test),
    }
    return answer(0, **found, data=data)


if __name__ == "__main__":
    sys.exit(main())
