"""The CompVis / Stability single-file layout <-> diffusers' names, both ways.

One file holds the whole model under
  model.diffusion_model.*    the UNet (openaimodel names: input_blocks.k.m, ...)
  model_ema.*                optional EMA of the UNet (LitEma: the key without dots)
  first_stage_model.*        the KL autoencoder (encoder.down.i.block.j, ...)
  cond_stage_model.transformer.text_model.*   SD 1.x: transformers' CLIPTextModel
  cond_stage_model.model.*   SD 2.x: OpenCLIP's text tower (resblocks, fused in_proj)
plus buffers of the noise schedule (betas, alphas_cumprod, ...).

A `KeyMap`, built from the architecture, pairs every CompVis module with the
diffusers module of the same weights; `to_diffusers` and `to_compvis` rename a
state dict through it, so loading and export use one table. The VAE's attention
projections are 1x1 convolutions in CompVis and linear layers in diffusers.
"""
import re
from typing import Dict, Iterable, List, Optional, Tuple

import numpy as np

UNET = "model.diffusion_model."
UNET_EMA = "model_ema."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer."
OPENCLIP = "cond_stage_model.model."
# Buffers of LatentDiffusion and its EMA bookkeeping: no weights of any module.
SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
                    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod",
                    "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar",
                    "model_ema.decay", "model_ema.num_updates")

_UNET_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"),
                ("emb_layers.1", "time_emb_proj"), ("out_layers.0", "norm2"),
                ("out_layers.3", "conv2"), ("skip_connection", "conv_shortcut"))
_VAE_RESNET = (("norm1", "norm1"), ("conv1", "conv1"), ("norm2", "norm2"), ("conv2", "conv2"),
               ("nin_shortcut", "conv_shortcut"))
_VAE_ATTN = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
             ("proj_out", "to_out.0"))


class KeyMap:
  """CompVis module names <-> diffusers module names of one model.

  `modules` pairs whole modules (the leaf, weight or bias, is carried over);
  `prefixes` pairs blocks whose inner names agree (the UNet's transformers);
  `linear` lists the diffusers modules stored as 1x1 convolutions in CompVis.
  """

  def __init__(self, modules: List[Tuple[str, str]], prefixes: List[Tuple[str, str]],
               linear: Iterable[str] = ()):
    self.c2d = dict(modules)
    self.d2c = {d: c for c, d in modules}
    self.prefixes = prefixes
    self.linear = set(linear)

  def _rename(self, key: str, exact: dict, pairs) -> Optional[str]:
    module, _, leaf = key.rpartition(".")
    if module in exact:
      return f"{exact[module]}.{leaf}"
    for src, dst in pairs:
      if key.startswith(src + "."):
        return dst + key[len(src):]
    return None

  def to_diffusers(self, sd: Dict[str, np.ndarray]) -> Tuple[dict, list]:
    """(diffusers-named state dict, CompVis keys with no counterpart)."""
    out, unused = {}, []
    for key, w in sd.items():
      new = self._rename(key, self.c2d, self.prefixes)
      if new is None:
        unused.append(key)
        continue
      if new.rpartition(".")[0] in self.linear and w.ndim == 4:
        w = w.reshape(w.shape[:2])
      out[new] = w
    return out, unused

  def to_compvis(self, sd: Dict[str, np.ndarray]) -> dict:
    """CompVis-named state dict of diffusers-named weights (every key must map)."""
    out = {}
    flipped = [(d, c) for c, d in self.prefixes]
    for key, w in sd.items():
      new = self._rename(key, self.d2c, flipped)
      if new is None:
        raise ValueError(f"no CompVis name for the weight {key}")
      if key.rpartition(".")[0] in self.linear and w.ndim == 2:
        w = w.reshape(w.shape + (1, 1))
      out[new] = w
    return out


def _resnet(pairs, src, dst, table):
  pairs += [(f"{src}.{a}", f"{dst}.{b}") for a, b in table]


