"""Stage-1 perceptual autoencoders: Encoder, Decoder, AutoencoderKL, VQModel.

`z = E(x)` maps an NHWC image in [-1, 1] to a latent downsampled by
`f = 2 ** (len(ch_mult) - 1)`; `D(z)` maps it back. Submodules are named after
diffusers' `AutoencoderKL` / `VQModel` (`encoder.down_blocks_0.resnets_1.conv1`,
`decoder.up_blocks_0...`), so `ldm_jax.models.convert.torch_to_flax` loads their
state dicts with its one rule. As in diffusers, `decoder.up_blocks_0` is the
lowest resolution (CompVis numbers the decoder levels the other way round).

The KL model regularises `z` by a diagonal Gaussian posterior; the VQ model by a
codebook in front of the decoder. The LDM trains on the VQ latent *before*
quantisation, so `VQModel.encode` returns the pre-quantisation `h` and
`VQModel.decode(h)` quantises first.
"""
from typing import Optional, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import layers, resnet
from ldm_jax.models.attention import AttentionBlock


def _resnet(remat: bool, out_channels: int, dropout: float, norm_groups: int, dtype, name: str):
  """diffusers' VAE resnet: the UNet's block without a time embedding, GroupNorm eps 1e-6."""
  return resnet.remat_if(remat)(out_channels, norm_groups, 1e-6, dropout, zero_out=False,
                                dtype=dtype, name=name)


def _attn(norm_groups: int, dtype, attention: str, name: str):
  """diffusers' VAE `Attention`: one head of all channels, GroupNorm eps 1e-6, a residual."""
  return AttentionBlock(1, norm_groups, epsilon=1e-6, zero_out=False, dtype=dtype,
                        implementation=attention, name=name)


class Resample(nn.Module):
  """diffusers Downsample2D (pad right/bottom by one, stride-2 valid conv) or
  Upsample2D (nearest x2, then a 3x3 conv)."""
  mode: str  # 'down' | 'up'
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, h):
    if self.mode == "down":
      h = jnp.pad(h, ((0, 0), (0, 1), (0, 1), (0, 0)))
      return layers.Conv(h.shape[-1], 3, strides=2, padding=0, dtype=self.dtype, name="conv")(h)
    h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
    return layers.Conv(h.shape[-1], 3, dtype=self.dtype, name="conv")(h)


class Block(nn.Module):
  """One level: `num_layers` ResnetBlocks (each followed by attention if `attn`),
  then an optional resampler; diffusers' (Attn)DownEncoderBlock2D / UpDecoderBlock2D."""
  out_channels: int
  num_layers: int
  attn: bool = False
  resample: Optional[str] = None  # None | 'down' | 'up'
  dropout: float = 0.0
  norm_groups: int = 32
  remat: bool = False
  deterministic: bool = True
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_layers):
      h = _resnet(self.remat, self.out_channels, self.dropout, self.norm_groups, self.dtype,
                  f"resnets_{j}")(h, None, not self.deterministic)
      if self.attn:
        h = _attn(self.norm_groups, self.dtype, self.attention, f"attentions_{j}")(h)
    if self.resample:
      h = Resample(self.resample, dtype=self.dtype, name="downsamplers_0" if self.resample == "down"
                   else "upsamplers_0")(h)
    return h


