"""Linen building blocks whose parameters carry logical axis names.

Every model in ldm_jax builds its layers through these factories so that all
parameters are annotated with a handful of logical names. The config maps the
names to mesh axes (`config.sharding_rules`); `ldm_jax.parallel` turns them into
shardings. A dimension that a mesh axis does not divide is replicated there.

Logical names:
  embed  -- input features of a dense/conv kernel (sharded over `fsdp`)
  mlp    -- output features of a dense/conv kernel (sharded over `tensor`)
  heads  -- attention heads
  kv     -- per-head features
  vocab  -- token vocabulary
  norm   -- norm scales / biases (replicated)
Activations use: batch, length, height, width, channels.

The factories return ordinary `nn.Dense` / `nn.Conv` / `nn.LayerNorm` / `nn.Embed`
modules and a GroupNorm with flax's parameter names, so parameter trees keep flax's
leaf names (`kernel`, `bias`, `scale`, `embedding`), which `ldm_jax.models.convert`
maps to PyTorch names. Two pieces are written for the CPU's sake (bench/README.md):
`conv2d` runs small convolutions as matmuls, `group_norm` fuses GroupNorm and SiLU
with a hand-written backward pass.
"""
import functools
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Axes = Sequence[Optional[str]]
_lecun = nn.initializers.lecun_normal()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _part(init, axes):
  return nn.with_logical_partitioning(init, tuple(axes))


def Dense(features: int, *, axes: Axes = ("embed", "mlp"), use_bias: bool = True,
          dtype=None, kernel_init=_lecun, name: Optional[str] = None) -> nn.Dense:
  """A dense layer with f32 master weights and `dtype` compute."""
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=_part(kernel_init, axes),
                  bias_init=_part(_zeros, (axes[-1],)), name=name)