def unet_map(kw: dict) -> KeyMap:
  """The KeyMap of a UNet with UNetModel kwargs `kw` (keys without `model.diffusion_model.`)."""
  levels, nrb = len(kw["channel_mult"]), kw["num_res_blocks"]
  attn = [2 ** i in tuple(kw["attention_resolutions"]) for i in range(levels)]
  mods = [("time_embed.0", "time_embedding.linear_1"), ("time_embed.2", "time_embedding.linear_2"),
          ("input_blocks.0.0", "conv_in"), ("out.0", "conv_norm_out"), ("out.2", "conv_out")]
  pre = []
  for i in range(levels):
    for j in range(nrb):
      k = 1 + i * (nrb + 1) + j
      _resnet(mods, f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", _UNET_RESNET)
      if attn[i]:
        pre.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}"))
    if i < levels - 1:
      mods.append((f"input_blocks.{(i + 1) * (nrb + 1)}.0.op", f"down_blocks.{i}.downsamplers.0.conv"))
  _resnet(mods, "middle_block.0", "mid_block.resnets.0", _UNET_RESNET)
  pre.append(("middle_block.1", "mid_block.attentions.0"))
  _resnet(mods, "middle_block.2", "mid_block.resnets.1", _UNET_RESNET)
  for u in range(levels):
    level = levels - 1 - u
    for j in range(nrb + 1):
      k = u * (nrb + 1) + j
      _resnet(mods, f"output_blocks.{k}.0", f"up_blocks.{u}.resnets.{j}", _UNET_RESNET)
      if attn[level]:
        pre.append((f"output_blocks.{k}.1", f"up_blocks.{u}.attentions.{j}"))
    if u < levels - 1:
      k = u * (nrb + 1) + nrb
      mods.append((f"output_blocks.{k}.{2 if attn[level] else 1}.conv",
                   f"up_blocks.{u}.upsamplers.0.conv"))
  return KeyMap(mods, pre)


def vae_map(kw: dict) -> KeyMap:
  """The KeyMap of an AutoencoderKL with kwargs `kw` (keys without `first_stage_model.`)."""
  levels, nrb = len(kw["ch_mult"]), kw["num_res_blocks"]
  size = kw["resolution"]
  attn = [size // 2 ** i in tuple(kw.get("attn_resolutions", ())) for i in range(levels)]
  mods = [(n, n) for n in ("encoder.conv_in", "encoder.conv_out", "decoder.conv_in",
                           "decoder.conv_out", "quant_conv", "post_quant_conv")]
  mods += [("encoder.norm_out", "encoder.conv_norm_out"),
           ("decoder.norm_out", "decoder.conv_norm_out")]
  linear = []

  def attention(src, dst):
    _resnet(mods, src, dst, _VAE_ATTN)
    linear.extend(f"{dst}.{b}" for b in ("to_q", "to_k", "to_v", "to_out.0"))

  for part in ("encoder", "decoder"):
    _resnet(mods, f"{part}.mid.block_1", f"{part}.mid_block.resnets.0", _VAE_RESNET)
    attention(f"{part}.mid.attn_1", f"{part}.mid_block.attentions.0")
    _resnet(mods, f"{part}.mid.block_2", f"{part}.mid_block.resnets.1", _VAE_RESNET)
  for i in range(levels):
    for j in range(nrb):
      _resnet(mods, f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}",
              _VAE_RESNET)
      if attn[i]:
        attention(f"encoder.down.{i}.attn.{j}", f"encoder.down_blocks.{i}.attentions.{j}")
    if i < levels - 1:
      mods.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv"))
  for u in range(levels):
    i = levels - 1 - u  # CompVis numbers the decoder's levels from the top resolution
    for j in range(nrb + 1):
      _resnet(mods, f"decoder.up.{i}.block.{j}", f"decoder.up_blocks.{u}.resnets.{j}", _VAE_RESNET)
      if attn[i]:
        attention(f"decoder.up.{i}.attn.{j}", f"decoder.up_blocks.{u}.attentions.{j}")
    if u < levels - 1:
      mods.append((f"decoder.up.{i}.upsample.conv", f"decoder.up_blocks.{u}.upsamplers.0.conv"))
  return KeyMap(mods, [], linear)


