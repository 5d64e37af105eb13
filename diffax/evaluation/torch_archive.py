"""Read PyTorch weight files without PyTorch: state dicts (.pth) and TorchScript modules (.pt).

Both are pickles whose tensors point at raw storages (PyTorch's serialization
format, torch/serialization.py):

* zip format (torch >= 1.6 `torch.save`, and every `torch.jit.save`): an archive
  `<name>/data.pkl` + `<name>/data/<key>` (one raw little-endian storage per key);
* legacy format (older `torch.save`): consecutive pickles (magic number, protocol,
  system info, the object, the storage keys), then each storage as an int64
  element count followed by its bytes.

The pickle is read by a restricted Unpickler: only the few globals a tensor
needs (`torch._utils._rebuild_tensor_v2`, storage types, OrderedDict) resolve,
each to a numpy stand-in; TorchScript module classes (`__torch__.*`) become plain
attribute holders; anything else is refused, so no code from the file runs.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from typing import Any, Callable

import numpy as np

_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_, "BFloat16Storage": "bfloat16",
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _Storage:
    """A lazily read raw storage: `array()` gives its elements as a flat numpy array."""

    def __init__(self, dtype: Any, read: Callable[[], bytes]):
        self.dtype, self._read, self._array = dtype, read, None

    def array(self) -> np.ndarray:
        if self._array is None:
            raw = self._read()
            if self.dtype == "bfloat16":  # the upper 16 bits of a float32
                self._array = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
            else:
                self._array = np.frombuffer(raw, np.dtype(self.dtype).newbyteorder("<")).astype(self.dtype)
        return self._array


class _Tensor:
    """A tensor as pickled: a view (offset, size, stride in elements) of a storage read later."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def array(self) -> np.ndarray:
        flat = self.storage.array()
        if not self.size:
            return np.array(flat[self.offset])
        itemsize = flat.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            flat[self.offset:], shape=self.size, strides=tuple(s * itemsize for s in self.stride)
        ).copy()


def _rebuild_parameter(data: _Tensor, *_: Any) -> _Tensor:
    return data


class ScriptObject:
    """A TorchScript module (or other `__torch__` object): its pickled attributes, in order."""

    _attrs: collections.OrderedDict  # set by __setstate__ (NEWOBJ does not call __init__)

    def __setstate__(self, state: Any) -> None:
        self._attrs = collections.OrderedDict(state if isinstance(state, dict) else {})


_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"): _Tensor,
    ("torch._utils", "_rebuild_tensor"): _Tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: io.BufferedIOBase, load_storage: Callable[[str, Any, int], _Storage], path: str):
        super().__init__(data)
        self._load_storage, self._storages, self._path = load_storage, {}, path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _GLOBALS:
            return _GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in _DTYPES:
            return _StorageType(name)
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to load {module}.{name}; only tensors, state dicts and TorchScript modules "
            "are read (a file that needs other code is not a weights file diffax understands)."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self._path}: unknown persistent id {pid!r}")
        storage_type, key, numel = pid[1], str(pid[2]), int(pid[4])
        if key not in self._storages:
            dtype = _DTYPES[storage_type.name] if isinstance(storage_type, _StorageType) else np.uint8
            self._storages[key] = self._load_storage(key, dtype, numel)
        return self._storages[key]


def _itemsize(dtype: Any) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _load_zip(path: str) -> Any:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkl:
            raise ValueError(f"{path}: a zip file but not a PyTorch archive (no <name>/data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        blobs = {n[len(prefix) + len("data/"):]: n for n in names if n.startswith(prefix + "data/")}

        def load_storage(key: str, dtype: Any, numel: int) -> _Storage:
            raw = z.read(blobs[key])
            return _Storage(dtype, lambda: raw[: numel * _itemsize(dtype)])

        return _materialise(_Unpickler(io.BytesIO(z.read(pkl[0])), load_storage, path).load())


def _load_legacy(path: str) -> Any:
    with open(path, "rb") as f:
        magic = pickle.load(f)
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path}: neither a zip archive nor a legacy PyTorch file (bad magic number)")
        pickle.load(f)  # protocol version
        pickle.load(f)  # system info (byte order, sizes)
        pending: dict[str, tuple[Any, list]] = {}

        def load_storage(key: str, dtype: Any, numel: int) -> _Storage:
            cell: list = []
            pending[key] = (dtype, cell)
            return _Storage(dtype, lambda: cell[0])

        obj = _Unpickler(f, load_storage, path).load()
        for key in pickle.load(f):  # the storages, in this order, each as int64 count + bytes
            dtype, cell = pending[str(key)]
            (numel,) = struct.unpack("<q", f.read(8))
            cell.append(f.read(numel * _itemsize(dtype)))
        return _materialise(obj)


def _materialise(obj: Any) -> Any:
    """Turn every pickled tensor into a numpy array (the storages' bytes are in hand), keeping the containers."""
    if isinstance(obj, _Tensor):
        return obj.array()
    if isinstance(obj, ScriptObject):
        for k, v in obj._attrs.items():
            obj._attrs[k] = _materialise(v)
        return obj
    if isinstance(obj, dict):
        return type(obj)((k, _materialise(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v) for v in obj)
    return obj


def load(path: str) -> Any:
    """Unpickle a PyTorch file (zip or legacy format) with tensors as numpy arrays."""
    if zipfile.is_zipfile(path):
        return _load_zip(path)
    return _load_legacy(path)


def flatten_tensors(obj: Any, prefix: str = "") -> dict[str, np.ndarray]:
    """{dotted name: array} of every tensor in a state dict or a TorchScript module tree.

    A state dict (possibly nested under 'state_dict') keeps its keys; a module
    contributes its parameters and buffers under its attribute path
    (`layers.mixed_10.tower_2_conv.beta`), as `Module.state_dict()` names them.
    """
    out: dict[str, np.ndarray] = {}
    items = obj._attrs.items() if isinstance(obj, ScriptObject) else obj.items() if isinstance(obj, dict) else ()
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, np.ndarray):
            out[name] = value
        elif isinstance(value, (ScriptObject, dict)):
            out.update(flatten_tensors(value, name + "."))
    return out


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of a PyTorch .pth state dict or TorchScript .pt file, by its state-dict name."""
    obj = load(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    tensors = flatten_tensors(obj)
    if not tensors:
        raise ValueError(f"{path}: no tensors found; expected a state dict or a TorchScript module")
    return tensors
