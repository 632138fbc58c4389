"""The latent cache: encode a dataset once with a trained first stage into
webdataset shards of latents, so stage 2 on large data skips the autoencoder.

Each sample holds key.npy (the unscaled latent z, float16 by default), key.txt
(the caption) and key.json (label and source key). Stage 2 reads them through the
same reader with `config.data.source = 'latents'` (batches carry `latent`).
"""
import io
import json
import os
import tarfile
from typing import Callable, Iterable

import numpy as np


def _add(tar, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_latent_shards(batches: Iterable[dict], encode_fn: Callable, out_dir: str, *,
                        num_batches: int, shard_size: int = 1000, dtype=np.float16,
                        prefix: str = "latents") -> str:
  """Encodes `num_batches` batches and writes them as shards; returns their pattern.

  Args:
    batches: an iterator of host batches {image, caption, label}.
    encode_fn: numpy images (B, H, W, 3) in [-1, 1] -> numpy latents (B, h, w, c).
    out_dir: the folder for `{prefix}-00000.tar` ...
    num_batches: how many batches to encode.
    shard_size: samples per shard.
    dtype: storage dtype of the latents.
  """
  os.makedirs(out_dir, exist_ok=True)
  shard, in_shard, index, tar = 0, 0, 0, None

  def open_shard(i):
    return tarfile.open(os.path.join(out_dir, f"{prefix}-{i:05d}.tar.tmp"), "w")

  def close_shard(t, i):
    t.close()
    base = os.path.join(out_dir, f"{prefix}-{i:05d}.tar")
    os.replace(base + ".tmp", base)

  it = iter(batches)
  for _ in range(num_batches):
    batch = next(it)
    z = np.asarray(encode_fn(batch["image"]))
    for j in range(len(z)):
      if tar is None:
        tar = open_shard(shard)
      key = f"{index:09d}"
      buf = io.BytesIO()
      np.save(buf, z[j].astype(dtype))
      _add(tar, key + ".npy", buf.getvalue())
      _add(tar, key + ".txt", str(batch["caption"][j]).encode())
      label = int(batch["label"][j]) if "label" in batch else -1
      _add(tar, key + ".json", json.dumps({"label": label}).encode())
      index, in_shard = index + 1, in_shard + 1
      if in_shard == shard_size:
        close_shard(tar, shard)
        tar, shard, in_shard = None, shard + 1, 0
  if tar is not None:
    close_shard(tar, shard)
    shard += 1
  return os.path.join(out_dir, f"{prefix}-{{{0:05d}..{shard - 1:05d}}}.tar")
