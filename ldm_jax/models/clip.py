"""CLIP (Radford et al. 2021) in Flax: the vision tower, the text tower, their
projections and logit_scale, as transformers' `CLIPModel`, for the CLIP score.

The text tower is `ldm_jax.models.text.CLIPTextTransformer` (the encoder Stable
Diffusion conditions on); the vision tower is the same pre-LN blocks without the
causal mask, over a class token and non-overlapping patches. Parameter names
follow transformers' (`vision_model.pre_layrnorm` keeps its spelling), so a
`CLIPModel` folder (config.json + model.safetensors) converts with
`ldm_jax.models.convert.torch_to_flax`. Weights are never downloaded.
"""
import os
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import convert, layers
from ldm_jax.models import text as text_lib

# The OpenAI checkpoints' text tower (both sizes use the same tokenizer).
_TEXT_B = dict(vocab_size=49408, max_length=77, width=512, num_layers=12, num_heads=8,
               mlp_dim=2048, act="quick_gelu")
PRESETS = {
    "ViT-B/32": dict(text=_TEXT_B, projection_dim=512,
                     vision=dict(image_size=224, patch_size=32, width=768, num_layers=12,
                                 num_heads=12, mlp_dim=3072, act="quick_gelu")),
    "ViT-L/14": dict(text=dict(_TEXT_B, width=768, num_heads=12, mlp_dim=3072),
                     projection_dim=768,
                     vision=dict(image_size=224, patch_size=14, width=1024, num_layers=24,
                                 num_heads=16, mlp_dim=4096, act="quick_gelu")),
}
HUB_NAMES = {"ViT-B/32": "openai/clip-vit-base-patch32",
             "ViT-L/14": "openai/clip-vit-large-patch14"}


class _VisionEmbeddings(nn.Module):
  """class_embedding + patch_embedding (a patch-strided conv) + position_embedding."""
  patch_size: int
  width: int
  num_positions: int
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, pixels):
    p = self.patch_size
    x = layers.Conv(self.width, p, strides=p, padding=0, use_bias=False, dtype=self.dtype,
                    name="patch_embedding")(pixels)
    x = x.reshape(x.shape[0], -1, self.width)
    cls = self.param("class_embedding", nn.with_logical_partitioning(
        nn.initializers.normal(0.02), ("embed",)), (self.width,))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.width)), x], 1)
    pos = layers.Embed(self.num_positions, self.width, axes=(None, "embed"), dtype=self.dtype,
                       name="position_embedding")(jnp.arange(self.num_positions))
    return x + pos[None]


class CLIPVisionTransformer(nn.Module):
  """transformers' `CLIPVisionTransformer`: (B, S, S, 3) normalised pixels -> the
  pooled class token after post_layernorm, (B, width)."""
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  num_layers: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  act: str = "quick_gelu"
  dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, pixels):
    if pixels.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"CLIP vision tower: images of {pixels.shape[1]}x{pixels.shape[2]}, "
                       f"the model takes {self.image_size}x{self.image_size}")
    n = (self.image_size // self.patch_size) ** 2 + 1
    x = _VisionEmbeddings(self.patch_size, self.width, n, self.dtype, name="embeddings")(pixels)
    x = layers.LayerNorm(name="pre_layrnorm")(x)
    x = text_lib._Encoder(self.num_layers, self.num_heads, self.mlp_dim, self.act, False,
                          self.dtype, name="encoder")(x)
    return layers.LayerNorm(name="post_layernorm")(x[:, 0]).astype(jnp.float32)


class CLIPModel(nn.Module):
  """Both towers and their projections (transformers' `CLIPModel`).

  Attributes:
    text: `CLIPTextTransformer` kwargs; vision: `CLIPVisionTransformer` kwargs.
    projection_dim: the shared embedding size.
    eos_token_id: the text is pooled at the first EOS token; 2 marks old configs,
      pooled at the highest token id as transformers does for them.
  """
  text: dict
  vision: dict
  projection_dim: int = 512
  eos_token_id: int = 49407
  dtype: Optional[jnp.dtype] = None

  def setup(self):  # several entry points share the towers
    self.text_model = text_lib.CLIPTextTransformer(**self.text, dtype=self.dtype)
    self.vision_model = CLIPVisionTransformer(**self.vision, dtype=self.dtype)
    self.visual_projection = layers.Dense(self.projection_dim, use_bias=False)
    self.text_projection = layers.Dense(self.projection_dim, use_bias=False)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(2.6592), ())

  def image_embeds(self, pixels):
    """(B, S, S, 3) normalised pixels -> (B, projection_dim), not normalised."""
    return self.visual_projection(self.vision_model(pixels))

  def text_embeds(self, ids):
    """(B, L) token ids -> (B, projection_dim), not normalised."""
    h = self.text_model(ids)
    at = ids if self.eos_token_id == 2 else (ids == self.eos_token_id).astype(jnp.int32)
    pooled = h[jnp.arange(h.shape[0]), jnp.argmax(at, axis=-1)]
    return self.text_projection(pooled)

  def __call__(self, pixels, ids):
    """Returns dict(image_embeds, text_embeds) (unit norm) and the scaled cosine
    logits `logits_per_image` (B_img, B_txt) and `logits_per_text`."""
    img = self.image_embeds(pixels)
    txt = self.text_embeds(ids)
    img = img / jnp.linalg.norm(img, axis=-1, keepdims=True)
    txt = txt / jnp.linalg.norm(txt, axis=-1, keepdims=True)
    logits = jnp.exp(self.logit_scale) * img @ txt.T
    return dict(image_embeds=img, text_embeds=txt, logits_per_image=logits,
                logits_per_text=logits.T)


