import gzip
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from peer.learning.data import DEFAULT_SEED, DatasetError, expected_idx_files, how_to_get
from scripts.split_dataset import build_parser, main, split_dataset

ROOT = Path(__file__).resolve().parents[2]
MNIST = Path("/work/shared/data/mnist")
needs_mnist = pytest.mark.skipif(not (MNIST / "t10k-labels-idx1-ubyte.gz").exists(), reason="MNIST test set absent")


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as stream:
        stream.write(header + array.astype(np.uint8).tobytes())


def check_output(out_dir: Path, manifest: dict, peers: int, total: int) -> None:
    assert json.loads((out_dir / "manifest.json").read_text()) == manifest
    assert manifest["num_shards"] == peers and len(manifest["shards"]) == peers
    seen = 0
    for k, entry in enumerate(manifest["shards"]):
        assert entry["shard"] == k and entry["file"] == f"shard-{k}.npz"
        with np.load(out_dir / entry["file"], allow_pickle=False) as shard:
            for split in ("train", "test"):
                images, labels = shard[f"x_{split}"], shard[f"y_{split}"]
                assert images.dtype == np.uint8 and labels.dtype == np.uint8
                assert images.shape == (entry[f"{split}_samples"], 28, 28)
                assert labels.shape == (entry[f"{split}_samples"],)
                assert np.bincount(labels, minlength=10).tolist() == entry[f"{split}_classes"]
                seen += len(labels)
    assert seen == total


@needs_mnist
@pytest.mark.parametrize("scheme", ["dirichlet", "iid"])
def test_splits_the_mnist_test_set_into_shards(tmp_path, scheme):
    lines = []
    manifest = split_dataset("mnist", MNIST, 5, tmp_path, partition_scheme=scheme, seed=1, alpha=0.5, log=lines.append)
    check_output(tmp_path, manifest, peers=5, total=10_000)
    assert len(lines) == 1 and "t10k" in lines[0] and "8000 train / 2000 test" in lines[0]
    assert manifest["partition"] == scheme and manifest["seed"] == 1 and manifest["num_classes"] == 10
    assert sum(s["test_samples"] for s in manifest["shards"]) == 2000
    if scheme == "iid":
        assert {s["train_samples"] for s in manifest["shards"]} == {1600}


@needs_mnist
def test_command_line_run_prints_a_table(tmp_path, capsys):
    code = main(
        [
            "--dataset",
            "mnist",
            "--data-dir",
            str(MNIST),
            "--peers",
            "3",
            "--out",
            str(tmp_path),
            "--partition",
            "skewed",
            "--seed",
            "2",
            "--test-fraction",
            "0.5",
        ]
    )
    assert code == 0
    output = capsys.readouterr().out
    assert "5000 train / 5000 test" in output
    assert output.count("\n") >= 5 and "shard" in output
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    for entry in manifest["shards"]:
        train = np.array(entry["train_classes"])
        assert np.sort(train)[-2:].sum() / train.sum() == pytest.approx(0.8, abs=0.01)


def test_full_train_and_test_files_are_used_as_they_are(tmp_path):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rng = np.random.default_rng(0)
    for prefix, count, gz in (("train", 300, ".gz"), ("t10k", 100, "")):
        write_idx(data_dir / f"{prefix}-images-idx3-ubyte{gz}", rng.integers(0, 256, (count, 28, 28)))
        write_idx(data_dir / f"{prefix}-labels-idx1-ubyte{gz}", np.arange(count) % 10)
    lines = []
    manifest = split_dataset(
        "fashion-mnist", data_dir, 4, tmp_path / "out", partition_scheme="uniform", log=lines.append
    )
    assert lines == []
    assert "train and t10k" in manifest["source"]
    check_output(tmp_path / "out", manifest, peers=4, total=280 + 80)
    assert {tuple(s["train_classes"]) for s in manifest["shards"]} == {(7,) * 10}


def test_missing_data_dir_explains_what_is_expected(tmp_path, capsys):
    code = main(
        [
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            str(tmp_path / "nothing"),
            "--peers",
            "2",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "does not exist" in error and "t10k-labels-idx1-ubyte" in error
    assert "dataset-fashion-mnist" in error and "/usr/share/datasets/fashion-mnist" in error
    assert not (tmp_path / "out").exists()


def test_incomplete_data_dir_names_the_missing_files(tmp_path, capsys):
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5))
    code = main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--peers", "2", "--out", str(tmp_path / "o")])
    assert code == 2
    error = capsys.readouterr().err
    assert "missing" in error and "t10k-images-idx3-ubyte" in error and "MNIST" in error
    assert "Traceback" not in error


@pytest.mark.parametrize("dataset", ["mnist", "fashion-mnist"])
def test_errors_say_how_to_get_the_data_as_the_peer_does(tmp_path, dataset):
    with pytest.raises(DatasetError) as error:  # peer.data's error type, caught by the peer and by main alike
        split_dataset(dataset, tmp_path / "nothing", 2, tmp_path / "out")
    message = str(error.value)
    assert expected_idx_files() in message
    # the peer's own sentence, less the Keras download that only the peer can do
    assert how_to_get(dataset, keras=False) in message and "Keras" not in message
    assert how_to_get(dataset).startswith(how_to_get(dataset, keras=False)[:-1])


def test_the_default_seed_is_the_peers():
    args = build_parser().parse_args(["--dataset", "mnist", "--data-dir", "d", "--peers", "2", "--out", "o"])
    assert args.seed == DEFAULT_SEED == 42


def test_more_peers_than_samples_is_an_error(tmp_path, capsys):
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((10, 28, 28)))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(10))
    code = main(["--dataset", "mnist", "--data-dir", str(tmp_path), "--peers", "9", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "cannot split" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--peers", "0"], "at least 1"),
        (["--peers", "two"], "not a whole number"),
        (["--partition", "noniid"], "invalid choice"),
        (["--alpha", "0"], "positive"),
        (["--test-fraction", "1"], "between 0 and 1"),
        (["--seed", "-3"], "negative"),
    ],
)
def test_bad_arguments_exit_2(tmp_path, capsys, args, message):
    base = {"--dataset": "mnist", "--data-dir": str(tmp_path), "--peers": "2", "--out": str(tmp_path / "o")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    with pytest.raises(SystemExit) as exit_info:
        main([item for pair in base.items() for item in pair])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_runs_as_a_script_with_a_clean_error(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "split_dataset.py"),
            "--dataset",
            "mnist",
            "--data-dir",
            str(tmp_path / "absent"),
            "--peers",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "split_dataset: error:" in result.stderr and "Traceback" not in result.stderr
