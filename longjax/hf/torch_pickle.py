"""Legacy PyTorch `pytorch_model.bin` files, read into NumPy without torch.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle of the state
dict in which every tensor is a call of `torch._utils._rebuild_tensor_v2` on a
persistent storage reference `('storage', <typed storage class>, key, device,
numel)`, and the storages' raw bytes as `<name>/data/<key>`. A pickle can run
any code, so the unpickler here resolves only the handful of globals a state
dict needs, each to a NumPy builder, and refuses every other global by name.
"""

from __future__ import annotations

import collections
import os
import pickle
import zipfile

import ml_dtypes
import numpy as np

# torch's legacy typed storage classes, which the pickle names, and their element types.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype("<f8"),
    "FloatStorage": np.dtype("<f4"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


class _StorageType:
    """Stands for one torch storage class inside the pickle: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None, metadata=None):
    """NumPy's version of torch._utils._rebuild_tensor_v2: a strided view of the storage, copied."""
    del requires_grad, backward_hooks, metadata
    itemsize = storage.dtype.itemsize
    if not size:
        return np.array(storage[storage_offset])
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if all(size) and last >= storage.size:
        raise ValueError(f"tensor of size {tuple(size)} and stride {tuple(stride)} runs past its storage ({storage.size})")
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.array(view)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
    del requires_grad, backward_hooks
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, path: str):
        super().__init__(file)
        self._archive, self._prefix, self._path = archive, prefix, path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to load global {module}.{name}: a weights file holds only tensors "
            f"(allowed: {sorted(f'{m}.{n}' for m, n in _ALLOWED)} and torch's typed storages)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent reference {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"{self._path}: storage {key!r} has type {storage_type!r}")
        if key not in self._storages:
            member = f"{self._prefix}data/{key}"
            try:
                raw = self._archive.read(member)
            except KeyError:
                raise ValueError(f"{self._path}: storage {member!r} is missing from the archive") from None
            if len(raw) != numel * storage_type.dtype.itemsize:
                raise ValueError(
                    f"{self._path}: storage {member!r} has {len(raw)} bytes, expected {numel} "
                    f"{storage_type.name} elements"
                )
            self._storages[key] = np.frombuffer(raw, dtype=storage_type.dtype)
        return self._storages[key]


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d state dict (zip format, torch >= 1.6) as name -> NumPy array.

    Tensors sharing storage (tied weights) come back as separate copies.

    Raises:
      ValueError naming the file for a legacy non-zip file, a missing
      `data.pkl`, a big-endian archive or a state dict that is not a mapping of
      tensors; pickle.UnpicklingError naming any global other than the tensor
      rebuilders.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path}: not a zip-format torch checkpoint (torch.save before torch 1.6, or not a torch file); "
            "re-save it with a current torch or convert it to safetensors"
        )
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pickles) != 1:
            raise ValueError(f"{path}: expected one data.pkl in the archive, found {pickles}")
        prefix = pickles[0][: -len("data.pkl")]
        if f"{prefix}byteorder" in archive.namelist() and archive.read(f"{prefix}byteorder").strip() != b"little":
            raise ValueError(f"{path}: big-endian torch archives are not supported")
        with archive.open(pickles[0]) as f:
            state = _StateDictUnpickler(f, archive, prefix, path).load()
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict (a mapping of names to tensors), got {type(state).__name__}")
    tensors, seen = {}, set()
    for name, value in state.items():
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{path}: entry {name!r} is a {type(value).__name__}, expected a tensor")
        # One tensor saved under two names unpickles as one object: give each name its own.
        tensors[name] = value.copy() if id(value) in seen else value
        seen.add(id(value))
    return tensors