_OPENCLIP_LAYER = (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                   ("attn.out_proj", "self_attn.out_proj"), ("mlp.c_fc", "mlp.fc1"),
                   ("mlp.c_proj", "mlp.fc2"))
_OPENCLIP_TOP = (("token_embedding.weight", "embeddings.token_embedding.weight"),
                 ("positional_embedding", "embeddings.position_embedding.weight"),
                 ("ln_final.weight", "final_layer_norm.weight"),
                 ("ln_final.bias", "final_layer_norm.bias"))
# OpenCLIP's CLIP-head weights; SD conditions on the token states, not the pooled embedding.
OPENCLIP_UNUSED = ("text_projection", "logit_scale", "attn_mask")


def openclip_to_transformers(sd: Dict[str, np.ndarray]) -> Tuple[dict, list]:
  """OpenCLIP text-tower keys (without `cond_stage_model.model.`) -> transformers'
  CLIPTextModel keys; the fused attention input projection `in_proj_{weight,bias}`
  (3 D x D, rows q, k, v) is split into q_proj, k_proj, v_proj.

  Returns:
    (transformers-named state dict, keys with no counterpart).
  """
  out, unused = {}, []
  top = dict(_OPENCLIP_TOP)
  for key, w in sd.items():
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key)
    fused = re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key)
    if key in top:
      out[top[key]] = w
    elif fused:
      layer, leaf = fused.groups()
      for name, part in zip("qkv", np.split(w, 3, axis=0)):
        out[f"encoder.layers.{layer}.self_attn.{name}_proj.{leaf}"] = part
    elif m and m.group(2) in dict(_OPENCLIP_LAYER):
      out[f"encoder.layers.{m.group(1)}.{dict(_OPENCLIP_LAYER)[m.group(2)]}.{m.group(3)}"] = w
    elif key not in OPENCLIP_UNUSED:
      unused.append(key)
  return out, unused


def transformers_to_openclip(sd: Dict[str, np.ndarray]) -> dict:
  """The inverse of `openclip_to_transformers` (q, k, v projections fused again)."""
  top = {d: c for c, d in _OPENCLIP_TOP}
  layer_names = {d: c for c, d in _OPENCLIP_LAYER}
  out, qkv = {}, {}
  for key, w in sd.items():
    m = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key)
    if key in top:
      out[top[key]] = w
    elif m and m.group(2) in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
      qkv.setdefault((m.group(1), m.group(3)), {})[m.group(2)[-6]] = w
    elif m and m.group(2) in layer_names:
      out[f"transformer.resblocks.{m.group(1)}.{layer_names[m.group(2)]}.{m.group(3)}"] = w
    else:
      raise ValueError(f"no OpenCLIP name for the text-encoder weight {key}")
  for (layer, leaf), parts in qkv.items():
    out[f"transformer.resblocks.{layer}.attn.in_proj_{leaf}"] = np.concatenate(
        [parts["q"], parts["k"], parts["v"]], axis=0)
  return out


def split(sd: Dict[str, np.ndarray]) -> Dict[str, dict]:
  """The single file's parts by prefix (prefix stripped): unet, unet_ema, vae, clip,
  openclip; `other` keeps everything else with its full name."""
  prefixes = (("unet", UNET), ("unet_ema", UNET_EMA), ("vae", VAE), ("clip", CLIP),
              ("openclip", OPENCLIP))
  parts = {name: {} for name, _ in prefixes}
  parts["other"] = {}
  for key, w in sd.items():
    for name, prefix in prefixes:
      if key.startswith(prefix):
        parts[name][key[len(prefix):]] = w
        break
    else:
      parts["other"][key] = w
  return parts


def ema_name(unet_key: str) -> str:
  """LitEma's name (after `model_ema.`) of a UNet weight: its key after `model.`, without
  dots (`input_blocks.0.0.weight` -> `diffusion_modelinput_blocks00weight`)."""
  return ("diffusion_model." + unet_key).replace(".", "")
