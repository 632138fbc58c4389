"""Conditioning for stage 2: what y is, how tau(y) is computed, how it is dropped
for classifier-free guidance, and how it enters the UNet.

`config.stage2.conditioning` chooses, independently:
  context -- 'text' (cross-attention on tau(tokens)) or 'none';
  classes -- number of class labels (0 = none), embedded and added to the time
             embedding ('adm'); index `classes` is the null class for guidance;
  concat  -- 'none', 'lowres' (super-resolution: the low-res image at latent size),
             'inpaint' (mask + latent of the masked image) or 'layout' (a semantic
             map at latent size); these channels are concatenated to z_t. Inpainting
             follows Stable Diffusion's (diffusers' 9-channel UNet input): z_t, then
             the mask (1 = the region to repaint), then the latent of the image with
             that region blanked.
  pooled  -- text only: tau(y) averaged over its tokens is also embedded and added
             to the time embedding (the UNet's 'continuous' adm input), as SDXL adds
             its pooled text embedding and Imagen its pooled text: every ResBlock,
             not only the cross-attention levels, sees the whole caption.
crossattn + concat is the reference's 'hybrid' key.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import text as text_lib
from ldm_jax.models.unet import UNetModel

CONCAT_KINDS = ("none", "lowres", "inpaint", "layout")


def text_config(size: str = "tiny"):
  """`config.stage2.text`: the tokenizer and tau for text conditioning."""
  import ml_collections
  sd = size in ("sd15", "sd2")
  return ml_collections.ConfigDict(dict(
      encoder="clip" if sd else "transformer",  # 'transformer' (LDM, trained jointly) | 'clip'
      tokenizer="clip" if sd else "bytes",      # transformer: 'bytes' | 'words' (vocab below)
      vocab=(),                      # words: the vocabulary (WordTokenizer.build_vocab)
      size=size if sd else ("base" if size == "base" else "tiny"),  # preset of the encoder
      max_length=77 if sd else 64,   # tokens per prompt; longer prompts are cut (one warning)
      path="",                       # clip: a diffusers pipeline folder (text_encoder/, tokenizer/)
      # clip: CLIPTextTransformer kwargs of a pretrained model's text tower (its weights
      # come with the state, ldm_jax.pretrained.stage2); None = `path` or the `size` preset.
      clip=None,
      tokenizer_path="",             # clip: a CLIP tokenizer folder (default: path/tokenizer)
      # clip: the layer tau reads. diffusers' SD 2 text_encoder/ already stops at the
      # penultimate layer, so 'last' is right for it; 'penultimate' for a full OpenCLIP tower.
      layer="last",
      trainable=not sd,              # clip: fine-tune tau with the UNet
  ))


def text_from_config(t, dtype: str):
  """(tokenizer, module, trainable, pretrained params or None) from `config.stage2.text`."""
  import os
  dt = jnp.bfloat16 if dtype == "bfloat16" else None
  if t.encoder == "transformer":
    if t.tokenizer == "words":
      if not t.vocab:
        raise ValueError("config.stage2.text.vocab is empty: the 'words' tokenizer needs one")
      tok = text_lib.WordTokenizer(t.vocab, t.max_length)
    elif t.tokenizer == "bytes":
      tok = text_lib.ByteTokenizer(t.max_length)
    else:
      raise ValueError(f"config.stage2.text.tokenizer must be 'bytes' or 'words' for the "
                       f"transformer encoder, got {t.tokenizer!r}")
    kw = dict(text_lib.preset(t.size), max_length=t.max_length, vocab_size=tok.vocab_size, dtype=dt)
    return tok, text_lib.TextTransformer(**kw), True, None
  if t.encoder != "clip":
    raise ValueError(f"config.stage2.text.encoder must be 'transformer' or 'clip', got {t.encoder!r}")
  if t.get("clip"):
    from ldm_jax.pretrained import files  # a tokenizer folder may be an fsspec URL
    kw = dict(t.clip)
    tok = text_lib.CLIPTokenizerFromFolder(
        files.local_folder(t.get("tokenizer_path") or files.join(t.path, "tokenizer")), t.max_length)
    text_lib.check_tokenizer(tok, kw, "config.stage2.text.tokenizer_path")
    return tok, text_lib.CLIPTextTransformer(**kw, dtype=dt), bool(t.trainable), None
  if t.path:
    tok = text_lib.CLIPTokenizerFromFolder(os.path.join(t.path, "tokenizer"), t.max_length)
    model, params = text_lib.load_clip_text(os.path.join(t.path, "text_encoder"), t.layer, dt)
    return tok, model, bool(t.trainable), params
  kw = text_lib.clip_preset(t.size)
  if kw["vocab_size"] != text_lib.ByteTokenizer.vocab_size:
    raise ValueError(f"config.stage2.text.path is empty: the '{t.size}' CLIP encoder needs its "
                     "tokenizer and weights from a local diffusers folder")
  kw.update(max_length=t.max_length, dtype=dt)
  return text_lib.ByteTokenizer(t.max_length), text_lib.CLIPTextTransformer(**kw), bool(t.trainable), None


def _resize(x, hw):
  """Antialiased resize of NHWC images (device side)."""
  return jax.image.resize(x, (x.shape[0], hw[0], hw[1], x.shape[-1]), "linear", antialias=True)


def random_masks(rng, n: int, hw: tuple) -> jax.Array:
  """Inpainting masks (1 = repaint): random boxes covering 1/4 to 3/4 of each side."""
  r1, r2 = jax.random.split(rng)
  h, w = hw
  size = jax.random.uniform(r1, (n, 2), minval=0.25, maxval=0.75) * jnp.array([h, w])
  corner = jax.random.uniform(r2, (n, 2)) * (jnp.array([h, w]) - size)
  yy, xx = jnp.arange(h)[None, :, None], jnp.arange(w)[None, None, :]
  inside = ((yy >= corner[:, 0, None, None]) & (yy < corner[:, 0, None, None] + size[:, 0, None, None]) &
            (xx >= corner[:, 1, None, None]) & (xx < corner[:, 1, None, None] + size[:, 1, None, None]))
  return inside.astype(jnp.float32)[..., None]


def pool(context: jax.Array) -> jax.Array:
  """(B, L, D) -> (B, D): the mean of tau(y) over all L token positions. Padding
  positions count too: a bidirectional encoder's states there attend to the caption,
  as a causal one's do after its last token."""
  return jnp.mean(context, axis=1)


