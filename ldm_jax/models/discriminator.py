"""PatchGAN discriminator (Isola et al. 2017) as in taming-transformers' `NLayerDiscriminator`.

conv(4, s2) -> lrelu, then (n_layers - 1) x [conv(4, s2) -> norm -> lrelu], then
conv(4, s1) -> norm -> lrelu, then conv(4, s1) -> 1 logit per patch. Submodules
are `main_{i}` after the torch `nn.Sequential` indices, so taming checkpoints
convert with `torch_to_flax`.

Norm. taming uses BatchNorm and keeps the discriminator in train mode whenever
it is used, i.e. it normalises with the statistics of the batch it is given.
`norm='batch'` does exactly that (the batch mean/variance over N, H, W, learned
scale/bias) without running averages, so there is no mutable state under jit;
on a sharded global batch the statistics are global (a synchronised BatchNorm).
`norm='group'` (GroupNorm(32)) makes every example independent of the others,
so gradient accumulation over micro-batches equals the full-batch gradient.
"""
import math
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from ldm_jax.models import layers

_init = nn.initializers.normal(0.02)


class BatchStatNorm(nn.Module):
  """BatchNorm in train mode: batch statistics, no running averages (names as torch BatchNorm2d)."""
  epsilon: float = 1e-5

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.with_logical_partitioning(
        lambda k, s: 1.0 + 0.02 * nn.initializers.normal(1.0)(k, s), ("norm",)), (c,))
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("norm",)), (c,))
    x = x.astype(jnp.float32)
    mean = jnp.mean(x, axis=(0, 1, 2))
    var = jnp.var(x, axis=(0, 1, 2))
    return (x - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon)) * scale + bias


class NLayerDiscriminator(nn.Module):
  """x NHWC in [-1, 1] -> patch logits (B, h, w, 1)."""
  ndf: int = 64
  n_layers: int = 3
  norm: str = "batch"  # 'batch' | 'group' | 'none' (see the module docstring)
  dtype: Optional[jnp.dtype] = None

  def _norm(self, i, channels):
    if self.norm == "batch":
      return BatchStatNorm(name=f"main_{i}")
    if self.norm == "group":  # 32 groups, fewer for narrow test discriminators
      return layers.GroupNorm(math.gcd(32, channels), epsilon=1e-5, name=f"main_{i}")
    if self.norm == "none":
      return lambda h: h
    raise ValueError(f"stage1.loss.disc_norm: expected 'batch', 'group' or 'none', got {self.norm!r}")

  @nn.compact
  def __call__(self, x):
    conv = lambda c, s, i, bias=True: layers.Conv(c, 4, strides=s, padding=1, use_bias=bias,
                                                  dtype=self.dtype, kernel_init=_init, name=f"main_{i}")
    lrelu = lambda h: nn.leaky_relu(h, 0.2).astype(self.dtype or jnp.float32)
    use_bias = self.norm == "none"  # taming: no conv bias in front of BatchNorm
    h = lrelu(conv(self.ndf, 2, 0)(x.astype(self.dtype or x.dtype)))
    i, mult = 2, 1
    for n in range(1, self.n_layers + 1):
      mult = min(2 ** n, 8)
      h = conv(self.ndf * mult, 2 if n < self.n_layers else 1, i, use_bias)(h)
      h = lrelu(self._norm(i + 1, h.shape[-1])(h))
      i += 3
    return conv(1, 1, i)(h).astype(jnp.float32)
