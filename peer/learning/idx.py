"""Reader for the IDX format that MNIST and Fashion-MNIST ship in (optionally gzip'd).

Layout (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one uint32
per dimension, then the data. Only unsigned-byte files exist in these datasets, so only those are accepted.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from pathlib import Path

import numpy as np

UBYTE = 0x08


class IdxError(ValueError):
    """The file is not a valid unsigned-byte IDX file."""


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _read_header(stream, path: Path) -> tuple[int, ...]:
    head = stream.read(4)
    if len(head) != 4 or head[0] != 0 or head[1] != 0:
        raise IdxError(f"{path}: not an IDX file (bad magic)")
    if head[2] != UBYTE:
        raise IdxError(f"{path}: IDX type 0x{head[2]:02x} is not unsigned byte")
    ndim = head[3]
    raw = stream.read(4 * ndim)
    if len(raw) != 4 * ndim:
        raise IdxError(f"{path}: truncated header")
    return struct.unpack(f">{ndim}I", raw)


def read_idx(path: str | Path) -> np.ndarray:
    """The whole array (use for labels, or for small files)."""
    path = Path(path)
    with _open(path) as stream:
        shape = _read_header(stream, path)
        count = int(np.prod(shape, dtype=np.int64))
        data = stream.read(count)
    if len(data) != count:
        raise IdxError(f"{path}: truncated data ({len(data)} of {count} bytes)")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def read_idx_rows(path: str | Path, rows: np.ndarray) -> np.ndarray:
    """Only the given rows (first axis), streaming the file so the rest never sits in memory."""
    path = Path(path)
    rows = np.asarray(rows, dtype=np.int64)
    with _open(path) as stream:
        shape = _read_header(stream, path)
        row_shape = shape[1:]
        row_bytes = int(np.prod(row_shape, dtype=np.int64)) if row_shape else 1
        if rows.size and (rows.min() < 0 or rows.max() >= shape[0]):
            raise IdxError(f"{path}: row index out of range 0..{shape[0] - 1}")
        order = np.argsort(rows, kind="stable")
        out = np.empty((rows.size, *row_shape), dtype=np.uint8)
        position = 0
        for target in order:
            wanted = int(rows[target])
            if wanted < position:  # repeated index: copy the row already read
                out[target] = out[order[np.searchsorted(rows[order], wanted)]]
                continue
            skip = (wanted - position) * row_bytes
            while skip:
                chunk = stream.read(min(skip, 1 << 20))
                if not chunk:
                    raise IdxError(f"{path}: truncated data")
                skip -= len(chunk)
            data = stream.read(row_bytes)
            if len(data) != row_bytes:
                raise IdxError(f"{path}: truncated data")
            out[target] = np.frombuffer(data, dtype=np.uint8).reshape(row_shape)
            position = wanted + 1
    return out


# --- the cache: each IDX file decompressed once, then memory-mapped ----------------------------------------------------


def cache_dir() -> Path | None:
    """Where decompressed datasets are kept: $SDFL_CACHE_DIR, else $XDG_CACHE_HOME/sdfl, else ~/.cache/sdfl; None
    when caching is off (SDFL_CACHE_DIR=off)."""
    chosen = os.environ.get("SDFL_CACHE_DIR")
    if chosen == "off":
        return None
    if chosen:
        return Path(chosen)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "sdfl"


def _cached_path(path: Path, folder: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    return folder / "idx" / f"{path.name.removesuffix('.gz')}-{key}.npy"


def load_idx(path: str | Path) -> np.ndarray:
    """The whole array of an IDX file, read-only. Decompressed and parsed once per machine: the array is kept as a
    .npy file in `cache_dir()` and memory-mapped afterwards, so every peer of a machine loads its shard in
    milliseconds and shares the pages of the dataset with the others. A cache that cannot be written (a read-only
    home in a container, a full disk) is no error: the file is then read as `read_idx` does."""
    path = Path(path)
    folder = cache_dir()
    if folder is None:
        return read_idx(path)
    try:
        cached = _cached_path(path, folder)
        if cached.is_file():
            return np.load(cached, mmap_mode="r")
    except (OSError, ValueError):
        pass  # unreadable or damaged: read the source, and try to write a good copy
    array = read_idx(path)
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        temp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with open(temp, "wb") as out:
            np.save(out, array)
        os.replace(temp, cached)
        return np.load(cached, mmap_mode="r")
    except OSError:
        return array
