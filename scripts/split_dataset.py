"""Pre-split MNIST or Fashion-MNIST into one file per peer, plus a manifest, to store or to inspect a partition.

    python -m scripts.split_dataset --dataset mnist --data-dir /work/shared/data/mnist --peers 5 --out shards \
        --partition dirichlet --alpha 0.3

Writes OUT/shard-K.npz (x_train, y_train, x_test, y_test; uint8, images n x 28 x 28) and OUT/manifest.json.
Train and test are partitioned alike (see peer.partition), so shard K's test images have its training class mix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as `python scripts/split_dataset.py`: make the repository root importable for `peer`.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from peer.config import SettingsError, number, whole_number
from peer.learning.data import (
    DEFAULT_SEED,
    IDX_DATASETS,
    IDX_NAMES,
    NUM_CLASSES,
    SHAPES,
    SPLIT_ARRAYS,
    SPLIT_MANIFEST,
    TEST_ONLY_FRACTION,
    DatasetError,
    expected_idx_files,
    find_idx_files,
    how_to_get,
    split_shard_file,
)
from peer.learning.idx import IdxError, read_idx
from peer.learning.partition import DEFAULT_ALPHA, SCHEMES, PartitionError, class_histogram, partition, split_train_test

SPLITS = {"train": ("train_images", "train_labels"), "test": ("test_images", "test_labels")}  # keys of IDX_NAMES


def _expected_files_message(dataset: str, data_dir: Path, problem: str) -> str:
    return f"{problem}\n  expected in {data_dir}: {expected_idx_files()}\n  {how_to_get(dataset, keras=False)}"


def _read_pair(images_path: Path, labels_path: Path, dataset: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    num_classes, image_shape = NUM_CLASSES[dataset], SHAPES[dataset][:2]
    if images.ndim != 3 or images.shape[1:] != image_shape:
        raise DatasetError(
            f"{images_path}: expected images of shape (n, {', '.join(map(str, image_shape))}), found {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DatasetError(f"{labels_path}: {labels.shape} labels do not match {len(images)} images")
    if labels.size and labels.max() >= num_classes:
        raise DatasetError(f"{labels_path}: label {labels.max()} is not one of the {num_classes} classes")
    return images, labels


def load_dataset(dataset: str, data_dir: Path, *, seed: int, test_fraction: float):
    """(x_train, y_train, x_test, y_test, source, note); note is a one-line remark or None."""
    if not data_dir.is_dir():
        raise DatasetError(_expected_files_message(dataset, data_dir, f"data directory {data_dir} does not exist"))
    files = find_idx_files(data_dir)
    found = {split: [files[key] for key in keys] for split, keys in SPLITS.items()}
    complete = {split: all(paths) for split, paths in found.items()}
    if complete["train"] and complete["test"]:
        x_train, y_train = _read_pair(*found["train"], dataset)
        x_test, y_test = _read_pair(*found["test"], dataset)
        return x_train, y_train, x_test, y_test, f"train and t10k IDX files in {data_dir}", None
    if complete["test"] and not any(found["train"]):
        images, labels = _read_pair(*found["test"], dataset)
        train_rows, test_rows = split_train_test(labels, test_fraction, seed=seed)
        source = (
            f"t10k IDX files in {data_dir}, split {len(train_rows)} train / {len(test_rows)} test "
            f"(stratified, test fraction {test_fraction}, seed {seed})"
        )
        note = (
            f"only the t10k files are in {data_dir}: using its {len(labels)} samples as "
            f"{len(train_rows)} train / {len(test_rows)} test"
        )
        return images[train_rows], labels[train_rows], images[test_rows], labels[test_rows], source, note
    missing = [IDX_NAMES[key] for key, path in files.items() if path is None]
    raise DatasetError(_expected_files_message(dataset, data_dir, f"missing in {data_dir}: {', '.join(missing)}"))


def split_dataset(
    dataset: str,
    data_dir: str | Path,
    peers: int,
    out_dir: str | Path,
    *,
    partition_scheme: str = "iid",
    seed: int = DEFAULT_SEED,
    alpha: float = DEFAULT_ALPHA,
    test_fraction: float = TEST_ONLY_FRACTION,
    log=print,
) -> dict:
    """Write OUT/shard-K.npz for K in 0..peers-1 and OUT/manifest.json; return the manifest."""
    if dataset not in IDX_DATASETS:
        raise DatasetError(f"unknown dataset {dataset!r}; choose one of {', '.join(IDX_DATASETS)}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    num_classes = NUM_CLASSES[dataset]
    x_train, y_train, x_test, y_test, source, note = load_dataset(
        dataset, data_dir, seed=seed, test_fraction=test_fraction
    )
    if note:
        log(note)
    options = dict(seed=seed, alpha=alpha, num_classes=num_classes)
    train_parts = partition(y_train, peers, partition_scheme, **options)
    test_parts = partition(y_test, peers, partition_scheme, **options)

    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for shard, (train_rows, test_rows) in enumerate(zip(train_parts, test_parts)):
        file_name = split_shard_file(shard)
        arrays = (
            x_train[train_rows],
            y_train[train_rows].astype(np.uint8),
            x_test[test_rows],
            y_test[test_rows].astype(np.uint8),
        )
        np.savez_compressed(out_dir / file_name, **dict(zip(SPLIT_ARRAYS, arrays)))
        shards.append(
            {
                "shard": shard,
                "file": file_name,
                "train_samples": int(len(train_rows)),
                "test_samples": int(len(test_rows)),
                "train_classes": class_histogram(y_train[train_rows], num_classes),
                "test_classes": class_histogram(y_test[test_rows], num_classes),
            }
        )
    manifest = {
        "dataset": dataset,
        "num_shards": peers,
        "partition": partition_scheme,
        "seed": seed,
        "alpha": alpha,
        "num_classes": num_classes,
        "source": source,
        "shards": shards,
    }
    (out_dir / SPLIT_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    stale = sorted(p.name for p in out_dir.glob(split_shard_file("*")) if p.name not in {s["file"] for s in shards})
    if stale:
        log(f"note: {out_dir} also holds {', '.join(stale)} from an earlier split; manifest.json does not list them")
    return manifest


def format_table(manifest: dict) -> str:
    rows = [f"{'shard':>5} {'train':>6} {'test':>5}  train classes (test classes)"]
    for entry in manifest["shards"]:
        rows.append(
            f"{entry['shard']:>5} {entry['train_samples']:>6} {entry['test_samples']:>5}  "
            f"{' '.join(map(str, entry['train_classes']))} ({' '.join(map(str, entry['test_classes']))})"
        )
    return "\n".join(rows)


def _argument(parse):
    """A parser of peer.config as an argparse type: argparse prints an ArgumentTypeError's message (a ValueError's
    it replaces by "invalid value")."""

    def convert(text: str):
        try:
            return parse(text)
        except SettingsError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    return convert


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="split_dataset",
        description="Write one shard file per peer (shard-K.npz) and a manifest.json for a partition of "
        "MNIST or Fashion-MNIST.",
    )
    parser.add_argument("--dataset", required=True, choices=IDX_DATASETS)
    parser.add_argument(
        "--data-dir", required=True, type=Path, help="folder with the IDX files (train-*/t10k-*, optionally .gz)"
    )
    parser.add_argument("--peers", required=True, type=_argument(whole_number(1)), help="number of shards")
    parser.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    parser.add_argument("--partition", default="iid", choices=SCHEMES, help="partition scheme (default: iid)")
    parser.add_argument(
        "--seed",
        default=DEFAULT_SEED,
        type=_argument(whole_number(0)),
        help=f"seed of the partition, the peers' default too (default: {DEFAULT_SEED})",
    )
    parser.add_argument(
        "--alpha",
        default=DEFAULT_ALPHA,
        type=_argument(number(0, low_open=True)),
        help=f"Dirichlet concentration for --partition dirichlet; smaller is more uneven (default: {DEFAULT_ALPHA})",
    )
    parser.add_argument(
        "--test-fraction",
        default=TEST_ONLY_FRACTION,
        type=_argument(number(0, 1, low_open=True, high_open=True)),
        help="share held out for test when the folder has only the t10k files "
        f"(default: {TEST_ONLY_FRACTION}, as the peer does)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        manifest = split_dataset(
            args.dataset,
            args.data_dir,
            args.peers,
            args.out,
            partition_scheme=args.partition,
            seed=args.seed,
            alpha=args.alpha,
            test_fraction=args.test_fraction,
        )
    except (DatasetError, PartitionError, IdxError, OSError) as error:
        print(f"split_dataset: error: {error}", file=sys.stderr)
        return 2
    print(format_table(manifest))
    print(f"wrote {manifest['num_shards']} shards and manifest.json to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
