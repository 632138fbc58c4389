"""Stage 2's latent cache: encode the training set once, then train on latents.

The first stage is frozen in stage 2, so E(x) of a training image never changes;
encoding each image in every step (as the reference does) spends the encoder's
forward pass again each epoch. With `config.stage2.latent_cache = True` the run
encodes one pass of its training data (each process its own shards, batches
sharded over the whole mesh) into `<stage-2 workdir>/latents/` before the first
stage-2 step, and stage 2 reads those shards (`data.source = 'latents'`).

A KL first stage that samples its posterior (`stage1.sample_posterior`) stores
the mean and the standard deviation, and stage 2 draws a fresh z each time a
sample comes round, as it would from images. Data augmentation (random crops,
flips) is frozen at the pass that encoded it, so the cache suits data without it.

The cache is complete when `done.json` exists and names the same data, stage-1
config and stage-1 checkpoint step as the run; otherwise it is (re)built. An
interrupted build starts over.
"""
import json
import logging
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from ldm_jax import config_lib, parallel, storage
from ldm_jax.console import progress
from ldm_jax.data import make_iterator
from ldm_jax.data.latents import LatentShardWriter
from ldm_jax.training.step import OnePassIterator

log = logging.getLogger("ldm_jax")
DONE = "done.json"


def check_config(config) -> None:
  """Fails before any work, naming the field, where a cache cannot stand in for images."""
  if not config.stage2.get("latent_cache", False):
    return
  if config.data.source not in ("shapes", "wds"):
    raise ValueError(f"config.stage2.latent_cache needs image shards (data.source shapes or wds), "
                     f"got data.source={config.data.source!r}")
  if config.stage2.conditioning.concat != "none":
    raise ValueError(f"config.stage2.latent_cache: concat conditioning "
                     f"'{config.stage2.conditioning.concat}' needs the images in every batch")
  if config.data.crop == "random" or config.data.flip:
    log.warning("config.stage2.latent_cache: data.crop=%r / data.flip=%r are frozen at the "
                "pass that encodes the cache", config.data.crop, config.data.flip)


def _signature(config, source: dict) -> dict:
  """What the cached latents depend on: the data, the stage-1 config and the
  weights (`source`: where the first stage's weights came from, e.g. its step)."""
  d = config_lib.to_dict(config)
  data = {k: v for k, v in d["data"].items() if k not in ("workers", "shuffle_buffer", "cache_dir")}
  return {"data": data, "stage1": d["stage1"], "first_stage": source}


def cached_pattern(out_dir: str, config, source: dict) -> str:
  """The shards' pattern when `out_dir` holds a complete cache for `config` and
  the first stage `source` (`FirstStage.source`), else ''."""
  path = storage.join(out_dir, DONE)
  if not storage.exists(path):
    return ""
  done = storage.read_json(path)
  if done.get("signature") != json.loads(json.dumps(_signature(config, source))):
    log.info("latent cache in %s was made from other data or another first stage; rebuilding",
             out_dir)
    return ""
  return done["pattern"]


def build(config, encode: Callable, mesh, out_dir: str, *, batch_size: int, source: dict) -> str:
  """Encodes one pass of `config.data` into shards in `out_dir` (a folder all
  processes see: shared disk or an fsspec URL); returns their pattern.

  Args:
    config: the stage-2 config (its `data` is read; `stage1.sample_posterior`
      decides whether the posterior's std is stored).
    encode: jitted (global images (B, H, W, 3) in [-1, 1]) -> (mean, std) global
      arrays (B, h, w, c); std None for a deterministic encoder.
    mesh: the mesh the images are sharded over (batch over data x fsdp).
    out_dir: the cache folder (shared by all processes).
    batch_size: global batch of the encoding pass.
    source: where the first stage's weights came from (`FirstStage.source`),
      recorded so that a cache of other weights is rebuilt.
  """
  pattern = cached_pattern(out_dir, config, source)
  if pattern:
    return pattern
  p, n = jax.process_index(), jax.process_count()
  if p == 0:
    storage.remove(out_dir, recursive=True)  # a stale or partial cache
  multihost_utils.sync_global_devices("latent_cache_clear")
  per_process = parallel.check_batch(batch_size, mesh)
  it = make_iterator(config.data, batch_size=per_process, process_index=p, process_count=n,
                     seed=config.seed)
  if not isinstance(it, OnePassIterator):
    raise ValueError(f"config.stage2.latent_cache: data.source={config.data.source!r} "
                     "cannot be read in one pass")
  examples = it.one_epoch()
  writer = LatentShardWriter(out_dir, prefix=f"latents-p{p:03d}")
  bar = progress(desc="latent cache", unit="img")
  while True:
    chunk = [ex for _, ex in zip(range(per_process), examples)]
    # Every process runs the sharded encoder equally often: stop when all are done.
    left = multihost_utils.process_allgather(np.array([len(chunk)], np.int32))
    if int(np.max(left)) == 0:
      break
    images = np.zeros((per_process,) + (config.data.resolution,) * 2 + (3,), np.float32)
    for i, ex in enumerate(chunk):
      images[i] = ex["image"]
    mean, std = encode(parallel.global_batch({"image": images}, mesh)["image"])
    mean = _local_rows(mean)
    std = None if std is None else _local_rows(std)
    for i, ex in enumerate(chunk):
      writer.add(mean[i], ex["caption"], ex["label"], None if std is None else std[i])
    bar.update(len(chunk))
  bar.close()
  writer.close()
  count = int(np.sum(multihost_utils.process_allgather(np.array([writer.count], np.int64))))
  stats = it.stats()
  if count == 0:
    raise ValueError(f"config.stage2.latent_cache: no readable training sample in "
                     f"config.data (skipped: {stats})")
  pattern = f"{out_dir}/latents-p*.tar"
  multihost_utils.sync_global_devices("latent_cache_written")
  if p == 0:
    storage.write_json(storage.join(out_dir, DONE), {
        "pattern": pattern, "count": count, "skipped": stats,
        "signature": _signature(config, source)})
  multihost_utils.sync_global_devices("latent_cache_done")
  log.info("latent cache: %d samples encoded into %s%s", count, out_dir,
           f" (skipped: {stats})" if stats else "")
  return pattern


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in its local batch order."""
  seen, parts = set(), []
  for s in sorted(x.addressable_shards, key=lambda s: s.index[0].start or 0):
    start = s.index[0].start or 0
    if start not in seen:  # replicas over model axes hold the same rows
      seen.add(start)
      parts.append(np.asarray(s.data))
  return np.concatenate(parts).astype(np.float32)
