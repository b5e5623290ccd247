"""TensorFlow's start-up banners stay out of a peer's log: what a process writes to its stderr while it loads (C++
lines straight to file descriptor 2, Python's own lines) comes out afterwards, in order, without the banners."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from peer.node.banners import is_banner
from tests.netutil import ROOT

TENSORFLOW_2_21 = [
    b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n",
    b"I0000 00:00:1796387942.918073   11644 port.cc:153] oneDNN custom operations are on. You may see slightly "
    b"different numerical results due to floating-point round-off errors from different computation orders. To turn "
    b"them off, set the environment variable `TF_ENABLE_ONEDNN_OPTS=0`.\n",
    b"I0000 00:00:1796387937.572363   11593 cpu_feature_guard.cc:227] This TensorFlow binary is optimized to use "
    b"available CPU instructions in performance-critical operations.\n",
    b"To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild TensorFlow with the "
    b"appropriate compiler flags.\n",
]


def test_the_banners_of_tensorflow_are_known_and_a_peer_s_lines_are_not():
    assert all(is_banner(line) for line in TENSORFLOW_2_21)
    for line in (
        b"2026-01-02 03:04:05,678 INFO    peer=peer-1 role=waiting term=0 round=0 phase=- | model: cnn-small\n",
        b"python -m peer: error: dataset 'mnist': not in the Keras cache\n",
        b"Traceback (most recent call last):\n",
    ):
        assert not is_banner(line)


def test_what_is_written_to_stderr_while_loading_comes_out_in_order_without_the_banners():
    program = f"""
import os, sys
from peer.node.banners import without_tensorflow_banners
print("before", file=sys.stderr, flush=True)
with without_tensorflow_banners():
    print("loading", file=sys.stderr)
    for line in {TENSORFLOW_2_21!r}:
        os.write(2, line)  # as TensorFlow's C++ side writes: straight to the file descriptor
    os.write(2, b"a C++ warning that matters\\n")
    print("loaded", file=sys.stderr)
print("after", file=sys.stderr, flush=True)
print("stdout is left alone", flush=True)
"""
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.decode().splitlines() == ["before", "loading", "a C++ warning that matters", "loaded", "after"]
    assert done.stdout == b"stdout is left alone\n"


@pytest.mark.parametrize(
    "program", [["peer", "--peer-id", "peer-1", "--shard", "0/2"], ["peer.host", "--hosted", "peer-1=0/2"]]
)
def test_a_peer_without_its_dataset_says_why_and_nothing_of_tensorflow(tmp_path, program):
    """The default dataset, mnist, not cached and not downloadable: the Keras download path imports TensorFlow,
    whose banners used to open the peer's output; now only the peer's reason is there."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("FL_", "TF_"))},
        "KERAS_HOME": str(tmp_path / "keras"),
        "HTTPS_PROXY": "http://127.0.0.1:9",  # no internet: the download is refused at once
        "https_proxy": "http://127.0.0.1:9",
    }
    done = subprocess.run(
        [sys.executable, "-m", *program, "--run-dir", str(tmp_path / "run")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=180,
    )
    assert done.returncode == 2, done.stderr
    lines = (done.stdout + done.stderr).decode().splitlines()
    assert not [line for line in lines if is_banner(line.encode())], lines
    assert any(": error: " in line and "dataset 'mnist': not in the Keras cache" in line for line in lines), lines
