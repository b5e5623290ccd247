"""TensorFlow's start-up banners, kept out of a peer's log.

Importing TensorFlow prints, from its C++ side, a line on the CPU features it was not built for and, twice, that
oneDNN custom operations are on, with absl's warning that logging is not initialised yet. They are not about the
peer, they open every peer's log, and TF_CPP_MIN_LOG_LEVEL silences only the first (TensorFlow 2.21). So the peer
loads its data and model inside `without_tensorflow_banners()`: whatever is written to the process's stderr
meanwhile (file descriptor 2, which C++ writes to directly) is held in a temporary file and passed on afterwards,
without the banners. The peer's own lines of that moment come out in order, a few seconds late (and a peer killed
by SIGKILL in those seconds loses them).
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

# Before TensorFlow is imported: its C++ INFO lines (the CPU-feature banner) are not written at all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

BANNERS = (
    b"oneDNN custom operations are on",
    b"cpu_feature_guard.cc",
    b"To enable the following instructions:",
    b"All log messages before absl::InitializeLog() is called are written to STDERR",
    b"This TensorFlow binary is optimized to use available CPU instructions",
)


def is_banner(line: bytes) -> bool:
    return any(banner in line for banner in BANNERS)


@contextmanager
def without_tensorflow_banners() -> Iterator[None]:
    """Everything written to stderr inside, passed on at the end without TensorFlow's start-up banners."""
    sys.stderr.flush()
    with tempfile.TemporaryFile() as held:
        saved = os.dup(2)
        os.dup2(held.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            held.seek(0)
            with open(2, "wb", closefd=False) as stderr:
                stderr.writelines(line for line in held if not is_banner(line))