# On the CPU a convolution whose GEMM has at most this many rows (batch x output
# pixels) runs as an explicit im2col matmul; bench/README.md has the measurements.
IM2COL_MAX_ROWS = 256
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
           dimension_numbers=None, feature_group_count=1, precision=None):
  """`lax.conv_general_dilated` for NHWC x HWIO, as `nn.Conv` calls it.

  On the CPU, XLA's convolution runs small output maps slowly (a 3x3 conv on a
  2x2 map at 1-2 GFLOP/s, 20-40x below a matmul of the same work; on SD's 8x8 and
  4x4 maps at batch 1 2-2.6x below), so a convolution of few GEMM rows becomes the
  matmul of its shifted windows (im2col); larger ones, and every other backend
  (cuDNN), keep XLA's convolution. A 1x1 convolution is a matmul at any size.
  """
  conv = lambda: lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
      dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
      precision=precision)
  plain = (dimension_numbers == _NHWC and feature_group_count == 1 and not isinstance(padding, str)
           and all(d == 1 for d in tuple(lhs_dilation or ()) + tuple(rhs_dilation or ())))
  if not plain or jax.default_backend() != "cpu":
    return conv()
  kh, kw, c, o = rhs.shape
  (sh, sw), ((pt, pb), (pl, pr)) = window_strides, padding
  b, h, w, _ = lhs.shape
  oh, ow = (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1
  if kh * kw > 1 and b * oh * ow > IM2COL_MAX_ROWS:
    return conv()
  x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
  cols = [x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  cols = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)
  y = jnp.dot(cols.reshape(b * oh * ow, kh * kw * c), rhs.reshape(kh * kw * c, o),
              precision=precision)
  return y.reshape(b, oh, ow, o)


def Conv(features: int, kernel_size: int = 3, *, strides: int = 1, padding=1,
         axes: Axes = (None, None, "embed", "mlp"), use_bias: bool = True, dtype=None,
         kernel_init=_lecun, name: Optional[str] = None) -> nn.Conv:
  """A 2-D convolution over NHWC with PyTorch-style integer padding by default."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                 conv_general_dilated=conv2d,
                 kernel_init=_part(kernel_init, axes),
                 bias_init=_part(_zeros, (axes[-1],)), name=name)


def _group_mean(a, groups: int):
  """(B, ..., C) -> (B, groups): the mean over each example's group of channels.

  Channel sums first, then the groups: XLA's CPU reduction over the contiguous
  channel rows runs 3-6x faster than one over the strided (positions, channels in
  group) axes of a (B, N, G, C/G) view.
  """
  b, c = a.shape[0], a.shape[-1]
  per_channel = jnp.sum(a.reshape(b, -1, c), axis=1)
  return per_channel.reshape(b, groups, c // groups).sum(-1) / (a.size // (b * groups))


def _gn_stats(x, groups: int, eps: float):
  """Per-(example, group) mean and 1/std of (B, ..., C) float32 `x` (one pass: E[x], E[x^2])."""
  mean = _group_mean(x, groups)
  var = jnp.maximum(_group_mean(jnp.square(x), groups) - jnp.square(mean), 0.0)
  return mean, lax.rsqrt(var + eps)


def _per_channel(v, x):
  """(B, G) -> (B, 1, ..., 1, C), each group's value repeated over its channels."""
  v = jnp.repeat(v, x.shape[-1] // v.shape[1], axis=1)
  return v.reshape((v.shape[0],) + (1,) * (x.ndim - 2) + (v.shape[1],))


def _gn_apply(x, mean, rstd, scale, bias, silu: bool):
  """(x_hat, u, y): the normalised input, its affine map and the output."""
  xhat = (x - _per_channel(mean, x)) * _per_channel(rstd, x)
  u = xhat * scale + bias
  return xhat, u, (u * jax.nn.sigmoid(u) if silu else u)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def group_norm(x, scale, bias, groups: int, eps: float, silu: bool = False):
  """GroupNorm of (B, ..., C) `x` over (spatial, C / groups) in float32, then SiLU if
  `silu`; returns float32.

  The statistics take one pass over x (E[x] and E[x^2], as flax's fast variance) and
  normalisation, scale, bias and SiLU another. The backward pass is written out: it
  recomputes x_hat from x and the two statistics and needs two passes over the
  activations (the per-group means of dx_hat and dx_hat * x_hat, then dx), where
  differentiating the forward ops keeps x - mean, x_hat and the SiLU's input as
  separate tensors and reduces over each.
  """
  x = x.astype(jnp.float32)
  mean, rstd = _gn_stats(x, groups, eps)
  return _gn_apply(x, mean, rstd, scale, bias, silu)[2]


def _group_norm_fwd(x, scale, bias, groups, eps, silu):
  x32 = x.astype(jnp.float32)
  mean, rstd = _gn_stats(x32, groups, eps)
  return _gn_apply(x32, mean, rstd, scale, bias, silu)[2], (x, mean, rstd, scale, bias)


def _group_norm_bwd(groups, eps, silu, res, g):
  del eps
  x, mean, rstd, scale, bias = res
  xhat, u, _ = _gn_apply(x.astype(jnp.float32), mean, rstd, scale, bias, silu)
  if silu:
    s = jax.nn.sigmoid(u)
    g = g * (s * (1 + u * (1 - s)))
  axes = tuple(range(x.ndim - 1))
  dscale, dbias = jnp.sum(g * xhat, axis=axes), jnp.sum(g, axis=axes)
  dxhat = g * scale
  m1, m2 = _group_mean(dxhat, groups), _group_mean(dxhat * xhat, groups)
  dx = _per_channel(rstd, x) * (dxhat - _per_channel(m1, x) - xhat * _per_channel(m2, x))
  return dx.astype(x.dtype), dscale, dbias


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class _GroupNorm(nn.Module):
  num_groups: int = 32
  epsilon: float = 1e-6
  silu: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"GroupNorm: {c} channels are not divisible by num_groups={self.num_groups}")
    scale = self.param("scale", _part(_ones, ("norm",)), (c,), jnp.float32)
    bias = self.param("bias", _part(_zeros, ("norm",)), (c,), jnp.float32)
    return group_norm(x, scale, bias, self.num_groups, self.epsilon, self.silu)


def GroupNorm(num_groups: int = 32, *, epsilon: float = 1e-6, silu: bool = False, dtype=None,
              name: Optional[str] = None) -> nn.Module:
  """GroupNorm (params `scale`, `bias`, as flax's) computed and returned in f32 whatever
  the compute dtype (it is a reduction), with the SiLU that follows it in the same pass
  if `silu` (`group_norm`)."""
  del dtype  # statistics in f32 are what keeps bf16 training stable
  return _GroupNorm(num_groups, epsilon, silu, name=name)


def LayerNorm(*, epsilon: float = 1e-5, use_bias: bool = True, dtype=None,
              name: Optional[str] = None) -> nn.LayerNorm:
  """LayerNorm computed in f32."""
  del dtype
  return nn.LayerNorm(epsilon=epsilon, use_bias=use_bias, dtype=jnp.float32,
                      param_dtype=jnp.float32, scale_init=_part(_ones, ("norm",)),
                      bias_init=_part(_zeros, ("norm",)), name=name)


def Embed(num_embeddings: int, features: int, *, axes: Axes = ("vocab", "embed"), dtype=None,
          init=nn.initializers.normal(0.02), name: Optional[str] = None) -> nn.Embed:
  """A lookup table (tokens, classes, positions)."""
  return nn.Embed(num_embeddings, features, dtype=dtype, param_dtype=jnp.float32,
                  embedding_init=_part(init, axes), name=name)


def zeros_init():
  """Initialiser of the zero-initialised output layers (ResBlock out, proj_out)."""
  return _zeros
