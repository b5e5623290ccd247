"""This peer's shard of a dataset: found on disk, partitioned, and only the shard's rows loaded.

Sources, in order: a folder of pre-split shards (`scripts/split_dataset.py` output, has manifest.json); a folder of
IDX files (`--data-dir`, or Debian's /usr/share/datasets/fashion-mnist, or the Keras cache's fashion-mnist folder);
the Keras download cache / download (mnist.npz, cifar10). A folder holding only the 10,000-image test files (t10k-*)
is split into train and test (80/20, seeded), so MNIST's test set alone can run a federation.

Also the one home of the dataset facts the settings and scripts/split_dataset.py share: names, shapes, class counts,
the IDX file names, how to get each dataset, the error for a missing one and the default seed (partition schemes:
peer.partition.SCHEMES).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peer.learning.idx import IdxError, load_idx
from peer.learning.partition import DEFAULT_ALPHA, PartitionError, class_histogram, partition, split_train_test

log = logging.getLogger(__name__)

# --- the datasets: what they are and where they come from (config and scripts/split_dataset.py use these) -------------

SHAPES = {"mnist": (28, 28, 1), "fashion-mnist": (28, 28, 1), "cifar10": (32, 32, 3)}
DATASETS = tuple(SHAPES)
NUM_CLASSES = {"mnist": 10, "fashion-mnist": 10, "cifar10": 10}
IDX_DATASETS = ("mnist", "fashion-mnist")  # published as IDX files, so they can be read (and pre-split) from a folder
DEFAULT_SEED = 42  # of the partition and of the test-only split; all peers must agree
TEST_ONLY_FRACTION = 0.2  # held out for test when a folder has only the t10k files

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# A pre-split folder (written by scripts/split_dataset.py): the manifest, and one .npz of these arrays per shard.
SPLIT_MANIFEST = "manifest.json"
SPLIT_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def split_shard_file(shard: int | str) -> str:
    return f"shard-{shard}.npz"


_LABELS = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST", "cifar10": "CIFAR-10"}
# (ways open to any reader of IDX files, the Keras download only the peer has)
_WAYS = {
    "mnist": (
        [
            f"put the four IDX files ({', '.join(name + '.gz' for name in IDX_NAMES.values())}) from the MNIST "
            "site in a folder and pass --data-dir FOLDER"
        ],
        "let Keras download it once (needs internet; cached as $KERAS_HOME/datasets/mnist.npz, default ~/.keras)",
    ),
    "fashion-mnist": (
        [
            "`sudo apt-get install dataset-fashion-mnist` (installs the IDX files in "
            f"{DEBIAN_FASHION_MNIST}, where the peer finds them without --data-dir)",
            "pass --data-dir with the four IDX files",
        ],
        "let Keras download it once (needs internet)",
    ),
    "cifar10": (
        [],
        "let Keras download it once (needs internet; cached in $KERAS_HOME/datasets/cifar-10-batches-py, "
        "default ~/.keras)",
    ),
}


def how_to_get(dataset: str, *, keras: bool = True) -> str:
    """How to get the dataset, in one sentence; `keras=False` for a reader of IDX folders only (split_dataset)."""
    folder_ways, download = _WAYS[dataset]
    ways = [*folder_ways, download] if keras or not folder_ways else folder_ways
    return f"{_LABELS[dataset]}: {', or '.join(ways)}."


def expected_idx_files() -> str:
    names = ", ".join(f"{name}[.gz]" for name in IDX_NAMES.values())
    return f"{names} (or only the two t10k-* files, whose samples are then split into train and test)"


def find_idx_files(folder: Path) -> dict[str, Path | None]:
    """Each of IDX_NAMES' files in the folder, compressed or not; None for a file that is not there."""
    found: dict[str, Path | None] = {}
    for key, name in IDX_NAMES.items():
        found[key] = next((folder / n for n in (name + ".gz", name) if (folder / n).is_file()), None)
    return found


@dataclass(frozen=True)
class ShardSpec:
    """Which shard of which dataset a peer holds: every peer computes every shard from these (`--seed` too)."""

    dataset: str
    data_dir: Path | None = None
    shard: int = 0
    num_shards: int = 1
    partition: str = "iid"
    alpha: float = DEFAULT_ALPHA
    seed: int = DEFAULT_SEED
    train_samples: int | None = None
    test_samples: int | None = None

    @property
    def label(self) -> str:
        return f"{self.shard}/{self.num_shards}"


class DatasetError(RuntimeError):
    """The dataset cannot be found or read; the message says how to get it."""


