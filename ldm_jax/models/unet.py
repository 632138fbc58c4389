"""The denoising UNet eps_theta(z_t, t, tau(y)) of latent diffusion.

Structure of the reference `openaimodel.UNetModel` (CompVis / Stability-AI),
parameter names of diffusers' `UNet2DConditionModel` (conv_in, time_embedding,
down_blocks_i/{resnets_j, attentions_j, downsamplers_0}, mid_block,
up_blocks_i/{resnets_j, attentions_j, upsamplers_0}, conv_norm_out, conv_out),
so diffusers weights convert with `ldm_jax.models.convert.torch_to_flax`.

Conditioning: `context` (B, L, context_dim) enters every SpatialTransformer
through cross-attention; class labels or `adm` vectors `y` are embedded and
added to the time embedding; concat conditioning is part of `in_channels`.
"""
import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import attention, layers, resnet
from ldm_jax.models.attention import AttentionBlock, SpatialTransformer


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding [cos, sin] of (B,) timesteps (diffusers flip_sin_to_cos=True,
  downscale_freq_shift=0, i.e. the reference's `timestep_embedding`).

  Returns: (B, dim) float32.
  """
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = jnp.asarray(t, jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  return jnp.pad(emb, ((0, 0), (0, dim % 2)))


class TimestepEmbedding(nn.Module):
  """linear_1 -> silu -> linear_2 (diffusers `TimestepEmbedding`; also the adm projection)."""
  features: int
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    x = layers.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return layers.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


def space_to_depth(x: jax.Array, p: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/p, W/p, p*p*C): each p x p patch becomes one pixel, its
  channels ordered (row in patch, column in patch, channel)."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def depth_to_space(x: jax.Array, p: int) -> jax.Array:
  """The inverse of `space_to_depth`."""
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))


class Resample2D(nn.Module):
  """A 3x3 `conv` after 2x nearest upsampling (diffusers Upsample2D) or with stride 2
  (Downsample2D, padding 1)."""
  features: int
  up: bool
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, h):
    if self.up:
      h = jnp.repeat(jnp.repeat(h, 2, 1), 2, 2)
    return layers.Conv(self.features, 3, strides=1 if self.up else 2, padding=1,
                       dtype=self.dtype, name="conv")(h)


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Settings shared by all blocks of one UNet (hashable, so a module field)."""
  num_heads: int = -1
  num_head_channels: int = -1
  transformer_depth: int = 1
  use_context: bool = True
  use_linear_in_transformer: bool = False
  use_scale_shift_norm: bool = False
  dropout: float = 0.0
  num_groups: int = 32
  remat: bool = False
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"

  def heads(self, ch: int) -> Tuple[int, int]:
    """(heads, dim_head) at a level of `ch` channels."""
    if self.num_head_channels == -1:
      return self.num_heads, ch // self.num_heads
    return ch // self.num_head_channels, self.num_head_channels


def _resnet(cfg: BlockConfig, out_channels: int, name: str, **kw):
  return resnet.remat_if(cfg.remat)(out_channels, cfg.num_groups, 1e-5, cfg.dropout,
                                    cfg.use_scale_shift_norm, dtype=cfg.dtype, name=name, **kw)


def _attention(cfg: BlockConfig, ch: int, name: str):
  heads, dim_head = cfg.heads(ch)
  if not cfg.use_context:
    cls = nn.remat(AttentionBlock) if cfg.remat else AttentionBlock
    return cls(heads, num_groups=cfg.num_groups, dtype=cfg.dtype,
               implementation=cfg.attention, name=name)
  cls = nn.remat(SpatialTransformer) if cfg.remat else SpatialTransformer
  return cls(heads, dim_head, depth=cfg.transformer_depth,
             use_linear_projection=cfg.use_linear_in_transformer, num_groups=cfg.num_groups,
             dtype=cfg.dtype, implementation=cfg.attention, name=name)


class DownBlock(nn.Module):
  """One level of the encoder: resnets (+ attentions), then an optional downsampler.

  Returns the features and every intermediate output (the skip connections).
  """
  out_channels: int
  num_layers: int
  has_attention: bool
  add_downsample: bool
  resblock_updown: bool
  cfg: BlockConfig

  @nn.compact
  def __call__(self, h, emb, context, train: bool = False):
    skips = []
    for j in range(self.num_layers):
      h = _resnet(self.cfg, self.out_channels, f"resnets_{j}")(h, emb, train)
      if self.has_attention:
        h = _attention(self.cfg, self.out_channels, f"attentions_{j}")(h, context)
      skips.append(h)
    if self.add_downsample:
      if self.resblock_updown:
        h = _resnet(self.cfg, self.out_channels, "downsamplers_0", down=True)(h, emb, train)
      else:
        h = Resample2D(self.out_channels, up=False, dtype=self.cfg.dtype,
                       name="downsamplers_0")(h)
      skips.append(h)
    return h, skips


class UpBlock(nn.Module):
  """One level of the decoder: resnets on [h, skip] (+ attentions), then an upsampler."""
  out_channels: int
  num_layers: int
  has_attention: bool
  add_upsample: bool
  resblock_updown: bool
  cfg: BlockConfig

  @nn.compact
  def __call__(self, h, skips, emb, context, train: bool = False):
    for j in range(self.num_layers):
      h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = _resnet(self.cfg, self.out_channels, f"resnets_{j}")(h, emb, train)
      if self.has_attention:
        h = _attention(self.cfg, self.out_channels, f"attentions_{j}")(h, context)
    if self.add_upsample:
      if self.resblock_updown:
        h = _resnet(self.cfg, self.out_channels, "upsamplers_0", up=True)(h, emb, train)
      else:
        h = Resample2D(self.out_channels, up=True, dtype=self.cfg.dtype,
                       name="upsamplers_0")(h)
    return h


class MidBlock(nn.Module):
  """resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution."""
  cfg: BlockConfig

  @nn.compact
  def __call__(self, h, emb, context, train: bool = False):
    ch = h.shape[-1]
    h = _resnet(self.cfg, ch, "resnets_0")(h, emb, train)
    h = _attention(self.cfg, ch, "attentions_0")(h, context)
    return _resnet(self.cfg, ch, "resnets_1")(h, emb, train)


class UNetModel(nn.Module):
  """eps_theta(z_t, t, tau(y)): the openaimodel UNet with diffusers parameter names.

  Attributes:
    in_channels: input channels (latent channels + any concat conditioning).
    out_channels: output channels (the latent channels).
    model_channels: base width; the time embedding is 4x this.
    channel_mult: width multiplier per level; one downsampling between levels.
    num_res_blocks: resnets per level on the way down (one more on the way up).
    attention_resolutions: downsampling rates (1, 2, 4, ...) with attention.
    num_heads: heads per attention (if num_head_channels == -1).
    num_head_channels: features per head (-1 = use num_heads).
    transformer_depth: BasicTransformerBlocks per SpatialTransformer.
    context_dim: features of tau(y); None = no cross-attention (plain self-attention blocks).
    use_linear_in_transformer: Dense proj_in/proj_out (SD 2) instead of 1x1 convs.
    use_scale_shift_norm: the time embedding scales and shifts norm2's output (FiLM).
    resblock_updown: resnets do the up/down sampling instead of (strided) convs.
    num_classes: None, an int (class labels -> nn.Embed) or 'continuous' (adm vectors
      of adm_in_channels features -> linear_1, silu, linear_2).
    adm_in_channels: features of continuous `y`.
    dropout: dropout in the resnets when train=True (needs a 'dropout' rng).
    norm_num_groups: GroupNorm groups (32 in every reference model).
    patch_size: p > 1 runs the UNet on p x p patches of the latent: space-to-depth
      before conv_in (h/p x w/p, p^2 x in_channels) and depth-to-space after conv_out,
      as the patchified inputs of DiT and simple diffusion (Hoogeboom et al., 2023). A
      latent of finer resolution (smaller f) then costs the UNet what a p-times
      coarser one does. 1 (every reference model) changes nothing.
    remat: rematerialise each resnet / attention block in the backward pass.
    dtype: compute dtype (params stay float32).
    attention: the attention kernel, one of `attention.IMPLEMENTATIONS` ('auto':
      cuDNN flash attention on a GPU for bf16/fp16 where cuDNN accepts the shapes,
      XLA's kernel for the rest of a GPU's, the explicit heads-major form on a CPU).
  """
  in_channels: int = 4
  out_channels: int = 4
  model_channels: int = 320
  channel_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (4, 2, 1)
  num_heads: int = 8
  num_head_channels: int = -1
  transformer_depth: int = 1
  context_dim: Optional[int] = 768
  use_linear_in_transformer: bool = False
  use_scale_shift_norm: bool = False
  resblock_updown: bool = False
  num_classes: Optional[Union[int, str]] = None
  adm_in_channels: Optional[int] = None
  dropout: float = 0.0
  norm_num_groups: int = 32
  patch_size: int = 1
  remat: bool = False
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"

  def _check(self, x, context, y):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"UNetModel: x must be NHWC with in_channels={self.in_channels} "
                       f"channels, got shape {x.shape}")
    if self.patch_size < 1:
      raise ValueError(f"UNetModel: patch_size={self.patch_size} must be >= 1")
    factor = 2 ** (len(self.channel_mult) - 1) * self.patch_size
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"UNetModel: height and width {x.shape[1:3]} must be divisible by "
                       f"{factor} (patch_size * 2 ** (len(channel_mult) - 1))")
    if self.context_dim is not None:
      if context is None:
        raise ValueError(f"UNetModel has context_dim={self.context_dim} but got no context")
      if context.shape[-1] != self.context_dim:
        raise ValueError(f"UNetModel: context has {context.shape[-1]} features but "
                         f"context_dim={self.context_dim}")
    if (y is None) != (self.num_classes is None):
      raise ValueError(f"UNetModel: y must be given iff num_classes is set "
                       f"(num_classes={self.num_classes!r}, y given: {y is not None})")
    if self.num_heads == -1 and self.num_head_channels == -1:
      raise ValueError("UNetModel: set num_heads or num_head_channels")
    try:
      attention.check_implementation(self.attention)
    except ValueError as e:
      raise ValueError(f"UNetModel: {e}") from None

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, context: Optional[jax.Array] = None,
               y: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """Predicts the model target (eps, v or x0) for z_t.

    Args:
      x: (B, H, W, in_channels) noisy latents z_t (plus concat conditioning).
      t: (B,) integer or float timesteps.
      context: (B, L, context_dim) tau(y) for cross-attention, or None.
      y: (B,) int class labels or (B, adm_in_channels) vectors if num_classes is set.
      train: enables dropout.

    Returns:
      (B, H, W, out_channels).
    """
    self._check(x, context, y)
    cfg = BlockConfig(self.num_heads, self.num_head_channels, self.transformer_depth,
                      self.context_dim is not None, self.use_linear_in_transformer,
                      self.use_scale_shift_norm, self.dropout, self.norm_num_groups,
                      self.remat, self.dtype, self.attention)
    mc, ted = self.model_channels, 4 * self.model_channels
    t = jnp.broadcast_to(jnp.asarray(t), (x.shape[0],))
    emb = timestep_embedding(t, mc).astype(self.dtype or jnp.float32)
    emb = TimestepEmbedding(ted, self.dtype, name="time_embedding")(emb)
    if self.num_classes == "continuous":
      emb = emb + TimestepEmbedding(ted, self.dtype, name="class_embedding")(
          y.astype(emb.dtype))
    elif self.num_classes is not None:
      emb = emb + layers.Embed(self.num_classes, ted, dtype=self.dtype,
                               name="class_embedding")(y)

    p = self.patch_size
    x = space_to_depth(x, p)
    h = layers.Conv(mc, 3, dtype=self.dtype, name="conv_in")(x.astype(self.dtype or x.dtype))
    skips = [h]
    levels = len(self.channel_mult)
    for i, mult in enumerate(self.channel_mult):
      h, s = DownBlock(mult * mc, self.num_res_blocks, 2 ** i in self.attention_resolutions,
                       i < levels - 1, self.resblock_updown, cfg,
                       name=f"down_blocks_{i}")(h, emb, context, train)
      skips += s
    h = MidBlock(cfg, name="mid_block")(h, emb, context, train)
    for k, i in enumerate(reversed(range(levels))):
      h = UpBlock(self.channel_mult[i] * mc, self.num_res_blocks + 1,
                  2 ** i in self.attention_resolutions, i > 0, self.resblock_updown, cfg,
                  name=f"up_blocks_{k}")(h, skips, emb, context, train)
    h = layers.GroupNorm(self.norm_num_groups, epsilon=1e-5, silu=True, name="conv_norm_out")(h)
    # The output conv starts at zero (as the reference), so training starts from eps = 0.
    h = layers.Conv(self.out_channels * p * p, 3, dtype=self.dtype,
                    kernel_init=layers.zeros_init(), name="conv_out")(h.astype(self.dtype or h.dtype))
    return depth_to_space(h, p).astype(jnp.float32)


