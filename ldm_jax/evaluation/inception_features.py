"""Images -> the FID Inception's pool3 features and logits, the way clean-fid
prepares them (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties
in GAN Evaluation").

Resizing. Images are quantised to uint8 first (as a PNG on disk would be), then
each channel is resized to 299x299 with PIL's bicubic filter on float32 values
(PIL antialiases when it downsamples) and clipped to [0, 255]: clean-fid's
`clean` mode. The network then sees x / 127.5 - 1, pytorch-fid's input range.
Resizing inside the network with a bilinear filter without antialiasing
(pytorch-fid, and `FIDInceptionV3(resize=True)`) aliases when it downsamples and
gives other numbers. Features and logits come back as float32.

The weights are pytorch-fid's file, given by path or $LDM_INCEPTION_WEIGHTS.
"""
import concurrent.futures
import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from ldm_jax import parallel
from ldm_jax.evaluation import store
from ldm_jax.models import inception as inception_lib

ENV = "LDM_INCEPTION_WEIGHTS"
DIM = 2048  # pool3


def weights_path(path: Optional[str] = None) -> str:
  """The FID Inception weights: `path`, else $LDM_INCEPTION_WEIGHTS.

  Raises:
    FileNotFoundError saying which file to put where.
  """
  path = path or os.environ.get(ENV)
  what = (f"pytorch-fid's {inception_lib.WEIGHTS_FILE} (from {inception_lib.WEIGHTS_URL}); "
          f"give --inception_weights=PATH or set {ENV}=PATH")
  if not path:
    raise FileNotFoundError(f"FID, KID and IS need the FID Inception weights: {what}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"FID Inception weights {path!r} not found: {what}")
  return path


def _resize_one(img: np.ndarray, size: int) -> np.ndarray:
  channels = [np.asarray(Image.fromarray(img[..., c].astype(np.float32)).resize(
      (size, size), Image.BICUBIC)) for c in range(3)]
  return np.clip(np.stack(channels, -1), 0, 255)


def resize(images: np.ndarray, size: Optional[int] = None) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, size, size, 3) in [0, 255], clean-fid's resize.

  Args:
    images: uint8 images (floats are refused: quantise them first).
    size: output side (default: the Inception's 299).
  """
  images = np.asarray(images)
  if images.dtype != np.uint8:
    raise ValueError(f"Inception input must be uint8 images, got {images.dtype}")
  size = size or inception_lib.FID_SIZE
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:  # PIL frees the GIL
    out = list(pool.map(lambda im: _resize_one(im, size), images))
  return np.stack(out).astype(np.float32)


@jax.jit
def _pool3_and_logits(params, x):
  """Module-level, so every extractor on the same mesh and batch shares one compile."""
  return inception_lib.FIDInceptionV3(resize=False).apply({"params": params}, x / 127.5 - 1,
                                                           logits=True)


class InceptionFeatures:
  """Inception pool3 features and logits of uint8 images, sharded over a mesh."""

  def __init__(self, path: Optional[str], mesh):
    _, params = inception_lib.load_inception(weights_path(path), resize=False)
    self.mesh = mesh
    self.fingerprint = store.fingerprint(params)
    self.params = jax.device_put(params, parallel.replicated(mesh))

  def __call__(self, images: np.ndarray) -> dict:
    """Features of this process's uint8 images (N_local, H, W, 3), the same count on
    every process; returns every process's, in process order:
    dict(pool3=(N, 2048), logits=(N, 1008)) float32 numpy arrays."""
    n = len(images)
    unit = max(parallel.data_parallel_size(self.mesh) // jax.process_count(), 1)
    padded = -(-n // unit) * unit
    x = resize(images)
    if padded > n:  # the mesh needs equal shards; the copies are dropped below
      x = np.concatenate([x, np.repeat(x[-1:], padded - n, 0)])
    batch = parallel.global_batch({"x": x}, self.mesh)
    pool3, logits = _pool3_and_logits(self.params, batch["x"])
    out = multihost_utils.process_allgather(dict(pool3=pool3, logits=logits), tiled=True)
    return {k: np.asarray(v, np.float32).reshape(jax.process_count(), padded, -1)[:, :n]
            .reshape(-1, v.shape[-1]) for k, v in out.items()}
