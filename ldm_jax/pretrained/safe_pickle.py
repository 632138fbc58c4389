"""Reads PyTorch pickles (`.ckpt`, `.bin`, `.pt`) of tensors without running their code.

A pickle is a program: unpickling calls whatever functions it names, so a
checkpoint can run code on the machine that loads it. This reader executes none of
it. Its unpickler resolves only the names that describe tensors -- torch's
`_rebuild_tensor_v2` / `_rebuild_parameter`, the typed storage classes,
`collections.OrderedDict`, `_codecs.encode` -- to functions of this module, and
refuses every other global with `UnsafePickleError` before anything is called.
Tensors come back as numpy arrays (bfloat16 via ml_dtypes), so reading needs no
torch: the same answer as `torch.load(path, weights_only=True)`, torch or not.

Both of torch's formats are read: the zip archive of `torch.save` since 1.6
(`<name>/data.pkl` + one raw file per storage) and the older stream (magic
number, protocol, system info, the pickle, then every storage's bytes).
"""
import codecs
import collections
import io
import pickle
import struct
import zipfile
from typing import IO, Any, Union

import ml_dtypes
import numpy as np

_LEGACY_MAGIC = 0x1950a86a20f9469cfc6c
_STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class UnsafePickleError(pickle.UnpicklingError):
  """The pickle names a function or class that is not part of a tensor's description."""


class _StorageType:
  """Stands for `torch.<X>Storage`: only its element type is used."""

  def __init__(self, name: str):
    self.name, self.dtype = name, np.dtype(_STORAGE_DTYPES[name])


class _Storage:
  """A storage whose bytes are read after unpickling (the legacy format stores them last)."""

  def __init__(self, dtype, numel: int):
    self.dtype, self.numel, self.array = dtype, numel, None


class _Tensor:
  """A strided view of a `_Storage`, materialised once the storage's bytes are known."""

  def __init__(self, storage, offset, size, stride):
    self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

  def materialise(self) -> np.ndarray:
    base = self.storage.array
    if not self.size:
      return np.array(base[self.offset])
    item = base.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(base[self.offset:], self.size,
                                           [s * item for s in self.stride])
    return np.array(view)  # a contiguous copy, independent of the storage


def _rebuild_tensor(storage, storage_offset, size, stride, *_):
  return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, *_):
  return data


def _codecs_encode(text, encoding="utf-8"):
  # Protocol-2 pickles write bytes as _codecs.encode(str, 'latin1'); a pure function.
  return codecs.encode(text, encoding)


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): _codecs_encode,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
  """Resolves only tensor-describing globals; storages come from `load_storage`."""

  def __init__(self, file, load_storage, what: str):
    super().__init__(file)
    self._load_storage, self._what = load_storage, what

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    raise UnsafePickleError(
        f"{self._what}: refused to unpickle {module}.{name}: the file holds more than tensors "
        "and loading it would run code it names. Load it only if you trust it (torch.load("
        "weights_only=False)) and save its state dict as .safetensors")

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
      raise UnsafePickleError(f"{self._what}: unknown persistent id {pid!r:.80}")
    return self._load_storage(pid)


def _materialise(obj):
  if isinstance(obj, _Tensor):
    return obj.materialise()
  if isinstance(obj, dict):
    return type(obj)((k, _materialise(v)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_materialise(v) for v in obj)
  return obj


def _load_zip(f: IO[bytes], what: str):
  with zipfile.ZipFile(f) as z:
    names = z.namelist()
    pkl = [n for n in names if n.endswith("data.pkl")]
    if len(pkl) != 1:
      raise ValueError(f"{what}: a torch zip archive has one data.pkl, found {len(pkl)}")
    prefix = pkl[0][:-len("data.pkl")]
    if prefix + "byteorder" in names and z.read(prefix + "byteorder").strip() != b"little":
      raise ValueError(f"{what}: big-endian tensors are not supported")
    storages = {}

    def load_storage(pid):
      _, stype, key, _, numel = pid[:5]
      if key not in storages:
        s = _Storage(stype.dtype, numel)
        s.array = np.frombuffer(z.read(f"{prefix}data/{key}"), stype.dtype)
        storages[key] = s
      return storages[key]

    obj = _Unpickler(io.BytesIO(z.read(pkl[0])), load_storage, what).load()
    return _materialise(obj)


def _load_legacy(f: IO[bytes], what: str):
  def no_storage(pid):
    raise UnsafePickleError(f"{what}: a storage outside the main pickle")

  def restricted(stream):
    return _Unpickler(stream, no_storage, what).load()

  if restricted(f) != _LEGACY_MAGIC:
    raise ValueError(f"{what}: not a PyTorch checkpoint (no zip archive, no legacy magic number)")
  restricted(f)  # protocol version
  restricted(f)  # system info: byte order, type sizes
  storages = {}

  def load_storage(pid):
    _, stype, key, _, numel, view = pid
    if key not in storages:
      storages[key] = _Storage(stype.dtype, numel)
    if view is not None:  # a view of a larger storage (very old files)
      raise ValueError(f"{what}: storage views of the pre-1.0 format are not supported")
    return storages[key]

  obj = _Unpickler(f, load_storage, what).load()
  for key in restricted(f):
    s = storages[key]
    numel = struct.unpack("<q", f.read(8))[0]
    s.array = np.frombuffer(f.read(numel * s.dtype.itemsize), s.dtype)
  return _materialise(obj)


def load(source: Union[str, IO[bytes]], what: str = "") -> Any:
  """Unpickles a torch checkpoint without executing its code.

  Args:
    source: a local path or a binary file object (seekable, e.g. an fsspec file).
    what: a name for error messages (default: the path).

  Returns:
    The pickled object with every tensor as a numpy array.

  Raises:
    UnsafePickleError: the pickle names anything but tensors, storages and plain
      containers (nothing it names has been called).
  """
  what = what or (source if isinstance(source, str) else getattr(source, "name", "pickle"))
  if isinstance(source, str):
    with open(source, "rb") as f:
      return load(f, what)
  start = source.tell()
  is_zip = zipfile.is_zipfile(source)
  source.seek(start)
  return _load_zip(source, what) if is_zip else _load_legacy(source, what)
