"""PyTorch state dicts -> flax parameter trees, by one naming rule.

ldm_jax modules name their submodules after the diffusers / transformers
modules they mirror, with list indices joined by an underscore. So the torch key
`down_blocks.0.resnets.1.conv1.weight` is the flax path
`down_blocks_0/resnets_1/conv1/kernel`, and one rule converts every model:

  * a numeric segment joins the segment before it (`resnets.1` -> `resnets_1`);
  * the leaf `weight` becomes whichever of `kernel`, `scale`, `embedding` the
    flax tree has at that place; other leaf names are kept;
  * conv kernels go OIHW -> HWIO, linear kernels (out, in) -> (in, out), and a
    1x1 conv kernel fills a dense kernel (or the reverse) by reshaping.

Shapes are checked against a template tree (real or `jax.eval_shape`d), so a
checkpoint of another configuration fails with the names of the mismatches.
"""
import re
from typing import Callable, Iterable, Mapping, Optional, Sequence

import flax
import flax.linen
import jax
import numpy as np

_WEIGHT_NAMES = ("kernel", "scale", "embedding")


def torch_key_to_path(key: str) -> tuple:
  """`a.b.0.c.weight` -> ('a', 'b_0', 'c', 'weight')."""
  out = []
  for seg in key.split("."):
    if seg.isdigit() and out:
      out[-1] = f"{out[-1]}_{seg}"
    else:
      out.append(seg)
  return tuple(out)


def _to_numpy(v) -> np.ndarray:
  if hasattr(v, "detach"):  # a torch tensor, without importing torch
    v = v.detach().cpu().float().numpy()
  return np.asarray(v, dtype=np.float32)


def _convert_leaf(w: np.ndarray, leaf: str, shape: tuple) -> np.ndarray:
  if leaf == "kernel":
    if w.ndim == 4:
      w = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    elif w.ndim == 2:
      w = w.T
  if w.shape != tuple(shape) and w.size == int(np.prod(shape)):
    # 1x1 conv <-> dense: (1, 1, in, out) <-> (in, out)
    squeezed = [d for d in w.shape if d != 1]
    if squeezed == [d for d in shape if d != 1]:
      w = w.reshape(shape)
  return w


def torch_to_flax(state_dict: Mapping[str, object], template, *,
                  rename: Optional[Callable[[str], Optional[str]]] = None,
                  ignore: Iterable[str] = (), strict: bool = True, what: str = "checkpoint"):
  """Converts a torch state dict to a flax parameter tree shaped like `template`.

  Args:
    state_dict: torch key -> tensor or array.
    template: a flax params tree (arrays or ShapeDtypeStructs) fixing names and shapes.
    rename: optional key -> key (or None to drop) applied before the naming rule;
      how other layouts (CompVis single files) reach the diffusers names.
    ignore: regexes of torch keys to skip (buffers such as `position_ids`).
    strict: if True, every template leaf must be filled and every key used.
    what: a name for the source, used in error messages.

  Returns:
    A nested dict of float32 numpy arrays with the template's structure.
  """
  is_box = lambda x: isinstance(x, flax.linen.meta.AxisMetadata)
  template = jax.tree.map(lambda x: x.value if is_box(x) else x, template, is_leaf=is_box)
  flat_t = flax.traverse_util.flatten_dict(flax.core.unfreeze(template))
  ignore = [re.compile(p) for p in ignore]
  out, unused, mismatched = {}, [], []
  for key, value in state_dict.items():
    if rename is not None:
      key = rename(key)
      if key is None:
        continue
    if any(p.search(key) for p in ignore):
      continue
    path = torch_key_to_path(key)
    if path[-1] == "weight":
      cands = [path[:-1] + (n,) for n in _WEIGHT_NAMES if path[:-1] + (n,) in flat_t]
      path = cands[0] if cands else path
    if path not in flat_t:
      unused.append(key)
      continue
    shape = tuple(flat_t[path].shape)
    w = _convert_leaf(_to_numpy(value), path[-1], shape)
    if w.shape != shape:
      mismatched.append(f"{key}: {tuple(w.shape)} vs expected {shape} at {'/'.join(path)}")
      continue
    out[path] = w
  missing = ["/".join(p) for p in flat_t if p not in out]
  problems = []
  if mismatched:
    problems.append("shape mismatches:\n  " + "\n  ".join(mismatched[:20]))
  if strict and missing:
    problems.append(f"{len(missing)} parameters missing from the {what}, e.g. " + ", ".join(missing[:10]))
  if strict and unused:
    problems.append(f"{len(unused)} {what} keys with no parameter, e.g. " + ", ".join(unused[:10]))
  if problems:
    raise ValueError(f"{what} does not fit the model configuration: " + "; ".join(problems))
  return flax.traverse_util.unflatten_dict(out)


# Flax module names whose "_<digits>" ending is part of the torch name, not a list index.
_NAMES_WITH_DIGITS = ("linear_1", "linear_2")
_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "embedding": "weight"}


def path_to_torch_key(path: Sequence[str]) -> str:
  """('down_blocks_0', 'resnets_1', 'conv1', 'kernel') -> 'down_blocks.0.resnets.1.conv1.weight',
  the inverse of `torch_key_to_path` plus the leaf rule."""
  out = []
  for seg in path[:-1]:
    m = re.fullmatch(r"(.+)_(\d+)", seg)
    out.append(f"{m.group(1)}.{m.group(2)}" if m and seg not in _NAMES_WITH_DIGITS else seg)
  return ".".join(out + [_TORCH_LEAF.get(path[-1], path[-1])])


def flax_to_torch(params) -> dict:
  """A flax parameter tree as a torch-layout state dict of numpy float32 arrays (the
  inverse of `torch_to_flax` without a rename): kernels HWIO -> OIHW, (in, out) -> (out, in).
  """
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  out = {}
  for path, v in flat.items():
    w = np.asarray(jax.device_get(v), np.float32)
    if path[-1] == "kernel":
      w = w.transpose(3, 2, 0, 1) if w.ndim == 4 else w.T
    out[path_to_torch_key(path)] = np.ascontiguousarray(w)
  return out


def load_torch_file(path: str) -> dict:
  """Reads a `.safetensors` file, or a `.ckpt`/`.bin`/`.pt` pickle through a reader
  that runs none of its code (`ldm_jax.pretrained.safe_pickle`; a pickle can
  otherwise run code when loaded). Local paths or fsspec URLs; no torch needed.

  Returns:
    key -> numpy float32 array; a CompVis `{'state_dict': ...}` wrapper is unwrapped.
  """
  from ldm_jax.pretrained import files  # the pretrained package imports this module
  return {k: np.asarray(v, np.float32) for k, v in files.read_weights(path).items()}
