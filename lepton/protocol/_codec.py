"""Tensor codec: dtype + shape + raw little-endian C-order bytes. Never pickle."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from lepton.errors import ProtocolError

#: dtype names allowed on the wire, mapped to their little-endian numpy dtype.
DTYPES: dict[str, np.dtype] = {
    "bool": np.dtype("|b1"),
    "uint8": np.dtype("|u1"),
    "int8": np.dtype("|i1"),
    "int16": np.dtype("<i2"),
    "int32": np.dtype("<i4"),
    "int64": np.dtype("<i8"),
    "float16": np.dtype("<f2"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}

_ITEMSIZE = {name: dtype.itemsize for name, dtype in DTYPES.items()}

#: Default ceiling for one decoded tensor (bytes). Configurable per call.
DEFAULT_MAX_TENSOR_BYTES = 64 * 1024 * 1024
MAX_RANK = 8
#: Every dimension is below 2**31 (stores keep shapes as int32), and so is the product of the non-zero
#: dimensions: an empty tensor like ``[0, 2**40]`` has no bytes, but no store can describe it either.
MAX_DIM = 2**31 - 1


def encode_tensor(array: np.ndarray) -> dict[str, Any]:
    """Encode an array as the protocol's TENSOR map ``{"dtype", "shape", "data"}``.

    Big-endian or non-contiguous input is converted; the data is the raw buffer (no copy when the
    array is already little-endian and C-contiguous).

    >>> encode_tensor(np.zeros((2, 3), np.float32))["shape"]
    [2, 3]
    """
    if not isinstance(array, np.ndarray):
        array = np.asarray(array)
    name = array.dtype.name
    if name not in DTYPES:
        raise ProtocolError(f"dtype {name!r} is not allowed; use one of {sorted(DTYPES)}", field="x.dtype")
    if array.ndim > MAX_RANK:
        raise ProtocolError(f"rank {array.ndim} exceeds {MAX_RANK}", field="x.shape")
    wire = DTYPES[name]
    if array.dtype != wire or not array.flags.c_contiguous:
        array = np.ascontiguousarray(array, dtype=wire)
    # memoryview.cast refuses views with a zero in their shape; an empty tensor has no bytes anyway.
    data = array.data.cast("B") if array.size else b""
    return {"dtype": name, "shape": list(array.shape), "data": data}


def check_tensor(
    obj: Any, *, field: str = "x", max_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> tuple[str, list[int], bytes | bytearray | memoryview, int]:
    """Validate a TENSOR map without building an array: ``(dtype, shape, data, element_count)``.

    The one rule set for tensors on the wire; :func:`decode_tensor` adds the numpy view. A store that
    keeps raw bytes (the cloud's dataset) uses this directly and never pays for an array.
    Raises ProtocolError (naming ``field``) for anything that is not a well-formed tensor.
    """
    if not isinstance(obj, dict):
        raise ProtocolError(f"expected a tensor map, got {type(obj).__name__}", field=field)
    dtype_name = obj.get("dtype")
    if not isinstance(dtype_name, str) or dtype_name not in DTYPES:
        raise ProtocolError(f"dtype {dtype_name!r} is not one of {sorted(DTYPES)}", field=f"{field}.dtype")
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise ProtocolError(f"shape must be a list of at most {MAX_RANK} ints", field=f"{field}.shape")
    extent = 1
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_DIM:
            raise ProtocolError(f"shape entries must be ints in [0, 2**31-1], got {shape!r:.80}",
                                field=f"{field}.shape")
        if dim:
            extent *= dim
    if extent > MAX_DIM:
        raise ProtocolError(f"the product of the non-zero dimensions of {shape} exceeds 2**31-1",
                            field=f"{field}.shape")
    data = obj.get("data")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"data must be binary, got {type(data).__name__}", field=f"{field}.data")
    count = math.prod(shape)
    expected = count * _ITEMSIZE[dtype_name]
    if expected > max_bytes:
        raise ProtocolError(
            f"tensor of {expected} bytes exceeds the limit of {max_bytes} bytes", field=f"{field}.shape"
        )
    if expected != len(data):
        raise ProtocolError(
            f"shape {shape} x {dtype_name} needs {expected} bytes, data has {len(data)}",
            field=f"{field}.data",
        )
    if dtype_name == "bool" and count and bytes(data).translate(None, b"\x00\x01"):
        raise ProtocolError("bool data must be 0 or 1 bytes", field=f"{field}.data")
    return dtype_name, shape, data, count


def decode_tensor(
    obj: Any, *, field: str = "x", max_bytes: int = DEFAULT_MAX_TENSOR_BYTES
) -> np.ndarray:
    """Decode a TENSOR map into a read-only numpy array that shares the payload's memory.

    Raises ProtocolError (naming ``field``) for anything that is not a well-formed tensor.
    """
    dtype_name, shape, data, count = check_tensor(obj, field=field, max_bytes=max_bytes)
    array = np.frombuffer(data, dtype=DTYPES[dtype_name], count=count).reshape(shape)
    array.flags.writeable = False
    return array