@dataclass
class Shard:
    dataset: str
    x_train: np.ndarray | None  # float32 in [0, 1], (n, H, W, C); None when only the labels were loaded
    y_train: np.ndarray  # int64 labels
    x_test: np.ndarray | None
    y_test: np.ndarray
    num_classes: int
    source: str
    # The most (train, test) samples any shard of this partition holds, caps applied: what every peer computes from
    # the run's data settings, and the most any peer may claim. None for a pre-split folder (its shards are files).
    largest: tuple[int, int] | None = None

    def describe(self, spec: ShardSpec, peer_id: str) -> dict:
        """The data.json record: what this peer holds (never the data itself)."""
        return {
            "peer": peer_id,
            "dataset": self.dataset,
            "shard": spec.label,
            "partition": spec.partition,
            "seed": spec.seed,
            "source": self.source,
            "num_classes": self.num_classes,
            "train_samples": int(len(self.y_train)),
            "test_samples": int(len(self.y_test)),
            "train_classes": class_histogram(self.y_train, self.num_classes),
            "test_classes": class_histogram(self.y_test, self.num_classes),
        }


def keras_cache() -> Path:
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras")) / "datasets"


def _missing(spec: ShardSpec, what: str) -> DatasetError:
    return DatasetError(f"dataset {spec.dataset!r}: {what}.\nHow to get it: {how_to_get(spec.dataset)}")