PRESETS = {
    # CPU tests and smoke runs: 8x8 - 16x16 latents.
    "tiny": dict(model_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                 attention_resolutions=(2,), num_heads=4, num_head_channels=-1,
                 transformer_depth=1, context_dim=64, use_linear_in_transformer=False),
    # The LDM paper's LDM-4 width and head size (192 channels, 32 per head, 64x64 latents);
    # context 1280 pairs it with the from-scratch text encoder preset "base" (text.py).
    "base": dict(model_channels=192, channel_mult=(1, 2, 4), num_res_blocks=2,
                 attention_resolutions=(4, 2, 1), num_heads=-1, num_head_channels=32,
                 transformer_depth=1, context_dim=1280, use_linear_in_transformer=False),
    # Stable Diffusion 1.x (v1-inference.yaml).
    "sd15": dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                 attention_resolutions=(4, 2, 1), num_heads=8, num_head_channels=-1,
                 transformer_depth=1, context_dim=768, use_linear_in_transformer=False),
    # Stable Diffusion 2.x (v2-inference.yaml).
    "sd2": dict(model_channels=320, channel_mult=(1, 2, 4, 4), num_res_blocks=2,
                attention_resolutions=(4, 2, 1), num_heads=-1, num_head_channels=64,
                transformer_depth=1, context_dim=1024, use_linear_in_transformer=True),
}


def preset(size: str) -> dict:
  """UNetModel keyword arguments of a named size ('tiny', 'base', 'sd15', 'sd2').

  Returns a fresh dict (in/out channels 4) to update and pass as `UNetModel(**kw)`.
  """
  if size not in PRESETS:
    raise ValueError(f"unknown UNet preset size {size!r}; choose from {sorted(PRESETS)}")
  return dict(in_channels=4, out_channels=4, norm_num_groups=32, patch_size=1, attention="auto",
              **PRESETS[size])
