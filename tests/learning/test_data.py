"""Loading a peer's shard: from IDX folders (full, or the MNIST test set alone), from split_dataset's output, from the
Keras cache; only the shard's rows; train and test partitioned alike; clear errors that say how to get the data."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from peer.config import load_settings
from peer.learning.data import DatasetError, load_shard
from peer.learning.idx import IdxError, read_idx, read_idx_rows
from scripts.split_dataset import split_dataset
from tests.netutil import FASHION, SHARED_MNIST


def settings(*flags, **env):
    return load_settings(list(flags), {k: str(v) for k, v in env.items()}).shard_spec


def test_mnist_test_set_alone_is_split_into_train_and_test_and_partitioned():
    shards = [
        load_shard(settings("--dataset", "mnist", "--data-dir", str(SHARED_MNIST), "--shard", f"{k}/5"))
        for k in range(5)
    ]
    assert sum(len(s.y_train) for s in shards) == 8000 and sum(len(s.y_test) for s in shards) == 2000
    for s in shards:
        assert s.x_train.shape[1:] == (28, 28, 1) and s.x_train.dtype == np.float32
        assert 0.0 <= s.x_train.min() and s.x_train.max() <= 1.0
        assert set(np.unique(s.y_train)) == set(range(10))
    # disjoint: no image is in two shards' training data
    flat = np.concatenate([s.x_train.reshape(len(s.y_train), -1) for s in shards])
    assert len(np.unique(flat, axis=0)) >= len(flat) - 5  # a handful of MNIST digits are true duplicates


def test_the_pre_split_folder_gives_the_same_shard_as_splitting_on_the_fly(tmp_path):
    split_dataset(
        "mnist",
        SHARED_MNIST,
        5,
        tmp_path,
        partition_scheme="dirichlet",
        seed=3,
        alpha=0.5,
        test_fraction=0.2,
        log=lambda *a: None,
    )
    args = ("--dataset", "mnist", "--shard", "2/5", "--partition", "dirichlet", "--seed", "3")
    pre = load_shard(settings(*args, "--data-dir", str(tmp_path)))
    fly = load_shard(settings(*args, "--data-dir", str(SHARED_MNIST)))
    assert np.array_equal(pre.y_train, fly.y_train) and np.array_equal(pre.x_test, fly.x_test)


def test_fashion_mnist_is_found_in_debians_folder_and_caps_keep_the_class_mix():
    s = load_shard(
        settings(
            "--dataset",
            "fashion-mnist",
            "--shard",
            "1/4",
            "--partition",
            "skewed",
            "--train-samples",
            "400",
            "--test-samples",
            "100",
        )
    )
    assert (len(s.y_train), len(s.y_test)) == (400, 100) and str(FASHION) in s.source
    train_mix = np.bincount(s.y_train, minlength=10) / 400
    test_mix = np.bincount(s.y_test, minlength=10) / 100
    assert set(np.argsort(train_mix)[-2:]) == set(np.argsort(test_mix)[-2:])
    assert train_mix.max() > 0.3 and test_mix.max() > 0.3  # skewed towards its major classes, both alike


def test_only_the_shards_rows_are_read():
    rows = np.array([7, 3, 3, 9999, 0])
    path = SHARED_MNIST / "t10k-images-idx3-ubyte.gz"
    assert np.array_equal(read_idx_rows(path, rows), read_idx(path)[rows])


def test_the_keras_cache_is_used_without_a_download(tmp_path, monkeypatch):
    cache = tmp_path / "keras" / "datasets"
    cache.mkdir(parents=True)
    rng = np.random.default_rng(0)
    np.savez(
        cache / "mnist.npz",
        x_train=rng.integers(0, 255, (600, 28, 28), dtype=np.uint8),
        y_train=np.repeat(np.arange(10), 60).astype(np.uint8),
        x_test=rng.integers(0, 255, (100, 28, 28), dtype=np.uint8),
        y_test=np.repeat(np.arange(10), 10).astype(np.uint8),
    )
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    s = load_shard(settings("--dataset", "mnist", "--shard", "0/3"))
    assert len(s.y_train) == 200 and len(s.y_test) in (33, 34) and "keras" in s.source


def test_a_missing_folder_says_how_to_get_the_data(tmp_path):
    with pytest.raises(DatasetError) as err:
        load_shard(settings("--dataset", "fashion-mnist", "--data-dir", str(tmp_path / "nope")))
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError) as err:
        load_shard(settings("--dataset", "mnist", "--data-dir", str(tmp_path / "empty")))
    assert "t10k-images-idx3-ubyte" in str(err.value) and "--data-dir" in str(err.value)


def test_corrupt_files_and_mismatched_splits_are_clear_errors(tmp_path):
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03garbage"))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02"))
    with pytest.raises(DatasetError, match="not an IDX file"):
        load_shard(settings("--dataset", "mnist", "--data-dir", str(tmp_path)))
    with pytest.raises(IdxError):
        read_idx(tmp_path / "t10k-images-idx3-ubyte.gz")
    split = tmp_path / "split"
    split.mkdir()
    (split / "manifest.json").write_text(json.dumps({"dataset": "mnist", "num_shards": 3, "shards": []}))
    with pytest.raises(DatasetError, match="split into 3 shards"):
        load_shard(settings("--dataset", "mnist", "--data-dir", str(split), "--shard", "0/5"))


def test_every_peer_computes_the_largest_shard_of_the_run_from_its_data_settings():
    # What no peer may claim to hold more of (issue 19: an init announcing 10^12 samples): the same number on every
    # shard's peer, the size of the largest shard (here a Dirichlet split, whose shards differ a lot), caps applied.
    args = ("--dataset", "mnist", "--data-dir", str(SHARED_MNIST), "--partition", "dirichlet", "--seed", "3")
    shards = [load_shard(settings(*args, "--shard", f"{k}/5")) for k in range(5)]
    largest = (max(len(s.y_train) for s in shards), max(len(s.y_test) for s in shards))
    assert {s.largest for s in shards} == {largest}
    assert largest[0] > 1.2 * min(len(s.y_train) for s in shards)  # (not equal shards: the bound is not trivial)
    capped = load_shard(settings(*args, "--shard", "0/5", "--train-samples", "100", "--test-samples", "30"))
    assert capped.largest == (100, 30)


def test_a_pre_split_folder_gives_no_bound_its_shards_are_files(tmp_path):
    split_dataset("mnist", SHARED_MNIST, 2, tmp_path, partition_scheme="iid", seed=3, log=lambda *a: None)
    assert load_shard(settings("--dataset", "mnist", "--shard", "1/2", "--data-dir", str(tmp_path))).largest is None