def _cap(indices: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """At most `limit` of the indices, drawn at random so the shard's class mix is kept."""
    if limit is None or len(indices) <= limit:
        return indices
    chosen = np.random.default_rng(seed).choice(len(indices), size=limit, replace=False)
    return np.sort(indices[chosen])


def _pick(labels: np.ndarray, spec: ShardSpec, num_classes: int, limit: int | None) -> tuple[np.ndarray, int]:
    """This peer's rows of `labels`, and the most rows any shard of the partition gets."""
    parts = partition(
        labels, spec.num_shards, spec.partition, seed=spec.seed, alpha=spec.alpha, num_classes=num_classes
    )
    largest = max(len(part) if limit is None else min(len(part), limit) for part in parts)
    return _cap(parts[spec.shard], limit, spec.seed + spec.shard), largest


def _finish(
    spec: ShardSpec,
    source: str,
    x_train,
    y_train,
    x_test,
    y_test,
    num_classes: int,
    largest: tuple[int, int] | None = None,
) -> Shard:
    shape = SHAPES[spec.dataset]

    def prepare(x):
        return None if x is None else (np.asarray(x, dtype=np.float32) / 255.0).reshape((-1, *shape))

    shard = Shard(
        spec.dataset,
        prepare(x_train),
        np.asarray(y_train, np.int64).ravel(),
        prepare(x_test),
        np.asarray(y_test, np.int64).ravel(),
        num_classes,
        source,
        largest,
    )
    if len(shard.y_train) == 0 or len(shard.y_test) == 0:
        raise DatasetError(
            f"shard {spec.label} of {spec.dataset} ({spec.partition}) is empty "
            f"({len(shard.y_train)} train, {len(shard.y_test)} test samples): use fewer peers or "
            "another partition"
        )
    return shard


def _rows(path: Path | None, rows: np.ndarray, images: bool) -> np.ndarray | None:
    """The images of `rows`, copied out of the (cached, memory-mapped) file; None when only labels are wanted."""
    return np.asarray(load_idx(path)[rows]) if images and path is not None else None


def _from_idx(spec: ShardSpec, folder: Path, images: bool = True) -> Shard:
    files = find_idx_files(folder)
    if files["test_images"] is None or files["test_labels"] is None:
        raise _missing(spec, f"no IDX files in {folder}; expected {expected_idx_files()}")
    num_classes = NUM_CLASSES[spec.dataset]
    if files["train_images"] and files["train_labels"]:
        train_labels, test_labels = load_idx(files["train_labels"]), load_idx(files["test_labels"])
        train_rows, train_largest = _pick(train_labels, spec, num_classes, spec.train_samples)
        test_rows, test_largest = _pick(test_labels, spec, num_classes, spec.test_samples)
        return _finish(
            spec,
            str(folder),
            _rows(files["train_images"], train_rows, images),
            train_labels[train_rows],
            _rows(files["test_images"], test_rows, images),
            test_labels[test_rows],
            num_classes,
            (train_largest, test_largest),
        )
    # Only the test set: hold out a stratified, seeded fifth of it as test data (as scripts/split_dataset.py does),
    # then partition both parts alike.
    labels = load_idx(files["test_labels"])
    train_pool, test_pool = split_train_test(labels, TEST_ONLY_FRACTION, seed=spec.seed)
    cut = len(train_pool)
    train_picked, train_largest = _pick(labels[train_pool], spec, num_classes, spec.train_samples)
    test_picked, test_largest = _pick(labels[test_pool], spec, num_classes, spec.test_samples)
    train_rows, test_rows = train_pool[train_picked], test_pool[test_picked]
    log.info("only the test files are in %s: %d of its samples train, %d test", folder, cut, len(labels) - cut)
    return _finish(
        spec,
        f"{folder} (test set split {1 - TEST_ONLY_FRACTION:.0%}/{TEST_ONLY_FRACTION:.0%})",
        _rows(files["test_images"], train_rows, images),
        labels[train_rows],
        _rows(files["test_images"], test_rows, images),
        labels[test_rows],
        num_classes,
        (train_largest, test_largest),
    )


def _from_split(spec: ShardSpec, folder: Path) -> Shard:
    try:
        manifest = json.loads((folder / SPLIT_MANIFEST).read_text())
        if manifest.get("num_shards") != spec.num_shards:
            raise DatasetError(
                f"{folder} was split into {manifest.get('num_shards')} shards, but this peer has --shard {spec.label}"
            )
        if manifest.get("dataset") not in (None, spec.dataset):
            raise DatasetError(f"{folder} holds {manifest.get('dataset')}, not {spec.dataset}")
        entry = next(s for s in manifest["shards"] if s["shard"] == spec.shard)
        with np.load(folder / entry["file"], allow_pickle=False) as data:
            arrays = {k: data[k] for k in SPLIT_ARRAYS}
    except DatasetError:
        raise
    except (OSError, ValueError, KeyError, StopIteration, TypeError) as err:
        raise DatasetError(
            f"{folder}: cannot read the split shard {spec.shard} ({err}); run `python -m scripts.split_dataset` again"
        ) from None
    train = _cap(np.arange(len(arrays["y_train"])), spec.train_samples, spec.seed)
    test = _cap(np.arange(len(arrays["y_test"])), spec.test_samples, spec.seed)
    return _finish(
        spec,
        str(folder),
        arrays["x_train"][train],
        arrays["y_train"][train],
        arrays["x_test"][test],
        arrays["y_test"][test],
        int(manifest.get("num_classes", NUM_CLASSES[spec.dataset])),
    )


def _from_keras(spec: ShardSpec) -> Shard:
    cache_npz = keras_cache() / "mnist.npz"
    try:
        if spec.dataset == "mnist" and cache_npz.is_file():
            with np.load(cache_npz, allow_pickle=False) as data:
                (xa, ya), (xb, yb) = (data["x_train"], data["y_train"]), (data["x_test"], data["y_test"])
        else:
            from keras import datasets  # imported here: it costs seconds and is needed only on this path

            loader = {"mnist": datasets.mnist, "fashion-mnist": datasets.fashion_mnist, "cifar10": datasets.cifar10}[
                spec.dataset
            ]
            (xa, ya), (xb, yb) = loader.load_data()
    except Exception as err:  # the download raises many kinds (URLError, OSError, HTTP errors, bad archives)
        raise _missing(
            spec, f"not in the Keras cache ({keras_cache()}) and the download failed: {type(err).__name__}: {err}"
        ) from None
    ya, yb = np.asarray(ya).ravel(), np.asarray(yb).ravel()
    num_classes = NUM_CLASSES[spec.dataset]
    train, train_largest = _pick(ya, spec, num_classes, spec.train_samples)
    test, test_largest = _pick(yb, spec, num_classes, spec.test_samples)
    return _finish(
        spec,
        f"keras ({keras_cache()})",
        xa[train],
        ya[train],
        xb[test],
        yb[test],
        num_classes,
        (train_largest, test_largest),
    )


def load_shard(spec: ShardSpec, images: bool = True) -> Shard:
    """This peer's shard; with `images=False` only its labels (what a peer announces and records, in milliseconds:
    its images are for the learner). DatasetError says what is missing and how to get it."""
    try:
        if spec.data_dir is not None:
            folder = Path(spec.data_dir)
            if not folder.is_dir():
                raise _missing(spec, f"--data-dir {folder} is not a folder")
            if (folder / SPLIT_MANIFEST).is_file():
                return _from_split(spec, folder)
            return _from_idx(spec, folder, images)
        if spec.dataset == "fashion-mnist":
            for folder in (DEBIAN_FASHION_MNIST, keras_cache() / "fashion-mnist"):
                if find_idx_files(folder)["test_labels"]:
                    return _from_idx(spec, folder, images)
        return _from_keras(spec)
    except (IdxError, PartitionError) as err:
        raise DatasetError(f"dataset {spec.dataset!r}: {err}") from None
