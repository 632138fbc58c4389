"""Reference statistics of real images from any data source the framework reads:
the Inception pool3 mean and covariance (FID) and the features (KID).

--data names the source:
  shapes[:SPLIT]      the embedded shapes set, held-out split by default (the
                      attribute combinations the held-out prompts describe);
  wds:PATTERN         webdataset shards (brace pattern, glob or list);
  tfds:NAME[:SPLIT]   a TFDS dataset (train split by default).
Images are read as training reads them, without augmentation: shorter side
resized (antialiased) to `resolution`, centre crop; then as generated images,
quantised to uint8 and resized to 299 by clean-fid's filter.
"""
import os

import jax
import numpy as np

from ldm_jax import data as data_lib, parallel
from ldm_jax.console import progress
from ldm_jax.evaluation import fid as fid_lib
from ldm_jax.evaluation.inception_features import DIM
from ldm_jax.training import images as image_io


def data_config(spec: str, *, num: int, resolution: int, cache_dir: str = ""):
  """`config.data` for a --data spec.

  Raises:
    ValueError naming the spec when it is not one of the forms above.
  """
  d = data_lib.default_config()
  kind, _, rest = spec.partition(":")
  d.resolution, d.crop, d.flip = resolution, "center", False
  d.require_caption = False  # images only
  if cache_dir:
    d.cache_dir = cache_dir
  if kind == "shapes":
    d.source = "shapes"
    d.shapes.split = rest or "heldout"
    d.shapes.num = num
    d.shapes.shard_size = min(d.shapes.shard_size, num)
  elif kind == "wds" and rest:
    d.source, d.shards = "wds", rest
  elif kind == "tfds" and rest:
    d.source = "tfds"
    d.tfds.name, _, split = rest.partition(":")
    d.tfds.split = split or "train"
  else:
    raise ValueError(f"--data={spec!r}: expected shapes[:SPLIT], wds:PATTERN or tfds:NAME[:SPLIT]")
  return d


def make_reference(spec: str, out: str, inception, *, num: int, resolution: int,
                   batch: int = 64, cache_dir: str = "", seed: int = 0) -> fid_lib.Reference:
  """Writes the statistics of `num` images of `spec` to `out` and returns them.

  Args:
    spec: the --data spec (module docstring).
    out: the .npz to write.
    inception: an `InceptionFeatures` (its mesh shards the batches).
    num: images; the data must hold at least `num` rounded up to whole batches.
    resolution: the side images are resized and cropped to (the model's).
    batch: images per Inception call (rounded up to a multiple of the devices).
    cache_dir: where the shapes set is written (default: the data default's).
  Raises:
    ValueError when the data holds fewer images than are read.
  """
  if num < 2:
    raise ValueError(f"--num={num}: a covariance needs at least 2 images")
  dp = parallel.data_parallel_size(inception.mesh)
  batch = -(-batch // dp) * dp
  batches = -(-num // batch)
  d = data_config(spec, num=batches * batch, resolution=resolution, cache_dir=cache_dir)
  it = data_lib.make_iterator(d, batch_size=batch // jax.process_count(),
                              process_index=jax.process_index(),
                              process_count=jax.process_count(), seed=seed)
  stats, features = fid_lib.FeatureStats(), []
  for b in progress(range(batches), desc=f"reference {spec}", unit="batch"):
    images = image_io.to_uint8(next(it)["image"])
    if getattr(it, "epoch", 0) > 0:  # the iterator began a second pass
      raise ValueError(f"--data={spec!r} holds fewer than the {batches * batch} images read "
                       f"(--num={num} in whole batches of {batch})")
    pool3 = inception(images)["pool3"][:num - b * batch]
    stats.update(pool3)
    features.append(pool3)
  if jax.process_index() == 0:
    fid_lib.save_reference(out, stats, np.concatenate(features), data=spec,
                           resolution=resolution, resize="clean-fid: PIL bicubic to 299 on uint8")
  return fid_lib.Reference(stats.mean, stats.cov(), np.concatenate(features), out,
                           dict(num=stats.n, data=spec, resolution=resolution))


def load_or_make(path: str, spec: str, inception, **kw) -> fid_lib.Reference:
  """The reference at `path`, made from `spec` first when it is not there yet."""
  if os.path.isfile(path):
    return fid_lib.load_reference(path, DIM)
  return make_reference(spec, path, inception, **kw)


def shapes_heldout(out_dir: str, config, *, num: int, batch: int = 64):
  """The default reference of a model trained on the shapes data: a callable
  (InceptionFeatures) -> Reference of `num` held-out shapes images at the model's
  resolution, made once per Inception network and kept in `out_dir` (what
  `generated.Judges.load` takes as `reference`)."""
  res = config.data.resolution

  def make(inception) -> fid_lib.Reference:
    path = os.path.join(out_dir, f"reference_shapes-heldout_r{res}_n{num}_"
                        f"{inception.fingerprint}.npz")
    return load_or_make(path, "shapes:heldout", inception, num=num, resolution=res, batch=batch,
                        cache_dir=config.data.cache_dir, seed=config.seed)
  return make
