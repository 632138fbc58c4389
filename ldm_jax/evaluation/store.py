"""Per-batch evaluation results on disk, so a restarted evaluation skips the
batches it finished.

An evaluation's folder (`DIR/eval/<name>/`, the name fixed by everything that
decides the images) holds `settings.json` and one `batch_00000.npz` per sampled
batch with the metric inputs of its images (Inception pool3 and logits, CLIP
scores), each stamped with the fingerprint of the network that computed it. A
batch counts as done for a metric when its file holds that input from the same
network, so adding a metric later resamples only what is missing. Process 0
writes (atomically: a file is renamed into place when complete) and decides
which batches are done, for every process.
"""
import hashlib
import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils


def fingerprint(params) -> str:
  """A short hash of a parameter tree's first and last leaves: tells weights files
  apart without reading all of a large model."""
  leaves = jax.tree.leaves(params)
  h = hashlib.sha1()
  for leaf in (leaves[0], leaves[-1]):
    h.update(np.ascontiguousarray(np.asarray(leaf, np.float32)).tobytes())
  return h.hexdigest()[:12]


def digest(obj) -> str:
  """A short hash of a JSON-able object."""
  return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


class BatchStore:
  """The batch files of one evaluation.

  Args:
    folder: DIR/eval/<name>.
    settings: what decides the images (written to settings.json for a reader).
  """

  def __init__(self, folder: str, settings: dict):
    self.folder = folder
    if jax.process_index() == 0:
      os.makedirs(folder, exist_ok=True)
      with open(os.path.join(folder, "settings.json"), "w") as f:
        json.dump(settings, f, indent=1, sort_keys=True)

  def path(self, b: int) -> str:
    return os.path.join(self.folder, f"batch_{b:05d}.npz")

  def _has(self, b: int, needs: dict) -> bool:
    try:
      with np.load(self.path(b)) as f:
        return all(k in f.files and f"{k}_by" in f.files and str(f[f"{k}_by"]) == by
                   for k, by in needs.items())
    except (OSError, ValueError, EOFError):  # absent, or cut short by a crash
      return False

  def done(self, num_batches: int, needs: dict) -> np.ndarray:
    """(num_batches,) bool: the batches whose file holds every input `needs` names.

    Args:
      needs: input name -> the fingerprint of the network that must have made it.
    """
    mask = np.zeros(num_batches, np.int32)
    if jax.process_index() == 0:
      mask[:] = [self._has(b, needs) for b in range(num_batches)]
    if jax.process_count() > 1:
      mask = np.asarray(multihost_utils.broadcast_one_to_all(mask))
    return mask.astype(bool)

  def save(self, b: int, arrays: dict, made_by: dict) -> None:
    """Writes batch `b`'s arrays, each with its network's fingerprint (process 0)."""
    if jax.process_index() != 0:
      return
    out = dict(arrays, **{f"{k}_by": np.asarray(made_by[k]) for k in arrays})
    tmp = self.path(b) + ".tmp.npz"
    np.savez(tmp, **out)
    os.replace(tmp, self.path(b))

  def load(self, b: int, keys) -> dict:
    with np.load(self.path(b)) as f:
      return {k: f[k] for k in keys}
