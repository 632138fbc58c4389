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

The factories return ordinary `nn.Dense` / `nn.Conv` / `nn.GroupNorm` /
`nn.LayerNorm` / `nn.Embed` modules, so parameter trees keep flax's leaf names
(`kernel`, `bias`, `scale`, `embedding`), which `ldm_jax.models.convert` maps to
PyTorch names.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

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


def Conv(features: int, kernel_size: int = 3, *, strides: int = 1, padding=1,
         axes: Axes = (None, None, "embed", "mlp"), use_bias: bool = True, dtype=None,
         kernel_init=_lecun, name: Optional[str] = None) -> nn.Conv:
  """A 2-D convolution over NHWC with PyTorch-style integer padding by default."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return nn.Conv(features, (kernel_size, kernel_size), strides=(strides, strides),
                 padding=padding, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=_part(kernel_init, axes),
                 bias_init=_part(_zeros, (axes[-1],)), name=name)


def GroupNorm(num_groups: int = 32, *, epsilon: float = 1e-6, dtype=None,
              name: Optional[str] = None) -> nn.GroupNorm:
  """GroupNorm computed in f32 whatever the compute dtype (it is a reduction)."""
  del dtype  # statistics in f32 are what keeps bf16 training stable
  return nn.GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=jnp.float32,
                      param_dtype=jnp.float32, scale_init=_part(_ones, ("norm",)),
                      bias_init=_part(_zeros, ("norm",)), name=name)


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
