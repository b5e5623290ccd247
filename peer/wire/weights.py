"""Model weights on the wire: a list of float tensors as bytes (no pickle), their digest, their size."""

from __future__ import annotations

import hashlib
import math
import struct

import numpy as np

from peer.wire.errors import ProtocolError, require

MAX_TENSORS = 256
MAX_TENSOR_DIMS = 8
MAX_WEIGHT_BYTES = 1024 * 1024 * 1024  # the largest model a peer takes (1 GiB); beyond MAX_MESSAGE_BYTES in chunks


class WeightCodec:
    """A list of tensors as bytes, little-endian throughout:

        u32 tensor_count
        per tensor: u8 dtype (1 = float32, 2 = float16), u8 ndim, ndim x u32 dims, prod(dims) values (C order)

    No pickle and no JSON lists of floats: a decoder can check every length before reading. Decoding always gives
    float32 arrays. float16 (`--wire-dtype float16`) halves the bytes; a tensor with a value beyond float16's range
    travels as float32, so nothing is lost to overflow. `digest` names a model by its float32 values.
    """

    @staticmethod
    def encode(tensors: list[np.ndarray], wire_dtype: str = "float32") -> bytes:
        """Any tensors, unchecked (tests build bad payloads with it); `encode(message)` checks them first."""
        # not ascontiguousarray: it turns a scalar into shape (1,)
        return b"".join(WeightCodec._parts([np.asarray(t, dtype="<f4") for t in tensors], wire_dtype))

    @staticmethod
    def parts(tensors: list[np.ndarray], wire_dtype: str = "float32") -> list:
        """`encode(tensors)` as a list of bytes-like parts to write one after the other, without joining them."""
        return WeightCodec._parts([np.asarray(t, dtype="<f4") for t in tensors], wire_dtype)

    @staticmethod
    def _on_wire(array: np.ndarray, wire_dtype: str) -> np.ndarray:
        """The array as it travels: float16 if asked and every value fits, else float32."""
        if wire_dtype == "float16":
            with np.errstate(over="ignore"):
                half = array.astype("<f2")
            if np.isfinite(half).all():
                return half
        return array

    @staticmethod
    def _parts(arrays: list[np.ndarray], wire_dtype: str = "float32") -> list:
        """The encoding in pieces, for one b"".join or for chunks: values are views of C-ordered data, not copies
        (float16 values are a converted copy, half the size)."""
        parts: list[bytes | memoryview] = [struct.pack("<I", len(arrays))]
        for array in arrays:
            wire = WeightCodec._on_wire(array, wire_dtype)
            parts.append(struct.pack(f"<BB{wire.ndim}I", _DTYPE_CODES[wire.dtype.str], wire.ndim, *wire.shape))
            parts.append(np.ascontiguousarray(wire).reshape(-1).data.cast("B"))
        return parts

    @staticmethod
    def quantized(tensors: list[np.ndarray], wire_dtype: str) -> list[np.ndarray]:
        """The float32 tensors a receiver decodes from `encode(tensors, wire_dtype)`: a controller holds exactly the
        model its peers hold, so the digests its orders name match theirs."""
        if wire_dtype == "float32":
            return tensors
        return [WeightCodec._on_wire(np.asarray(t, "<f4"), wire_dtype).astype(np.float32) for t in tensors]

    @staticmethod
    def checked(tensors) -> list[np.ndarray]:
        """The tensors as little-endian float32 arrays, or ProtocolError for anything `decode` would refuse: more than
        MAX_TENSORS tensors or MAX_TENSOR_DIMS dimensions, more than MAX_WEIGHT_BYTES in all, NaN or infinity
        (also a float64 value too large for float32)."""
        try:
            with np.errstate(over="ignore"):  # a float64 beyond float32 becomes infinity, refused below
                arrays = [np.asarray(tensor, dtype="<f4") for tensor in tensors]
        except (TypeError, ValueError) as err:  # not a list of tensors, ragged lists, strings
            raise ProtocolError(f"weights: not a list of float tensors ({str(err)[:100]})") from None
        require(len(arrays) <= MAX_TENSORS, f"weights: {len(arrays)} tensors exceeds the limit of {MAX_TENSORS}")
        for index, array in enumerate(arrays):
            require(
                array.ndim <= MAX_TENSOR_DIMS,
                f"weights: tensor {index}: {array.ndim} dimensions exceeds {MAX_TENSOR_DIMS}",
            )
            require(all(dim < 2**32 for dim in array.shape), f"weights: tensor {index}: a dimension exceeds 2^32 - 1")
        size = WeightCodec.size(arrays)
        require(size <= MAX_WEIGHT_BYTES, f"weights: {size} bytes exceeds the {MAX_WEIGHT_BYTES}-byte limit")
        for index, array in enumerate(arrays):
            require(bool(np.isfinite(array).all()), f"weights: tensor {index}: contains NaN or infinity")
        return arrays

    @staticmethod
    def size(tensors: list[np.ndarray], wire_dtype: str = "float32") -> int:
        """len(encode(tensors, wire_dtype)), without encoding them."""
        total = 4
        for t in tensors:
            width = 4
            if wire_dtype == "float16" and np.size(t) and float(np.max(np.abs(t))) <= _FLOAT16_MAX:
                width = 2
            total += 2 + 4 * np.ndim(t) + width * int(np.size(t))
        return total

    @staticmethod
    def digest(tensors: list[np.ndarray]) -> str:
        """A model's name by content: SHA-256 over its shapes and float32 values (DIGEST_HEX hex digits). Computed
        over the arrays in place, without encoding them."""
        sha = hashlib.sha256()
        for part in WeightCodec._parts([np.asarray(t, dtype="<f4") for t in tensors]):
            sha.update(part)
        return sha.hexdigest()[:DIGEST_HEX]

    @staticmethod
    def decode(data: bytes | memoryview) -> list[np.ndarray]:
        view = memoryview(data)
        if len(view) > MAX_WEIGHT_BYTES:
            raise ProtocolError(f"weights: {len(view)} bytes exceeds the {MAX_WEIGHT_BYTES}-byte limit")
        if len(view) < 4:
            raise ProtocolError("weights: truncated tensor count")
        (count,) = struct.unpack_from("<I", view, 0)
        if count > MAX_TENSORS:
            raise ProtocolError(f"weights: {count} tensors exceeds the limit of {MAX_TENSORS}")
        offset, tensors = 4, []
        for index in range(count):
            if offset + 2 > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated header")
            code, ndim = view[offset], view[offset + 1]
            dtype = _DTYPES.get(code)
            if dtype is None:
                raise ProtocolError(f"weights: tensor {index}: unknown dtype code {code}")
            if ndim > MAX_TENSOR_DIMS:
                raise ProtocolError(f"weights: tensor {index}: {ndim} dimensions exceeds {MAX_TENSOR_DIMS}")
            offset += 2
            if offset + 4 * ndim > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated shape")
            shape = struct.unpack_from(f"<{ndim}I", view, offset)
            offset += 4 * ndim
            size = math.prod(shape) * np.dtype(dtype).itemsize
            if offset + size > len(view):
                raise ProtocolError(f"weights: tensor {index}: truncated values ({len(view) - offset} of {size} bytes)")
            # float32 values are used in place (no copy of a large model); float16 ones are widened
            array = (
                np.frombuffer(view[offset : offset + size], dtype=dtype).reshape(shape).astype(np.float32, copy=False)
            )
            if not np.isfinite(array).all():
                raise ProtocolError(f"weights: tensor {index}: contains NaN or infinity")
            tensors.append(array)
            offset += size
        if offset != len(view):
            raise ProtocolError(f"weights: {len(view) - offset} trailing bytes")
        return tensors


WIRE_DTYPES = ("float32", "float16")
_DTYPES = {1: "<f4", 2: "<f2"}  # the dtype byte of each tensor
_DTYPE_CODES = {"<f4": 1, "<f2": 2}
_FLOAT16_MAX = float(np.finfo(np.float16).max)
DIGEST_HEX = 32  # 128 bits: a model's name in a training order
FINGERPRINT_HEX = 16  # a model architecture's name (peer.models.fingerprint)
