"""Data: the embedded shapes set, webdataset shards, TFDS and latent caches, all
delivered as host-local batches {image, caption, label} (or {latent, ...})."""
from ldm_jax.data.pipeline import WebDatasetIterator, default_config


def make_iterator(cfg, *, batch_size: int, process_index: int = 0, process_count: int = 1,
                  seed: int = 0):
  """The iterator of `config.data` for this process.

  Returns:
    An iterator of host-local batches with get_state(), set_state(), stats().
  """
  if cfg.source == "shapes":
    from ldm_jax.data.make_shapes import ensure_shapes_shards
    s = cfg.shapes
    pattern = ensure_shapes_shards(cfg.cache_dir, s.num, cfg.resolution, s.seed, s.split,
                                   s.shard_size)
    cfg = _with(cfg, shards=pattern)
  elif cfg.source == "tfds":
    from ldm_jax.data.tfds import TFDSIterator
    return TFDSIterator(cfg, batch_size=batch_size, process_index=process_index,
                        process_count=process_count, seed=seed)
  elif cfg.source not in ("wds", "latents"):
    raise ValueError(f"config.data.source must be shapes|wds|tfds|latents, got {cfg.source!r}")
  return WebDatasetIterator(cfg, batch_size=batch_size, process_index=process_index,
                            process_count=process_count, seed=seed)


def heldout(cfg, *, num: int, shards=None, tfds_split: str = "validation"):
  """`cfg` switched to images held out of training, read without augmentation:
  `shards` if given (wds), else the shapes held-out split of `num` images, or a
  TFDS `tfds_split`. Raises ValueError for wds runs given no held-out shards."""
  import ml_collections
  d = ml_collections.ConfigDict(cfg.to_dict())
  d.crop, d.flip = "center", False
  if shards:
    d.source, d.shards = "wds", shards
  elif d.source == "shapes":
    d.shapes.split, d.shapes.num = "heldout", num
    d.shapes.shard_size = min(d.shapes.shard_size, num)
  elif d.source == "tfds":
    d.tfds.split = tfds_split
  else:
    raise ValueError(f"config.data.source={d.source!r} has no held-out split; give held-out shards")
  return d


def _with(cfg, **kw):
  import ml_collections
  c = ml_collections.ConfigDict(cfg.to_dict())
  for k, v in kw.items():
    c[k] = v
  return c


__all__ = ["default_config", "heldout", "make_iterator", "WebDatasetIterator"]
