"""The latent cache: a dataset encoded once by a trained first stage, as webdataset
shards of latents, so stage 2 skips the autoencoder in every step.

Each sample holds key.npy (the unscaled latent z, or the posterior mean of a KL
first stage that samples; float16 by default), optionally key.std.npy (the
posterior standard deviation, so stage 2 can draw a fresh z = mean + std * eps
each time it sees the sample), key.txt (the caption) and key.json (label and
source key). Stage 2 reads them through the same reader with
`config.data.source = 'latents'` (batches carry `latent`, and `latent_std` when
stored). `ldm_jax/training/latent_cache.py` builds a cache during a run.
"""
import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Callable, Iterable, Optional

import numpy as np

from ldm_jax import storage
from ldm_jax.data.shards import add_member


def _npy(a: np.ndarray) -> bytes:
  buf = io.BytesIO()
  np.save(buf, a)
  return buf.getvalue()


class LatentShardWriter:
  """Streams samples into `{prefix}-00000.tar`, ...; a shard appears under its
  final name only once complete. `out_dir` is a local folder or an fsspec URL
  (gs://...: each shard is written locally, then uploaded)."""

  def __init__(self, out_dir: str, *, prefix: str = "latents", shard_size: int = 1000,
               dtype=np.float16):
    self.out_dir, self.prefix, self.shard_size, self.dtype = out_dir, prefix, shard_size, dtype
    self.remote = storage.is_url(out_dir)
    self._local = tempfile.mkdtemp(prefix="latents-") if self.remote else out_dir
    os.makedirs(self._local, exist_ok=True)
    self.count, self.shards, self._in_shard, self._tar = 0, 0, 0, None

  def _path(self, i: int) -> str:
    return os.path.join(self._local, f"{self.prefix}-{i:05d}.tar")

  def add(self, z: np.ndarray, caption: str, label: int = -1, std: Optional[np.ndarray] = None,
          meta: Optional[dict] = None) -> None:
    if self._tar is None:
      self._tar = tarfile.open(self._path(self.shards) + ".tmp", "w")
    key = f"{self.count:09d}"
    add_member(self._tar, key + ".npy", _npy(np.asarray(z).astype(self.dtype)))
    if std is not None:
      add_member(self._tar, key + ".std.npy", _npy(np.asarray(std).astype(self.dtype)))
    add_member(self._tar, key + ".txt", str(caption).encode())
    add_member(self._tar, key + ".json", json.dumps(dict(meta or {}, label=int(label))).encode())
    self.count, self._in_shard = self.count + 1, self._in_shard + 1
    if self._in_shard == self.shard_size:
      self._close_shard()

  def _close_shard(self) -> None:
    self._tar.close()
    local = self._path(self.shards)
    os.replace(local + ".tmp", local)
    if self.remote:
      with open(local, "rb") as src, storage.open(
          storage.join(self.out_dir, os.path.basename(local)), "wb") as dst:
        shutil.copyfileobj(src, dst)
      os.remove(local)
    self._tar, self.shards, self._in_shard = None, self.shards + 1, 0

  def close(self) -> str:
    """Finishes the last shard; returns the brace pattern of all shards ('' if none)."""
    if self._tar is not None:
      self._close_shard()
    if self.remote:
      shutil.rmtree(self._local, ignore_errors=True)
    if not self.shards:
      return ""
    return f"{self.out_dir}/{self.prefix}-{{{0:05d}..{self.shards - 1:05d}}}.tar"


def write_latent_shards(batches: Iterable[dict], encode_fn: Callable, out_dir: str, *,
                        num_batches: int, shard_size: int = 1000, dtype=np.float16,
                        prefix: str = "latents") -> str:
  """Encodes `num_batches` host batches and writes them as shards; returns their pattern.

  Args:
    batches: an iterator of host batches {image, caption, label}.
    encode_fn: numpy images (B, H, W, 3) in [-1, 1] -> numpy latents (B, h, w, c).
    out_dir: the folder for `{prefix}-00000.tar` ...
    num_batches: how many batches to encode.
    shard_size: samples per shard.
    dtype: storage dtype of the latents.
  """
  writer = LatentShardWriter(out_dir, prefix=prefix, shard_size=shard_size, dtype=dtype)
  it = iter(batches)
  for _ in range(num_batches):
    batch = next(it)
    z = np.asarray(encode_fn(batch["image"]))
    for j in range(len(z)):
      label = int(batch["label"][j]) if "label" in batch else -1
      writer.add(z[j], batch["caption"][j], label)
  return writer.close()
