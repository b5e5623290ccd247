"""What the names of the federation look like: peer ids, run ids, the topic prefix. Standard library only: the
wire format (`peer.wire`), the settings, the run dir and the launchers (some of which run on a bare host
Python) all use these, and nothing else defines them."""

from __future__ import annotations

import re
import secrets
from datetime import datetime

# A peer id travels in every message, names a topic level and a folder of the run dir.
PEER_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# A run id is one topic level: every topic of a run is <prefix>/<run id>/..., so runs on one broker never mix.
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# The topic prefix: one or more levels of the same characters (it starts every topic of the federation).
TOPIC_PREFIX_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")


def launched_peer_id(number: int) -> str:
    """Peer K (from 1) of a network the launchers start is `peer-K`, on shard K-1 of N."""
    return f"peer-{number}"


def valid_peer_id(text) -> bool:
    return isinstance(text, str) and PEER_ID_PATTERN.fullmatch(text) is not None


def valid_run_id(text) -> bool:
    """Whether `text` can be a run id: 1 to 64 of A-Z a-z 0-9 _ . - (one topic level, no wildcard)."""
    return isinstance(text, str) and RUN_ID_PATTERN.fullmatch(text) is not None


def new_run_id(now: float) -> str:
    """A fresh run id for a run started at `now` (Unix seconds), readable and unique enough: the local time and a
    random tail (e.g. 20261124-081502-3fa9c1)."""
    return datetime.fromtimestamp(now).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