@dataclasses.dataclass
class Conditioner:
  """Host preparation, device encoding, dropout and concatenation of y."""
  context: str
  classes: int
  concat: str
  tokenizer: Optional[object]
  text_model: Optional[object]
  text_trainable: bool
  first: object  # the FirstStage
  prompts: tuple
  lowres_factor: int
  pooled: bool = False
  pretrained: Optional[dict] = None  # tau's loaded weights (CLIP), put in at a fresh start

  @classmethod
  def from_config(cls, config, first):
    c = config.stage2.conditioning
    if c.context not in ("text", "none"):
      raise ValueError(f"config.stage2.conditioning.context must be 'text' or 'none', got {c.context!r}")
    if c.concat not in CONCAT_KINDS:
      raise ValueError(f"config.stage2.conditioning.concat must be one of {CONCAT_KINDS}, got {c.concat!r}")
    if c.concat == "layout" and config.data.source != "latents" and not config.data.get("layout_ext"):
      raise ValueError("config.stage2.conditioning.concat='layout' needs config.data.layout_ext "
                       "(the extension of the layout map beside each image, e.g. 'seg.png')")
    pooled = bool(c.get("pooled", False))
    if pooled and c.context != "text":
      raise ValueError("config.stage2.conditioning.pooled=True needs context='text', "
                       f"got context={c.context!r}")
    if pooled and c.classes:
      raise ValueError("config.stage2.conditioning: pooled=True and classes="
                       f"{c.classes} both use the UNet's adm input; choose one")
    tokenizer = model = pretrained = None
    trainable = False
    if c.context == "text":
      tokenizer, model, trainable, pretrained = text_from_config(config.stage2.text, config.dtype)
    return cls(c.context, int(c.classes), c.concat, tokenizer, model, trainable, first,
               tuple(config.stage2.sample.prompts), int(c.lowres_factor), pooled, pretrained)

  # -- shapes ----------------------------------------------------------------
  @property
  def concat_channels(self) -> int:
    return {"none": 0, "lowres": 3, "inpaint": self.first.z_channels + 1,
            "layout": 3}[self.concat]

  @property
  def guidable(self) -> bool:
    return self.context == "text" or self.classes > 0

  def make_unet(self, config) -> UNetModel:
    kw = dict(config.stage2.unet)
    if self.context == "text":
      text_lib.check_context_dim(self.text_model.width, kw.get("context_dim"))
    else:
      kw["context_dim"] = None
    kw.update(in_channels=self.first.z_channels + self.concat_channels,
              out_channels=self.first.z_channels,
              num_classes=(self.classes + 1) if self.classes else None,
              dtype=jnp.bfloat16 if config.dtype == "bfloat16" else None,
              remat=config.remat)
    if self.pooled:
      kw.update(num_classes="continuous", adm_in_channels=self.text_model.width)
    return UNetModel(**kw)

  # -- params ----------------------------------------------------------------
  def init(self, rng):
    """(trainable, frozen) condition-encoder params; None where there are none."""
    if self.context != "text":
      return None, None
    p = self.text_model.init(rng, jnp.zeros((1, self.tokenizer.max_length), jnp.int32))
    return (p, None) if self.text_trainable else (None, p)

  def dummy(self, b: int):
    ctx = None
    if self.context == "text":
      ctx = jnp.zeros((b, self.tokenizer.max_length, self.text_model.width))
    y = jnp.zeros((b,), jnp.int32) if self.classes else None
    if self.pooled:
      y = jnp.zeros((b, self.text_model.width))
    return ctx, y

  # -- host side -------------------------------------------------------------
  def prepare(self, host_batch: dict) -> dict:
    out = {}
    for key in ("image", "latent", "latent_std"):
      if key in host_batch:
        out[key] = np.asarray(host_batch[key], np.float32)
    if "index" in host_batch:  # sample batches: row numbers, which give an unconditional batch its size
      out["index"] = np.asarray(host_batch["index"], np.int32)
    if self.context == "text":
      out["tokens"] = self.tokenizer(list(host_batch["caption"]))
    if self.classes:
      label = np.asarray(host_batch["label"], np.int32)
      if np.any((label < 0) | (label >= self.classes)):
        raise ValueError(f"labels must be in [0, config.stage2.conditioning.classes="
                         f"{self.classes}); got {label.min()}..{label.max()}")
      out["label"] = label
    if self.concat == "layout":
      out["layout"] = np.asarray(host_batch["layout"], np.float32)
    return out

  def fixed_batch(self, n: int, data_batch: Optional[dict] = None) -> dict:
    """The batch the periodic sample grids use: fixed prompts / labels, and the
    first data batch's images for concat conditioning."""
    b = {"index": np.arange(n, dtype=np.int32)}  # the batch's size, for unconditional models
    if self.context == "text":
      b["caption"] = np.array([self.prompts[i % len(self.prompts)] for i in range(n)], object)
    if self.classes:
      b["label"] = np.arange(n, dtype=np.int32) % self.classes
    if self.concat != "none":
      if data_batch is None:
        raise ValueError(f"concat conditioning '{self.concat}' needs images for its sample grid")
      reps = -(-n // len(data_batch["image"]))
      b["image"] = np.concatenate([data_batch["image"]] * reps)[:n]
      if "layout" in data_batch:
        b["layout"] = np.concatenate([data_batch["layout"]] * reps)[:n]
    return b

  def batch_size(self, batch: dict) -> int:
    return next(iter(batch.values())).shape[0]

  # -- device side -----------------------------------------------------------
  def _context(self, trainable, frozen, tokens):
    params = trainable if self.text_trainable else frozen
    return self.text_model.apply(params, tokens)

  def encode(self, trainable, frozen, batch, rng, *, drop_prob, frozen_first, scale_factor):
    """The conditioning pytree {context, y, concat}; with rng, y is dropped (set to
    the null condition) with probability drop_prob per example."""
    out = {}
    n = self.batch_size(batch)
    drop = (jax.random.uniform(rng, (n,)) < drop_prob) if rng is not None and drop_prob else None
    if self.context == "text":
      tokens = batch["tokens"]
      if drop is not None:
        null = jnp.asarray(self.tokenizer([""]))
        tokens = jnp.where(drop[:, None], null, tokens)
      out["context"] = self._context(trainable, frozen, tokens)
      if self.pooled:
        out["y"] = pool(out["context"])
    if self.classes:
      y = batch["label"]
      out["y"] = jnp.where(drop, self.classes, y) if drop is not None else y
    if self.concat != "none":
      out["concat"] = self._concat_input(batch, frozen_first, scale_factor, rng)
    return out

  def _concat_input(self, batch, frozen_first, scale_factor, rng):
    x = batch["image"]
    hw = (x.shape[1] // self.first.factor, x.shape[2] // self.first.factor)
    if self.concat == "lowres":
      low = _resize(x, (x.shape[1] // self.lowres_factor, x.shape[2] // self.lowres_factor))
      return _resize(low, hw)
    if self.concat == "layout":
      return _resize(batch["layout"], hw)
    # inpaint: mask (1 = repaint) and the latent of the image with the hole blanked
    mask = batch.get("mask")
    if mask is None:
      key = rng if rng is not None else jax.random.key(0)
      mask = random_masks(jax.random.fold_in(key, 7), x.shape[0], x.shape[1:3])
    z_masked = scale_factor * self.first.encode(frozen_first, x * (1 - mask), None)
    return jnp.concatenate([_resize(mask, hw), z_masked], -1)

  def null(self, trainable, frozen, cond, negative=None):
    """The unconditional half for guidance (a negative prompt's tokens if given)."""
    out = dict(cond)
    n = self.batch_size(cond)
    if self.context == "text":
      tokens = negative if negative is not None else jnp.asarray(self.tokenizer([""] * n))
      out["context"] = self._context(trainable, frozen, tokens)
      if self.pooled:
        out["y"] = pool(out["context"])
    if self.classes:
      out["y"] = jnp.full((n,), self.classes, jnp.int32)
    return out

  @staticmethod
  def join(z_t, cond):
    c = cond.get("concat")
    return z_t if c is None else jnp.concatenate([z_t, c.astype(z_t.dtype)], -1)
