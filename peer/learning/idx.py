"""Reader for the IDX format that MNIST and Fashion-MNIST ship in (optionally gzip'd).

Layout (big-endian): two zero bytes, a type code (0x08 = unsigned byte), the number of dimensions, then one uint32
per dimension, then the data. Only unsigned-byte files exist in these datasets, so only those are accepted.
"""

from __future__ import annotations

import gzip
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
