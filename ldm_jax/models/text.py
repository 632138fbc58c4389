"""Tokenizers and text encoders tau(y) for text-conditioned latent diffusion.

* `ByteTokenizer`: UTF-8 bytes, needs no download (tests, from-scratch models).
* `WordTokenizer`: whole words of a vocabulary collected from captions (small
  captioned datasets, where it learns much faster than bytes).
* `CLIPTokenizerFromFolder`: a local transformers CLIP tokenizer folder.
* `TextTransformer`: the LDM paper's text encoder trained jointly with the UNet
  (token + learned position embeddings, pre-LN transformer, bidirectional).
* `CLIPTextTransformer`: transformers' `CLIPTextModel` (causal), with parameter
  names that `ldm_jax.models.convert.torch_to_flax` maps directly; `layer=
  'penultimate'` is SD 2's choice (FrozenOpenCLIPEmbedder).
"""
import collections
import json
import logging
import os
import re
from typing import List, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.models import convert, layers
from ldm_jax.models.attention import OUT_AXES, multi_head_attention

log = logging.getLogger(__name__)


class _Truncating:
  """Shared truncation warning: logged once per tokenizer, not once per prompt."""
  _warned = False

  def _warn_truncated(self, n: int, max_length: int):
    if n and not self._warned:
      self._warned = True
      log.warning("%d prompt(s) longer than max_length=%d tokens were truncated "
                  "(logged once per tokenizer)", n, max_length)


