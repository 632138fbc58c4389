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


def _with(cfg, **kw):
  import ml_collections
  c = ml_collections.ConfigDict(cfg.to_dict())
  for k, v in kw.items():
    c[k] = v
  return c


__all__ = ["default_config", "make_iterator", "WebDatasetIterator"]