class Encoder(nn.Module):
  """x (B, H, W, in_channels) -> (B, H/f, W/f, z_channels * (2 if double_z else 1))."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()  # feature-map sizes (relative to `resolution`) with attention
  z_channels: int = 4
  double_z: bool = True  # mean and logvar for the KL model
  dropout: float = 0.0
  resolution: int = 256  # the training resolution; only places the attention layers
  in_channels: int = 3
  norm_groups: int = 32
  remat: bool = False  # rematerialise each resnet in the backward pass
  deterministic: bool = True
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"  # the attention kernel (models/attention.py IMPLEMENTATIONS)

  @nn.compact
  def __call__(self, x):
    kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, attention=self.attention)
    h = layers.Conv(self.ch * self.ch_mult[0], 3, dtype=self.dtype,
                    name="conv_in")(x.astype(self.dtype or x.dtype))
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      last = i == len(self.ch_mult) - 1
      h = Block(self.ch * mult, self.num_res_blocks, res in self.attn_resolutions,
                resample=None if last else "down", dropout=self.dropout, remat=self.remat,
                deterministic=self.deterministic, name=f"down_blocks_{i}", **kw)(h)
      res = res if last else res // 2
    h = MidBlock(self.dropout, deterministic=self.deterministic, remat=self.remat,
                 name="mid_block", **kw)(h)
    h = layers.GroupNorm(self.norm_groups, silu=True, name="conv_norm_out")(h).astype(h.dtype)
    out = self.z_channels * (2 if self.double_z else 1)
    return layers.Conv(out, 3, dtype=self.dtype, name="conv_out")(h)


class MidBlock(nn.Module):
  """resnets_0 -> attentions_0 -> resnets_1 at the lowest resolution."""
  dropout: float = 0.0
  norm_groups: int = 32
  deterministic: bool = True
  remat: bool = False
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"

  @nn.compact
  def __call__(self, h):
    c, train = h.shape[-1], not self.deterministic
    res = lambda name: _resnet(self.remat, c, self.dropout, self.norm_groups, self.dtype, name)
    h = res("resnets_0")(h, None, train)
    h = _attn(self.norm_groups, self.dtype, self.attention, "attentions_0")(h)
    return res("resnets_1")(h, None, train)


class Decoder(nn.Module):
  """z (B, h, w, z_channels) -> x_hat (B, h*f, w*f, out_ch)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 4
  dropout: float = 0.0
  resolution: int = 256
  out_ch: int = 3
  norm_groups: int = 32
  remat: bool = False
  deterministic: bool = True
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"

  @nn.compact
  def __call__(self, z, return_features: bool = False):
    """Returns x_hat, or (x_hat, the input of conv_out) if `return_features`.

    The features let the adaptive GAN weight differentiate w.r.t. the last
    layer's kernel alone (`ldm_jax.training.autoencoder_losses`).
    """
    kw = dict(norm_groups=self.norm_groups, dtype=self.dtype, attention=self.attention)
    n = len(self.ch_mult)
    h = layers.Conv(self.ch * self.ch_mult[-1], 3, dtype=self.dtype,
                    name="conv_in")(z.astype(self.dtype or z.dtype))
    h = MidBlock(self.dropout, deterministic=self.deterministic, remat=self.remat,
                 name="mid_block", **kw)(h)
    res = self.resolution // 2 ** (n - 1)
    for i, mult in enumerate(reversed(self.ch_mult)):
      last = i == n - 1
      h = Block(self.ch * mult, self.num_res_blocks + 1, res in self.attn_resolutions,
                resample=None if last else "up", dropout=self.dropout, remat=self.remat,
                deterministic=self.deterministic, name=f"up_blocks_{i}", **kw)(h)
      res = res if last else res * 2
    feats = layers.GroupNorm(self.norm_groups, silu=True, name="conv_norm_out")(h).astype(h.dtype)
    x_hat = layers.Conv(self.out_ch, 3, dtype=self.dtype, name="conv_out")(feats).astype(jnp.float32)
    return (x_hat, feats) if return_features else x_hat


@flax.struct.dataclass
class DiagonalGaussian:
  """q(z|x) = N(mean, exp(logvar)), per latent element."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments):
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean, jnp.clip(logvar, -30.0, 20.0))

  def sample(self, rng):
    return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(rng, self.mean.shape)

  def mode(self):
    return self.mean

  def kl(self):
    """KL(q || N(0, I)) summed over latent elements, one value per example."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar,
                         axis=tuple(range(1, self.mean.ndim)))


def _enc_dec_kwargs(m):
  return dict(ch=m.ch, ch_mult=tuple(m.ch_mult), num_res_blocks=m.num_res_blocks,
              attn_resolutions=tuple(m.attn_resolutions), z_channels=m.z_channels,
              dropout=m.dropout, resolution=m.resolution, norm_groups=m.norm_groups,
              remat=m.remat, deterministic=m.deterministic, dtype=m.dtype, attention=m.attention)


