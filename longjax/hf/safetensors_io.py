"""The safetensors file format, read and written with NumPy alone.

A safetensors file is an 8-byte little-endian header length, a JSON header
mapping each tensor name to `{dtype, shape, data_offsets}` (plus an optional
`__metadata__` of strings), then the raw little-endian tensor bytes.
`safetensors.numpy` cannot load bfloat16; here BF16 maps to
`ml_dtypes.bfloat16`, which NumPy and JAX both understand.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}
# A header longer than this is not a safetensors file (the reference reader's own bound).
_MAX_HEADER_BYTES = 100_000_000


def read_safetensors(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Reads every tensor of a safetensors file.

    Args:
      path: the `.safetensors` file.

    Returns:
      `(tensors, metadata)`: name -> NumPy array (own memory, not a view of
      the file) and the header's `__metadata__` (empty if absent).

    Raises:
      ValueError naming the file (and the tensor) when the header is malformed,
      a dtype is unknown, or a tensor's bytes do not match its shape.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > _MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header length {header_len})")
        header_bytes = f.read(header_len)
        data = f.read()
    try:
        header = json.loads(header_bytes)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    tensors = {}
    for name, entry in header.items():
        missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
        if missing:
            raise ValueError(f"{path}: tensor {name!r} lacks {missing} in the header")
        if entry["dtype"] not in _DTYPES:
            raise ValueError(
                f"{path}: tensor {name!r} has dtype {entry['dtype']!r}, expected one of {sorted(_DTYPES)}"
            )
        dtype = _DTYPES[entry["dtype"]]
        shape = tuple(int(n) for n in entry["shape"])
        begin, end = (int(n) for n in entry["data_offsets"])
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != nbytes:
            raise ValueError(
                f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}, {nbytes} bytes) has data_offsets "
                f"[{begin}, {end}] in a data section of {len(data)} bytes"
            )
        flat = np.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=begin)
        tensors[name] = flat.reshape(shape).copy()
    return tensors, dict(metadata)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes `tensors` (name -> array) as a safetensors file, in name order.

    Args:
      path: the file to write.
      tensors: arrays of float64/32/16, bfloat16, int64/32/16/8, uint8 or bool.
      metadata: string -> string, stored as `__metadata__` (Hugging Face
        writes `{"format": "pt"}`, which transformers expects).
    """
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks, offset = [], 0
    for name in sorted(tensors):
        array = np.asarray(tensors[name])
        dtype = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
        if dtype not in _NAMES:
            raise ValueError(f"tensors[{name!r}] has dtype {array.dtype}, expected one of {sorted(map(str, _NAMES))}")
        raw = np.ascontiguousarray(array, dtype=dtype).tobytes()
        header[name] = {"dtype": _NAMES[dtype], "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    # The data section starts 8-byte aligned, as the reference writer pads it.
    header_bytes += b" " * (-len(header_bytes) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for raw in chunks:
            f.write(raw)
