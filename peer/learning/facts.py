"""What a peer must know of its model before it can take part: its fingerprint, its description and its initial
weights (seeded, equal on every peer). Building the model to learn them takes TensorFlow, seconds to import; so the
learning service that built a model once keeps its facts in the machine's cache, and a peer started later reads them
in milliseconds and joins the federation while TensorFlow is still loading in the service.

Cached only where the spec names the model for good: a built-in, or a model file (by its content); a `module:function`
spec can change without its name changing, so its facts are always built. The key holds the versions of TensorFlow
and Keras too: another version may initialise weights otherwise.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peer.learning.idx import cache_dir
from peer.learning.models import parse_spec
from peer.wire.weights import WeightCodec


@dataclass(frozen=True)
class ModelFacts:
    name: str  # the --model spec, checked
    fingerprint: str
    description: str  # e.g. "seed-cnn, 8 tensors, 1,199,882 parameters"
    initial: list[np.ndarray]  # the seeded initial weights

    @property
    def shapes(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(w.shape) for w in self.initial)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def facts_key(model: str, input_shape: tuple, num_classes: int, seed: int) -> str | None:
    """The cache key of a model's facts; None if they are not to be cached (a module:function spec)."""
    spec = parse_spec(model)
    if spec.builtin:
        what = spec.builtin
    elif spec.path is not None:
        try:
            what = f"{spec.path.name}:{spec.function}:{hashlib.sha256(spec.path.read_bytes()).hexdigest()}"
        except OSError:
            return None
    else:
        return None
    versions = [_version(p) for p in ("tensorflow", "tensorflow-cpu", "keras", "numpy")]
    text = json.dumps([what, list(input_shape), num_classes, seed, versions])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _paths(key: str) -> tuple[Path, Path] | None:
    folder = cache_dir()
    if folder is None:
        return None
    return folder / "models" / f"{key}.json", folder / "models" / f"{key}.weights"


def read_facts(key: str | None) -> ModelFacts | None:
    """The cached facts, or None (not cached, or unreadable: they are built again)."""
    paths = _paths(key) if key else None
    if paths is None:
        return None
    try:
        meta = json.loads(paths[0].read_text())
        data = paths[1].read_bytes()
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            return None
        return ModelFacts(meta["name"], meta["fingerprint"], meta["description"], WeightCodec.decode(data))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_facts(key: str | None, facts: ModelFacts) -> None:
    """Keep the facts for the next peer; a cache that cannot be written is no error."""
    paths = _paths(key) if key else None
    if paths is None:
        return
    try:
        paths[0].parent.mkdir(parents=True, exist_ok=True)
        data = WeightCodec.encode(facts.initial)
        for path, content in (
            (paths[1], data),
            (
                paths[0],
                json.dumps(
                    {
                        "name": facts.name,
                        "fingerprint": facts.fingerprint,
                        "description": facts.description,
                        "sha256": hashlib.sha256(data).hexdigest(),
                    }
                ).encode(),
            ),
        ):
            temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            temp.write_bytes(content)
            os.replace(temp, path)
    except OSError:
        pass