class AutoencoderKL(nn.Module):
  """KL-regularised autoencoder (diffusers `AutoencoderKL` layout, latent_channels = z_channels)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 4
  dropout: float = 0.0
  resolution: int = 256
  norm_groups: int = 32
  remat: bool = False
  deterministic: bool = True  # False enables dropout (needs a 'dropout' rng)
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"  # the attention kernel (models/attention.py IMPLEMENTATIONS)

  def setup(self):
    kw = _enc_dec_kwargs(self)
    self.encoder = Encoder(double_z=True, **kw)
    self.decoder = Decoder(**kw)
    self.quant_conv = layers.Conv(2 * self.z_channels, 1, padding=0, dtype=self.dtype)
    self.post_quant_conv = layers.Conv(self.z_channels, 1, padding=0, dtype=self.dtype)

  def encode(self, x) -> DiagonalGaussian:
    """x in [-1, 1] (B, H, W, 3) -> the posterior over z (B, H/f, W/f, z_channels)."""
    return DiagonalGaussian.from_moments(self.quant_conv(self.encoder(x)))

  def decode(self, z, return_features: bool = False):
    """z -> x_hat (and the decoder's last-layer input if `return_features`)."""
    return self.decoder(self.post_quant_conv(z.astype(self.dtype or z.dtype)), return_features)

  def __call__(self, x, rng=None, return_features: bool = False):
    """Returns (x_hat, posterior, aux); z is a posterior sample if `rng` is given, else its mode."""
    posterior = self.encode(x)
    z = posterior.sample(rng) if rng is not None else posterior.mode()
    out = self.decode(z, return_features)
    x_hat, feats = out if return_features else (out, None)
    return x_hat, posterior, {"features": feats} if return_features else {}


class VectorQuantizer(nn.Module):
  """Nearest-codebook-entry quantisation with a straight-through gradient.

  With `ema_decay > 0` the codebook is not a parameter but lives in the
  `vq_ema` collection (with the running cluster sizes and sums) and is updated
  by `ema_codebook_update`; the loss then keeps only the commitment term. The
  running sums start consistent with the codebook (each code counted once at its
  own place), so a code no batch has chosen yet keeps its place instead of being
  divided by a count of ~0.
  """
  n_embed: int
  embed_dim: int
  beta: float = 0.25
  l2_normalize: bool = False  # cosine-similarity codes (ViT-VQGAN); distances on the unit sphere
  ema_decay: float = 0.0

  @nn.compact
  def __call__(self, z):
    init = nn.initializers.uniform(2.0 / self.n_embed)
    if self.ema_decay > 0:
      codebook = self.variable(
          "vq_ema", "embedding",
          lambda: jax.random.uniform(self.make_rng("params"), (self.n_embed, self.embed_dim),
                                     minval=-1.0 / self.n_embed, maxval=1.0 / self.n_embed)).value
      self.variable("vq_ema", "cluster_size", lambda: jnp.ones((self.n_embed,)))
      self.variable("vq_ema", "embed_sum", lambda: codebook)  # = codebook * cluster_size
    else:
      shifted = lambda k, s, d=jnp.float32: init(k, s, d) - 1.0 / self.n_embed
      emb = layers.Embed(self.n_embed, self.embed_dim, init=shifted, name="embedding")
      codebook = emb.embedding
    codebook = jnp.asarray(codebook, jnp.float32)
    z = z.astype(jnp.float32)
    if self.l2_normalize:
      z, codebook = _l2n(z), _l2n(codebook)
    flat = z.reshape(-1, self.embed_dim)
    d = (jnp.sum(flat ** 2, 1, keepdims=True) - 2 * flat @ codebook.T
         + jnp.sum(codebook ** 2, 1)[None])
    idx = jnp.argmin(d, axis=1)
    z_q = codebook[idx].reshape(z.shape)
    sg = jax.lax.stop_gradient
    codebook_term = 0.0 if self.ema_decay > 0 else jnp.mean(jnp.square(sg(z) - z_q))
    loss = codebook_term + self.beta * jnp.mean(jnp.square(z - sg(z_q)))
    onehot = jax.nn.one_hot(idx, self.n_embed, dtype=jnp.float32)
    counts = onehot.sum(0)
    probs = counts / flat.shape[0]
    info = dict(indices=idx.reshape(z.shape[:-1]),
                perplexity=jnp.exp(-jnp.sum(probs * jnp.log(probs + 1e-10))),
                usage=jnp.mean((counts > 0).astype(jnp.float32)),
                # means over positions, linear in the batch, so micro-batches average exactly
                code_freq=probs, code_mean_sum=onehot.T @ sg(flat) / flat.shape[0])
    return z + sg(z_q - z), loss, info


def _l2n(x):
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def ema_codebook_update(vq_ema: dict, code_freq, code_mean_sum, num_vectors: int, decay: float,
                        eps: float = 1e-5) -> dict:
  """One EMA step of the codebook (van den Oord et al. 2017, App. A.1) with Laplace smoothing.

  Args:
    vq_ema: {'embedding', 'cluster_size', 'embed_sum'} of one quantizer.
    code_freq, code_mean_sum: the quantizer's info entries (per-position means).
    num_vectors: latent vectors in the (global) batch; turns means back into counts.
    decay: EMA decay.
  Returns:
    The updated collection.
  """
  cs = decay * vq_ema["cluster_size"] + (1 - decay) * code_freq * num_vectors
  es = decay * vq_ema["embed_sum"] + (1 - decay) * code_mean_sum * num_vectors
  n = cs.sum()
  cs_smooth = (cs + eps) / (n + cs.shape[0] * eps) * n
  return dict(cluster_size=cs, embed_sum=es, embedding=es / cs_smooth[:, None])


def restart_dead_codes(vq_ema: dict, code_freq, code_mean_sum, threshold: float, rng,
                       noise: float = 0.01) -> tuple:
  """Re-seeds the codes whose EMA count fell below `threshold` (dead-code restarts,
  as Jukebox and Improved VQGAN) from this batch's encodings.

  A dead code moves to the centroid of a used code, drawn in proportion to its use,
  plus a little noise (`noise` times the centroid's rms): the busiest clusters split,
  and the code competes again. Centroids are means over positions, so the restart is
  the same under gradient accumulation and on any mesh. A restarted code counts
  `threshold` vectors at its new place, keeping the running sums consistent.

  Args:
    vq_ema: the quantizer's collection after `ema_codebook_update`.
    code_freq, code_mean_sum: the quantizer's info entries for this batch.
    threshold: EMA count (vectors per batch) below which a code is dead.
    rng: PRNG key.
    noise: relative scale of the noise added to the copied centroid.
  Returns:
    (updated collection, number of restarted codes).
  """
  dead = vq_ema["cluster_size"] < threshold
  r_src, r_noise = jax.random.split(rng)
  k, d = code_mean_sum.shape
  src = jax.random.categorical(r_src, jnp.log(code_freq + 1e-30), shape=(k,))
  centroid = (code_mean_sum / jnp.maximum(code_freq, 1e-30)[:, None])[src]
  rms = jnp.sqrt(jnp.mean(jnp.square(centroid), axis=1, keepdims=True))
  fresh = centroid + noise * rms * jax.random.normal(r_noise, (k, d))
  emb = jnp.where(dead[:, None], fresh, vq_ema["embedding"])
  cs = jnp.where(dead, threshold, vq_ema["cluster_size"])
  es = jnp.where(dead[:, None], fresh * threshold, vq_ema["embed_sum"])
  return dict(cluster_size=cs, embed_sum=es, embedding=emb), jnp.sum(dead)


class VQModel(nn.Module):
  """VQ-regularised autoencoder (diffusers `VQModel` layout)."""
  ch: int = 128
  ch_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = ()
  z_channels: int = 3
  embed_dim: int = 3
  n_embed: int = 8192
  beta: float = 0.25
  l2_normalize: bool = False
  ema_decay: float = 0.0
  dropout: float = 0.0
  resolution: int = 256
  norm_groups: int = 32
  remat: bool = False
  deterministic: bool = True
  dtype: Optional[jnp.dtype] = None
  attention: str = "auto"

  def setup(self):
    kw = _enc_dec_kwargs(self)
    self.encoder = Encoder(double_z=False, **kw)
    self.decoder = Decoder(**kw)
    self.quant_conv = layers.Conv(self.embed_dim, 1, padding=0, dtype=self.dtype)
    self.quantize = VectorQuantizer(self.n_embed, self.embed_dim, self.beta, self.l2_normalize,
                                    self.ema_decay)
    self.post_quant_conv = layers.Conv(self.z_channels, 1, padding=0, dtype=self.dtype)

  def encode(self, x):
    """x -> the pre-quantisation latent h (B, H/f, W/f, embed_dim): what the LDM trains on."""
    return self.quant_conv(self.encoder(x)).astype(jnp.float32)

  def decode(self, h, force_not_quantize: bool = False, return_features: bool = False):
    """h -> x_hat; quantises h first unless `force_not_quantize`."""
    if not force_not_quantize:
      h, _, _ = self.quantize(h)
    return self.decoder(self.post_quant_conv(h.astype(self.dtype or h.dtype)), return_features)

  def __call__(self, x, rng=None, return_features: bool = False):
    """Returns (x_hat, codebook loss, info) with info's indices, perplexity, usage."""
    del rng  # deterministic; the argument keeps the KL model's signature
    z_q, loss, info = self.quantize(self.encode(x))
    out = self.decoder(self.post_quant_conv(z_q.astype(self.dtype or z_q.dtype)), return_features)
    x_hat, feats = out if return_features else (out, None)
    if return_features:
      info = dict(info, features=feats)
    return x_hat, loss, info


def preset(kind: str, f: int, size: str = "ref") -> dict:
  """Model kwargs of the paper's first-stage models.

  Args:
    kind: 'kl' or 'vq'.
    f: downsampling factor (kl: 4, 8, 16, 32; vq: 4, 8, 16).
    size: 'ref' -- the paper's shapes (ch 128, 2 res-blocks, 256 px); 'tiny' -- a
      CPU variant (ch 32, 1 res-block, GroupNorm(8), 32 px, no level attention)
      with the same f, z channels and (for VQ) a 512-entry codebook.
  Returns:
    kwargs for `AutoencoderKL` or `VQModel`.
  """
  table = {
      ("kl", 4): dict(ch_mult=(1, 2, 4), z_channels=3, attn_resolutions=()),
      ("kl", 8): dict(ch_mult=(1, 2, 4, 4), z_channels=4, attn_resolutions=()),
      ("kl", 16): dict(ch_mult=(1, 1, 2, 2, 4), z_channels=16, attn_resolutions=(16,)),
      ("kl", 32): dict(ch_mult=(1, 1, 2, 2, 4, 4), z_channels=64, attn_resolutions=(16, 8)),
      ("vq", 4): dict(ch_mult=(1, 2, 4), z_channels=3, embed_dim=3, n_embed=8192,
                      attn_resolutions=()),
      ("vq", 8): dict(ch_mult=(1, 2, 2, 4), z_channels=4, embed_dim=4, n_embed=16384,
                      attn_resolutions=(32,)),
      ("vq", 16): dict(ch_mult=(1, 1, 2, 2, 4), z_channels=8, embed_dim=8, n_embed=16384,
                       attn_resolutions=(16,)),
  }
  if (kind, f) not in table:
    raise ValueError(f"stage1 kind/f: no preset for kind={kind!r}, f={f}; have {sorted(table)}")
  kw = dict(table[(kind, f)], ch=128, num_res_blocks=2, resolution=256)
  if size == "tiny":
    m = len(kw["ch_mult"]) - 1
    kw.update(ch=32, ch_mult=(1,) + (2,) * m, num_res_blocks=1, attn_resolutions=(),
              resolution=32, norm_groups=8)
    if kind == "vq":
      kw["n_embed"] = 512
  elif size != "ref":
    raise ValueError(f"stage1 size: expected 'ref' or 'tiny', got {size!r}")
  return kw
