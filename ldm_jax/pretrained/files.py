"""The files of a pretrained model, local or at any fsspec URL, and its weights as numpy.

Weights are read from `.safetensors` (parsed here: safetensors' numpy API has no
bfloat16 and reads only local paths, while this reads bfloat16 through ml_dtypes,
from any file object, and only the tensors asked for) or from torch pickles
through `safe_pickle`, which runs none of their code. Nothing needs torch.
"""
import atexit
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, Optional

import fsspec
import ml_dtypes
import numpy as np

from ldm_jax.pretrained import safe_pickle

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".bin", ".pt", ".pth")
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


def join(path: str, *parts: str) -> str:
  """`os.path.join` for local paths and URLs alike."""
  return "/".join([path.rstrip("/"), *parts]) if "://" in path else os.path.join(path, *parts)


def _fs(path: str):
  return fsspec.core.url_to_fs(path)


def isfile(path: str) -> bool:
  fs, p = _fs(path)
  return fs.isfile(p)


def isdir(path: str) -> bool:
  fs, p = _fs(path)
  return fs.isdir(p)


def read_json(path: str) -> dict:
  with fsspec.open(path, "r") as f:
    return json.load(f)


def _read_safetensors(f, keep: Callable[[str], bool]) -> Dict[str, np.ndarray]:
  n = int(np.frombuffer(f.read(8), "<u8")[0])
  header = json.loads(f.read(n))
  header.pop("__metadata__", None)
  base = 8 + n
  out = {}
  for key, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
    if not keep(key):
      continue
    if info["dtype"] not in _SAFETENSORS_DTYPES:
      raise ValueError(f"tensor {key}: safetensors dtype {info['dtype']} is not supported")
    start, end = info["data_offsets"]
    f.seek(base + start)
    dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]]).newbyteorder("<")
    out[key] = np.frombuffer(f.read(end - start), dtype).reshape(info["shape"])
  return out


def read_weights(path: str, keep: Optional[Callable[[str], bool]] = None) -> Dict[str, np.ndarray]:
  """A weight file as {name: numpy array} in its stored dtype.

  Args:
    path: a `.safetensors` file or a torch pickle (`.ckpt`, `.bin`, `.pt`, `.pth`);
      a CompVis `{'state_dict': ...}` wrapper is unwrapped.
    keep: reads only the names it accepts (safetensors reads nothing else).

  Raises:
    safe_pickle.UnsafePickleError: a pickle that names anything but tensors.
  """
  keep = keep or (lambda key: True)
  if not path.endswith(WEIGHT_SUFFIXES):
    raise ValueError(f"{path}: not a weight file (expected one of {WEIGHT_SUFFIXES})")
  if not isfile(path):
    raise FileNotFoundError(f"{path}: no such file")
  with fsspec.open(path, "rb") as f:
    if path.endswith(".safetensors"):
      return _read_safetensors(f, keep)
    sd = safe_pickle.load(f, what=path)
  while isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
    sd = sd["state_dict"]
  if not isinstance(sd, dict):
    raise ValueError(f"{path}: holds a {type(sd).__name__}, not a state dict")
  return {k: v for k, v in sd.items() if isinstance(v, np.ndarray) and keep(k)}


def local_folder(path: str) -> str:
  """`path` itself if local, else a temporary local copy of the folder (transformers'
  tokenizer reads local files only)."""
  if "://" not in path:
    return path
  fs, p = _fs(path)
  tmp = tempfile.mkdtemp(prefix="ldm_jax_tokenizer_")
  atexit.register(shutil.rmtree, tmp, True)
  for name in fs.ls(p, detail=False):
    if fs.isfile(name):
      with fs.open(name, "rb") as src, open(os.path.join(tmp, os.path.basename(name)), "wb") as dst:
        shutil.copyfileobj(src, dst)
  return tmp
