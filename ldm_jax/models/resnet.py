"""The residual block the UNet and the autoencoder are both built of (diffusers' ResnetBlock2D).

Parameter names are diffusers' (norm1, conv1, time_emb_proj, norm2, conv2,
conv_shortcut), so the weights of either model convert by `convert.torch_to_flax`.
"""
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import layers


class ResnetBlock2D(nn.Module):
  """GroupNorm -> SiLU -> conv1 (+ the projected time embedding) -> GroupNorm -> SiLU ->
  dropout -> conv2, plus the input (1x1-projected when the width changes).

  Attributes:
    out_channels: output width.
    num_groups: GroupNorm groups.
    epsilon: GroupNorm epsilon (1e-5 in the UNet, 1e-6 in the autoencoder).
    dropout: rate before conv2 when called with train=True (needs a 'dropout' rng).
    use_scale_shift_norm: the time embedding scales and shifts norm2's output (FiLM)
      instead of being added before it.
    up, down: 2x nearest-neighbour upsampling / 2x2 average pooling after norm1
      (the UNet's resblock_updown).
    zero_out: conv2 starts at zero, so a fresh block is the identity (the UNet, as the
      reference; the autoencoder's does not).
    dtype: compute dtype (norms in float32).
  """
  out_channels: int
  num_groups: int = 32
  epsilon: float = 1e-5
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  up: bool = False
  down: bool = False
  zero_out: bool = True
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x: jax.Array, emb: Optional[jax.Array] = None,
               train: bool = False) -> jax.Array:
    """Args: x (B, H, W, C); emb (B, E) time embedding or None; train enables dropout.

    Returns: (B, H', W', out_channels), H' = 2H / H/2 when sampling up / down.
    """
    dtype = self.dtype or x.dtype
    conv = lambda name, k=3, init=nn.initializers.lecun_normal(): layers.Conv(
        self.out_channels, k, padding=k // 2, dtype=self.dtype, kernel_init=init, name=name)
    norm = lambda name, silu=True: layers.GroupNorm(self.num_groups, epsilon=self.epsilon,
                                                    silu=silu, name=name)
    h = norm("norm1")(x)
    if self.up:  # nearest-neighbour 2x, as diffusers Upsample2D(use_conv=False)
      h, x = (jnp.repeat(jnp.repeat(a, 2, 1), 2, 2) for a in (h, x))
    if self.down:  # 2x2 average pooling, as Downsample2D(use_conv=False)
      h, x = (nn.avg_pool(a, (2, 2), (2, 2)) for a in (h, x))
    h = conv("conv1")(h.astype(dtype))
    if emb is None:
      h = norm("norm2")(h)
    else:
      n = 2 * self.out_channels if self.use_scale_shift_norm else self.out_channels
      e = layers.Dense(n, dtype=self.dtype, name="time_emb_proj")(nn.silu(emb))[:, None, None, :]
      if self.use_scale_shift_norm:
        scale, shift = jnp.split(e, 2, axis=-1)
        h = nn.silu(norm("norm2", silu=False)(h) * (1 + scale) + shift)
      else:
        h = norm("norm2")(h + e)
    h = nn.Dropout(self.dropout, deterministic=not train or self.dropout == 0)(h)
    init = layers.zeros_init() if self.zero_out else nn.initializers.lecun_normal()
    h = conv("conv2", init=init)(h.astype(dtype))
    if x.shape[-1] != self.out_channels:
      x = conv("conv_shortcut", k=1)(x)
    return nn.with_logical_constraint(x + h, ("batch", "height", "width", "channels"))


def remat_if(remat: bool):
  """ResnetBlock2D, rematerialised in the backward pass if `remat` (train, argument 3
  counting self, is a Python bool: static under remat)."""
  return nn.remat(ResnetBlock2D, static_argnums=(3,)) if remat else ResnetBlock2D