class ByteTokenizer(_Truncating):
  """UTF-8 bytes as tokens: [BOS, b + 3 ..., EOS, PAD ...] of length max_length.

  Args:
    max_length: tokens per prompt including BOS and EOS (at least 2).
  """
  PAD, BOS, EOS, OFFSET = 0, 1, 2, 3
  vocab_size = 256 + OFFSET

  def __init__(self, max_length: int = 77):
    if max_length < 2:
      raise ValueError(f"ByteTokenizer: max_length={max_length} must be >= 2 (BOS and EOS)")
    self.max_length = max_length

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Returns int32 (B, max_length) ids; too-long prompts are cut before EOS."""
    if isinstance(texts, str):
      texts = [texts]
    ids = np.full((len(texts), self.max_length), self.PAD, np.int32)
    truncated = 0
    for i, text in enumerate(texts):
      body = [b + self.OFFSET for b in text.encode("utf-8")]
      if len(body) > self.max_length - 2:
        body, truncated = body[:self.max_length - 2], truncated + 1
      row = [self.BOS] + body + [self.EOS]
      ids[i, :len(row)] = row
    self._warn_truncated(truncated, self.max_length)
    return ids

  def decode(self, ids: np.ndarray) -> List[str]:
    """Inverse of __call__ for (B, L) ids (a cut multi-byte character is dropped)."""
    out = []
    for row in np.asarray(ids):
      body = bytes(int(i) - self.OFFSET for i in row
                   if int(i) >= self.OFFSET)
      out.append(body.decode("utf-8", errors="ignore"))
    return out


class WordTokenizer(_Truncating):
  """Whole words from a fixed vocabulary: [BOS, word ids ..., EOS, PAD ...].

  For small captioned datasets (the embedded shapes set has ~40 words) a word
  vocabulary makes a tiny jointly trained text encoder learn far faster than
  bytes. `build_vocab` collects it from captions; it is stored in the config, so
  a checkpoint carries its tokenizer. Unknown words map to UNK.

  Args:
    vocab: the words (ids start after PAD, BOS, EOS, UNK).
    max_length: tokens per prompt including BOS and EOS.
  """
  PAD, BOS, EOS, UNK, OFFSET = 0, 1, 2, 3, 4

  def __init__(self, vocab: Sequence[str], max_length: int = 16):
    if max_length < 2:
      raise ValueError(f"WordTokenizer: max_length={max_length} must be >= 2 (BOS and EOS)")
    self.vocab = tuple(vocab)
    self.ids = {w: i + self.OFFSET for i, w in enumerate(self.vocab)}
    self.max_length = max_length
    self.vocab_size = len(self.vocab) + self.OFFSET

  @staticmethod
  def split(text: str) -> List[str]:
    return re.findall(r"[\w']+|[^\w\s]", text.lower())

  @classmethod
  def build_vocab(cls, captions: Sequence[str], max_words: int = 30000) -> tuple:
    """The most frequent words of `captions` (ties alphabetical)."""
    counts = collections.Counter(w for c in captions for w in cls.split(c))
    return tuple(sorted(counts, key=lambda w: (-counts[w], w))[:max_words])

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    out = np.full((len(texts), self.max_length), self.PAD, np.int32)
    truncated = 0
    for i, text in enumerate(texts):
      body = [self.ids.get(w, self.UNK) for w in self.split(text)]
      if len(body) > self.max_length - 2:
        body, truncated = body[:self.max_length - 2], truncated + 1
      row = [self.BOS] + body + [self.EOS]
      out[i, :len(row)] = row
    self._warn_truncated(truncated, self.max_length)
    return out


class CLIPTokenizerFromFolder(_Truncating):
  """transformers' CLIPTokenizer read from a local folder (vocab.json, merges.txt).

  Args:
    path: folder (e.g. a diffusers pipeline's `tokenizer/`); nothing is downloaded.
    max_length: tokens per prompt (default: the tokenizer's model_max_length, 77).
  """

  def __init__(self, path: str, max_length: Optional[int] = None):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"CLIPTokenizerFromFolder: tokenizer folder {path!r} not found")
    from transformers import CLIPTokenizer
    self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    self.max_length = max_length or min(self.tokenizer.model_max_length, 77)
    self.vocab_size = len(self.tokenizer)

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """Returns int32 (B, max_length) ids padded as the tokenizer pads (SD's recipe)."""
    if isinstance(texts, str):
      texts = [texts]
    full = self.tokenizer(list(texts), truncation=False)["input_ids"]
    self._warn_truncated(sum(len(f) > self.max_length for f in full), self.max_length)
    ids = self.tokenizer(list(texts), truncation=True, max_length=self.max_length,
                         padding="max_length")["input_ids"]
    return np.asarray(ids, np.int32)


_ACTS = {"quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
         "gelu": lambda x: nn.gelu(x, approximate=False)}


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then x + mlp(ln2(x)) (transformers `CLIPEncoderLayer`)."""
  heads: int
  mlp_dim: int
  act: str = "quick_gelu"
  causal: bool = True
  eps: float = 1e-5
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    h = layers.LayerNorm(epsilon=self.eps, name="layer_norm1")(x).astype(self.dtype or x.dtype)
    x = x + SelfAttention(self.heads, self.causal, self.dtype, name="self_attn")(h)
    h = layers.LayerNorm(epsilon=self.eps, name="layer_norm2")(x).astype(self.dtype or x.dtype)
    x = x + MLP(self.mlp_dim, self.act, self.dtype, name="mlp")(h)
    return nn.with_logical_constraint(x, ("batch", "length", "channels"))


class SelfAttention(nn.Module):
  """q_proj, k_proj, v_proj, out_proj with biases (transformers `CLIPAttention`)."""
  heads: int
  causal: bool = True
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    w = x.shape[-1]
    q, k, v = (layers.Dense(w, dtype=self.dtype, name=f"{n}_proj")(x) for n in "qkv")
    o = multi_head_attention(q, k, v, self.heads, is_causal=self.causal, dtype=self.dtype)
    return layers.Dense(w, axes=OUT_AXES, dtype=self.dtype, name="out_proj")(o)


class MLP(nn.Module):
  """fc1 -> activation -> fc2."""
  mlp_dim: int
  act: str = "quick_gelu"
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    h = _ACTS[self.act](layers.Dense(self.mlp_dim, dtype=self.dtype, name="fc1")(x))
    return layers.Dense(x.shape[-1], axes=OUT_AXES, dtype=self.dtype, name="fc2")(h)


class _Encoder(nn.Module):
  """The stack `layers_0 ... layers_{n-1}` (transformers `encoder.layers`)."""
  num_layers: int
  heads: int
  mlp_dim: int
  act: str
  causal: bool
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers):
      x = EncoderLayer(self.heads, self.mlp_dim, self.act, self.causal, dtype=self.dtype,
                       name=f"layers_{i}")(x)
    return x


class _Embeddings(nn.Module):
  """token_embedding + position_embedding (learned absolute positions)."""
  vocab_size: int
  max_length: int
  width: int
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, ids):
    if ids.shape[1] > self.max_length:
      raise ValueError(f"text encoder: {ids.shape[1]} tokens exceed max_length={self.max_length}")
    tok = layers.Embed(self.vocab_size, self.width, dtype=self.dtype, name="token_embedding")(ids)
    pos = layers.Embed(self.max_length, self.width, axes=(None, "embed"), dtype=self.dtype,
                       name="position_embedding")(jnp.arange(ids.shape[1]))
    return tok + pos[None]


class CLIPTextTransformer(nn.Module):
  """transformers' `CLIPTextModel` (last_hidden_state), tau(y) of Stable Diffusion.

  Attributes:
    vocab_size, max_length (positions), width, num_layers, num_heads, mlp_dim.
    act: 'quick_gelu' (OpenAI CLIP, SD 1.x) or 'gelu' (OpenCLIP, SD 2.x).
    layer: 'last' (SD 1.x) or 'penultimate' (SD 2.x: the output of layer n-1, whose
      last layer is then never built); both pass through final_layer_norm.
    dtype: compute dtype.
  """
  vocab_size: int = 49408
  max_length: int = 77
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  layer: str = "last"
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """Args: ids (B, L) int token ids, L <= max_length.

    Returns: (B, L, width) float32 context for the UNet's cross-attention.
    """
    if self.layer not in ("last", "penultimate"):
      raise ValueError(f"CLIPTextTransformer: layer={self.layer!r} must be 'last' or "
                       "'penultimate'")
    if self.act not in _ACTS:
      raise ValueError(f"CLIPTextTransformer: act={self.act!r} not in {sorted(_ACTS)}")
    n = self.num_layers - (self.layer == "penultimate")
    x = _Embeddings(self.vocab_size, self.max_length, self.width, self.dtype,
                    name="embeddings")(ids)
    x = _Encoder(n, self.num_heads, self.mlp_dim, self.act, True, self.dtype,
                 name="encoder")(x)
    return layers.LayerNorm(epsilon=1e-5, name="final_layer_norm")(x).astype(jnp.float32)


class TextTransformer(nn.Module):
  """The LDM paper's text encoder trained jointly with the UNet (BERT-like, bidirectional).

  Same blocks as CLIP's (pre-LN, GELU MLP of 4x width) without the causal mask.
  """
  vocab_size: int = ByteTokenizer.vocab_size
  max_length: int = 77
  width: int = 512
  num_layers: int = 8
  num_heads: int = 8
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, ids: jax.Array) -> jax.Array:
    """Args: ids (B, L) int token ids. Returns: (B, L, width) float32."""
    x = _Embeddings(self.vocab_size, self.max_length, self.width, self.dtype,
                    name="embeddings")(ids)
    x = _Encoder(self.num_layers, self.num_heads, 4 * self.width, "gelu", False, self.dtype,
                 name="encoder")(x)
    return layers.LayerNorm(epsilon=1e-5, name="final_layer_norm")(x).astype(jnp.float32)


CLIP_PRESETS = {
    "tiny": dict(vocab_size=ByteTokenizer.vocab_size, max_length=77, width=64, num_layers=2,
                 num_heads=4, mlp_dim=256, act="quick_gelu", layer="last"),
    # CLIP ViT-L/14 text tower (SD 1.x).
    "sd15": dict(vocab_size=49408, max_length=77, width=768, num_layers=12, num_heads=12,
                 mlp_dim=3072, act="quick_gelu", layer="last"),
    # OpenCLIP ViT-H/14 text tower (SD 2.x), penultimate layer.
    "sd2": dict(vocab_size=49408, max_length=77, width=1024, num_layers=24, num_heads=16,
                mlp_dim=4096, act="gelu", layer="penultimate"),
}

PRESETS = {
    "tiny": dict(vocab_size=ByteTokenizer.vocab_size, max_length=77, width=64, num_layers=2,
                 num_heads=4),
    # LDM-KL-8-G text-to-image (txt2img-1p4B): BERT-style encoder of width 1280, depth 32.
    "base": dict(vocab_size=ByteTokenizer.vocab_size, max_length=77, width=1280, num_layers=32,
                 num_heads=8),
}


def clip_preset(size: str) -> dict:
  """CLIPTextTransformer kwargs for 'tiny', 'sd15' or 'sd2' (a fresh dict)."""
  if size not in CLIP_PRESETS:
    raise ValueError(f"unknown CLIP text preset {size!r}; choose from {sorted(CLIP_PRESETS)}")
  return dict(CLIP_PRESETS[size])


def preset(size: str) -> dict:
  """TextTransformer (from-scratch encoder) kwargs for 'tiny' or 'base' (a fresh dict)."""
  if size not in PRESETS:
    raise ValueError(f"unknown text encoder preset {size!r}; choose from {sorted(PRESETS)}")
  return dict(PRESETS[size])


def check_context_dim(text_width: int, unet_context_dim: Optional[int]) -> None:
  """Raises ValueError unless the text encoder's width equals the UNet's context_dim."""
  if text_width != unet_context_dim:
    raise ValueError(f"text encoder width {text_width} != UNet context_dim="
                     f"{unet_context_dim}: set the UNet's context_dim to the text width")


def clip_kwargs_from_config(cfg: dict, layer: str = "last",
                            what: str = "text_encoder/config.json") -> dict:
  """CLIPTextTransformer kwargs of a transformers CLIPTextConfig, checked.

  Args:
    cfg: the config.json of a CLIPTextModel (or a CLIPModel's, whose text_config is used).
    layer: 'last' or 'penultimate' (of the num_hidden_layers in `cfg`).
    what: the file's name, for errors.

  Raises:
    ValueError naming the field ldm_jax's encoder does not implement.
  """
  cfg = cfg.get("text_config", cfg)
  act = cfg.get("hidden_act", "quick_gelu")
  if act not in _ACTS:
    raise ValueError(f"{what}: hidden_act={act!r} is not one of {sorted(_ACTS)}")
  if abs(float(cfg.get("layer_norm_eps", 1e-5)) - 1e-5) > 1e-9:
    raise ValueError(f"{what}: layer_norm_eps={cfg['layer_norm_eps']} is not supported (1e-5)")
  if cfg["hidden_size"] % cfg["num_attention_heads"]:
    raise ValueError(f"{what}: hidden_size={cfg['hidden_size']} is not divisible by "
                     f"num_attention_heads={cfg['num_attention_heads']}")
  return dict(vocab_size=cfg["vocab_size"], max_length=cfg["max_position_embeddings"],
              width=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
              num_heads=cfg["num_attention_heads"], mlp_dim=cfg["intermediate_size"],
              act=act, layer=layer)


def check_tokenizer(tokenizer: CLIPTokenizerFromFolder, kw: dict, what: str) -> None:
  """Raises ValueError unless `tokenizer` fits the CLIP encoder of kwargs `kw`: the same
  vocabulary size (ids beyond the embedding table would be garbage) and prompts no
  longer than its positions."""
  if tokenizer.vocab_size != kw["vocab_size"]:
    raise ValueError(f"{what}: the tokenizer has {tokenizer.vocab_size} tokens but the text "
                     f"encoder's vocab_size is {kw['vocab_size']}: they are not a pair")
  if tokenizer.max_length > kw["max_length"]:
    raise ValueError(f"{what}: the tokenizer pads prompts to {tokenizer.max_length} tokens "
                     f"but the text encoder has {kw['max_length']} positions")


def load_clip_text(folder: str, layer: str = "last", dtype=None):
  """Reads a local transformers `CLIPTextModel` folder (a diffusers `text_encoder/`).

  Args:
    folder: holds config.json and model.safetensors or pytorch_model.bin.
    layer: 'last' or 'penultimate' (weights of the unused last layer are skipped).
    dtype: compute dtype of the returned module.

  Returns:
    (CLIPTextTransformer, params) ready for `model.apply({'params': params}, ids)`.
  """
  cfg_path = os.path.join(folder, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(f"load_clip_text: {cfg_path} not found")
  with open(cfg_path) as f:
    cfg = json.load(f)
  weights = [os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")]
  weights = [w for w in weights if os.path.isfile(w)]
  if not weights:
    raise FileNotFoundError(f"load_clip_text: no model.safetensors or pytorch_model.bin "
                            f"in {folder}")
  model = CLIPTextTransformer(**clip_kwargs_from_config(cfg, layer, cfg_path), dtype=dtype)
  return model, clip_params(convert.load_torch_file(weights[0]), model,
                            what=f"CLIP text encoder {folder}")


def clip_params(state_dict: dict, model: CLIPTextTransformer, what: str = "CLIP text encoder"):
  """Flax params of `model` from a transformers CLIPTextModel state dict.

  Keys may carry transformers' `text_model.` prefix or not; the projection and vision
  tower of a full CLIPModel, and the layer after the one a 'penultimate' model reads,
  are skipped. Shapes and names are checked (`convert.torch_to_flax`).
  """
  template = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 1), jnp.int32))["params"])
  unread = f"encoder.layers.{model.num_layers - 1}." if model.layer == "penultimate" else None

  def rename(key):
    key = key[len("text_model."):] if key.startswith("text_model.") else key
    if unread and key.startswith(unread):
      return None  # the layer after the one SD 2 reads
    return None if key.startswith(("text_projection", "vision_model", "logit_scale")) else key

  return convert.torch_to_flax(state_dict, template, rename=rename, ignore=[r"position_ids$"],
                               what=what)
