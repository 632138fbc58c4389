"""LPIPS (Zhang et al. 2018) with a VGG16 backbone, in Flax.

The backbone mirrors torchvision's `vgg16().features` (params `features_0`,
`features_2`, ... after the conv indices), the linear heads the `lpips`
package's `lin0..lin4` (`lin{k}.model.1.weight`, 1x1 convs without bias), so
both convert with `ldm_jax.models.convert.torch_to_flax`. Weights are never
downloaded: `load_lpips(vgg_path, lin_path)` reads files the user supplies
(e.g. torchvision's `vgg16-397923af.pth` and lpips' `weights/v0.1/vgg.pth`).

LPIPS(x0, x1) = sum_l mean_{h,w} w_l . (n(f_l(x0)) - n(f_l(x1)))^2, where f_l
are the relu1_2 ... relu5_3 features of the shifted/scaled inputs and n
normalises each position's channel vector to unit length.
"""
import logging
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import layers
from ldm_jax.models.convert import load_torch_file, torch_to_flax

# (conv index in torchvision's features, out channels); a max-pool precedes each
# slice after the first; LPIPS taps the relu after the last conv of each slice.
VGG_SLICES = (((0, 64), (2, 64)),
              ((5, 128), (7, 128)),
              ((10, 256), (12, 256), (14, 256)),
              ((17, 512), (19, 512), (21, 512)),
              ((24, 512), (26, 512), (28, 512)))
# lpips' ScalingLayer: inputs in [-1, 1] -> roughly ImageNet-normalised
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)  # numpy: importing must not start a backend
SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class NetLinLayer(nn.Module):
  """lpips' `NetLinLayer`: (Dropout, 1x1 conv to one channel without bias); dropout is off at use."""

  @nn.compact
  def __call__(self, d):
    return layers.Conv(1, 1, padding=0, use_bias=False, name="model_1")(d)


class LPIPS(nn.Module):
  """x0, x1 NHWC in [-1, 1] -> LPIPS distance per example, shape (B,)."""
  dtype: Optional[jnp.dtype] = None

  def features(self, x):
    h = ((x - SHIFT) / SCALE).astype(self.dtype or jnp.float32)
    feats = []
    for s, convs in enumerate(VGG_SLICES):
      if s:
        h = nn.max_pool(h, (2, 2), strides=(2, 2))
      for idx, c in convs:
        h = nn.relu(layers.Conv(c, 3, dtype=self.dtype, name=f"features_{idx}")(h))
      feats.append(h.astype(jnp.float32))
    return feats

  @nn.compact
  def __call__(self, x0, x1):
    b = x0.shape[0]
    feats = self.features(jnp.concatenate([x0, x1], 0))
    total = 0.0
    for k, f in enumerate(feats):
      f = f / (jnp.sqrt(jnp.sum(f ** 2, -1, keepdims=True)) + 1e-10)
      d = (f[:b] - f[b:]) ** 2
      total = total + jnp.mean(NetLinLayer(name=f"lin{k}")(d), axis=(1, 2, 3))
    return total


def load_lpips(vgg_path: Optional[str], lin_path: Optional[str]):
  """Builds LPIPS and its parameters from local files.

  Args:
    vgg_path: torchvision VGG16 state dict (`features.{i}.weight/bias`; other keys
      such as `classifier.*` are ignored), or None.
    lin_path: lpips linear heads (`lin{k}.model.1.weight`), or None.
  Returns:
    (module, params), or None when no paths are given (the perceptual term is
    then off and this is logged).
  Raises:
    FileNotFoundError naming the missing path; ValueError if only one path is given.
  """
  if not vgg_path and not lin_path:
    logging.info("LPIPS: no lpips_vgg_path/lpips_lin_path given; the perceptual loss is off")
    return None
  if not (vgg_path and lin_path):
    raise ValueError("LPIPS needs both stage1.loss.lpips_vgg_path and stage1.loss.lpips_lin_path; "
                     f"got vgg={vgg_path!r}, lin={lin_path!r}")
  for name, path in (("lpips_vgg_path", vgg_path), ("lpips_lin_path", lin_path)):
    if not os.path.exists(path):
      raise FileNotFoundError(f"stage1.loss.{name}: no such file {path!r}")
  sd = {k: v for k, v in load_torch_file(vgg_path).items() if k.startswith("features.")}
  sd.update(load_torch_file(lin_path))
  model = LPIPS()
  x = jnp.zeros((1, 16, 16, 3))
  template = nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x, x)["params"])
  params = torch_to_flax(sd, template, what=f"LPIPS files {vgg_path!r} + {lin_path!r}")
  return model, jax.tree.map(jnp.asarray, params)