def preset(name: str) -> dict:
  """CLIPModel kwargs of 'ViT-B/32' or 'ViT-L/14' (OpenAI's shapes)."""
  if name not in PRESETS:
    raise ValueError(f"unknown CLIP preset {name!r}; choose from {sorted(PRESETS)}")
  p = PRESETS[name]
  return dict(text=dict(p["text"]), vision=dict(p["vision"]), projection_dim=p["projection_dim"])


def missing_files(folder: str) -> list:
  """The files a CLIP folder lacks: config.json, the weights, the tokenizer's."""
  has = lambda n: os.path.isfile(os.path.join(folder, n))
  out = [n for n in ("config.json", "vocab.json", "merges.txt") if not has(n)]
  if not (has("model.safetensors") or has("pytorch_model.bin")):
    out.insert(1, "model.safetensors")
  return out


def _kwargs(cfg) -> dict:
  """CLIPModel kwargs from a transformers `CLIPConfig`."""
  t, v = cfg.text_config, cfg.vision_config
  for name, c in (("text_config", t), ("vision_config", v)):
    if c.layer_norm_eps != 1e-5 or c.hidden_act not in ("quick_gelu", "gelu"):
      raise ValueError(f"CLIP {name}: layer_norm_eps={c.layer_norm_eps}, hidden_act="
                       f"{c.hidden_act!r}; supported: 1e-05 and quick_gelu / gelu")
  text = dict(vocab_size=t.vocab_size, max_length=t.max_position_embeddings, width=t.hidden_size,
              num_layers=t.num_hidden_layers, num_heads=t.num_attention_heads,
              mlp_dim=t.intermediate_size, act=t.hidden_act)
  vision = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.hidden_size,
                num_layers=v.num_hidden_layers, num_heads=v.num_attention_heads,
                mlp_dim=v.intermediate_size, act=v.hidden_act)
  return dict(text=text, vision=vision, projection_dim=cfg.projection_dim,
              eos_token_id=t.eos_token_id)


def load_clip(folder: str, dtype=None):
  """Reads a local transformers `CLIPModel` folder (e.g. openai/clip-vit-large-patch14).

  Args:
    folder: holds config.json and model.safetensors (or pytorch_model.bin).
    dtype: compute dtype of the returned module.
  Returns:
    (CLIPModel, params) for `model.apply({'params': params}, pixels, ids)`.
  Raises:
    FileNotFoundError naming the missing file and where the folder comes from.
  """
  lacking = [n for n in missing_files(folder) if n not in ("vocab.json", "merges.txt")]
  if lacking:
    raise FileNotFoundError(
        f"CLIP: {os.path.join(folder, lacking[0])} not found; give a transformers CLIPModel "
        f"folder, e.g. `huggingface-cli download {HUB_NAMES['ViT-L/14']} --local-dir {folder}`")
  from transformers import CLIPConfig
  model = CLIPModel(**_kwargs(CLIPConfig.from_pretrained(folder, local_files_only=True)),
                    dtype=dtype)
  s = model.vision["image_size"]
  template = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, s, s, 3)),
                                     jnp.zeros((1, 1), jnp.int32))["params"])
  weights = next(os.path.join(folder, n) for n in ("model.safetensors", "pytorch_model.bin")
                 if os.path.isfile(os.path.join(folder, n)))
  params = convert.torch_to_flax(convert.load_torch_file(weights), template,
                                 ignore=[r"position_ids$"], what=f"CLIP model {folder}")
  return model, params
