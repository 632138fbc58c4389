"""A CompVis / Stability single-file checkpoint (.safetensors or .ckpt) -> `Pretrained`.

The architecture is inferred from the tensors' shapes (`compvis` lists the layout):
widths, levels, res-blocks, where attention sits, transformer depth, context width,
conv or linear projections, the latent channels, the text tower's size. What
shapes cannot tell takes Stable Diffusion's values -- UNet heads (SD 1.x: 8;
SD 2.x, recognised by its OpenCLIP text tower: 64 channels each), text heads (64
channels each, as every CLIP text tower), GroupNorm groups (32), and for SD 2.x
v-prediction at 768 px -- unless `config=` names a diffusers folder whose component
configs (and tokenizer and scheduler) then describe the model, as diffusers'
`from_single_file(config=...)`. Either way the file's every tensor is checked
against the architecture.

SD 2 conditions on the penultimate layer of OpenCLIP's 24-layer text tower: a
tower of 23 layers (the last already dropped, as diffusers' conversion script and
ldm_jax's export write it) is used whole; any other depth drops its last layer
unless the config folder's num_hidden_layers says it is used whole.
"""
import re
from typing import Optional

import numpy as np

from ldm_jax.diffusion.schedule import make_betas
from ldm_jax.models import text as text_lib
from ldm_jax.pretrained import architecture, compvis, diffusers_folder, files, weights
from ldm_jax.pretrained.model import Pretrained

SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
# Stable Diffusion's DDIM grid (diffusers' SD scheduler configs).
SD_SAMPLING = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
SD_HEAD_CHANNELS = 64
SD1_UNET_HEADS = 8
_OPENCLIP_SD2_LAYERS = 23


def _count(keys, pattern: str) -> int:
  found = {int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m}
  return max(found) + 1 if found else 0


def infer_unet(sd: dict, sd2: bool, what: str) -> dict:
  """UNetModel kwargs from the shapes of `model.diffusion_model.*` (prefix stripped)."""
  if "label_emb.0.0.weight" in sd or "label_emb.weight" in sd:
    raise ValueError(f"{what}: a class-conditional UNet (label_emb) is not a supported "
                     "architecture")
  if "input_blocks.0.0.weight" not in sd:
    raise ValueError(f"{what}: the UNet has no input_blocks.0.0.weight (conv_in)")
  mc, in_ch = sd["input_blocks.0.0.weight"].shape[:2]
  blocks = _count(sd, r"input_blocks\.(\d+)\.")
  ops = sorted({int(m.group(1)) for k in sd for m in [re.match(r"input_blocks\.(\d+)\.0\.op\.", k)]
                if m})
  nrb = ops[0] - 1 if ops else blocks - 1
  levels = blocks // (nrb + 1)
  if levels * (nrb + 1) != blocks or len(ops) != levels - 1:
    raise ValueError(f"{what}: input_blocks 0..{blocks - 1} with downsamplers at {ops} are not "
                     "a UNet with the same res-blocks on every level (resblock_updown?)")
  mult, attn, depth = [], [], set()
  first = "middle_block.1"  # the first transformer: its projections tell their kind
  for i in range(levels):
    k = 1 + i * (nrb + 1)
    mult.append(sd[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0] // mc)
    if any(key.startswith(f"input_blocks.{k}.1.") for key in sd):
      if not attn:
        first = f"input_blocks.{k}.1"
      attn.append(2 ** i)
      depth.add(_count(sd, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\."))
  proj = sd[f"{first}.proj_in.weight"]
  context = sd[f"{first}.transformer_blocks.0.attn2.to_k.weight"].shape[1]
  emb = sd["input_blocks.1.0.emb_layers.1.weight"].shape[0]
  depth.add(_count(sd, r"middle_block\.1\.transformer_blocks\.(\d+)\."))
  if len(depth) != 1:
    raise ValueError(f"{what}: transformer depths {sorted(depth)} differ between levels")
  heads = dict(num_heads=-1, num_head_channels=SD_HEAD_CHANNELS) if sd2 else dict(
      num_heads=SD1_UNET_HEADS, num_head_channels=-1)
  return dict(in_channels=int(in_ch), out_channels=int(sd["out.2.weight"].shape[0]),
              model_channels=int(mc), channel_mult=tuple(int(m) for m in mult),
              num_res_blocks=int(nrb), attention_resolutions=tuple(attn), **heads,
              transformer_depth=depth.pop(), context_dim=int(context),
              use_linear_in_transformer=proj.ndim == 2,
              use_scale_shift_norm=emb == 2 * mult[0] * mc, resblock_updown=False, dropout=0.0,
              norm_num_groups=32, patch_size=1)


def infer_vae(sd: dict, what: str) -> dict:
  """AutoencoderKL kwargs from the shapes of `first_stage_model.*` (prefix stripped)."""
  if "encoder.conv_in.weight" not in sd:
    raise ValueError(f"{what}: the autoencoder has no encoder.conv_in.weight")
  ch = sd["encoder.conv_in.weight"].shape[0]
  levels = _count(sd, r"encoder\.down\.(\d+)\.")
  nrb = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.")
  z = sd["post_quant_conv.weight"].shape[0]
  if sd["quant_conv.weight"].shape[0] != 2 * z or sd["encoder.conv_out.weight"].shape[0] != 2 * z:
    raise ValueError(f"{what}: quant_conv / encoder.conv_out do not give 2 x {z} moments "
                     "(a KL autoencoder with embed_dim = z_channels)")
  size = 256  # only places attention; SD's VAE has none outside the middle
  return dict(ch=int(ch), ch_mult=tuple(int(sd[f"encoder.down.{i}.block.0.conv2.weight"].shape[0])
                                        // ch for i in range(levels)),
              num_res_blocks=int(nrb),
              attn_resolutions=tuple(size // 2 ** i for i in range(levels)
                                     if f"encoder.down.{i}.attn.0.q.weight" in sd),
              z_channels=int(z), dropout=0.0, resolution=size, norm_groups=32)


def _text_kwargs(part: dict, openclip: bool, config_kw: Optional[dict], what: str):
  """(CLIPTextTransformer kwargs, transformers-named state dict) of the text tower."""
  if openclip:
    sd, unused = compvis.openclip_to_transformers(part)
    if unused:
      raise ValueError(f"{what}: {len(unused)} text-encoder tensors of no known kind, e.g. "
                       + ", ".join(compvis.OPENCLIP + k for k in unused[:5]))
  else:
    sd = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in part.items()}
  n = _count(sd, r"encoder\.layers\.(\d+)\.")
  if config_kw is not None:
    if n not in (config_kw["num_layers"], config_kw["num_layers"] + 1):
      raise ValueError(f"{what}: the text tower has {n} layers; the config's text encoder "
                       f"{config_kw['num_layers']}")
    return dict(config_kw, num_layers=n,
                layer="last" if n == config_kw["num_layers"] else "penultimate"), sd
  tok = sd["embeddings.token_embedding.weight"]
  layer = "penultimate" if openclip and n != _OPENCLIP_SD2_LAYERS else "last"
  return dict(vocab_size=int(tok.shape[0]), width=int(tok.shape[1]),
              max_length=int(sd["embeddings.position_embedding.weight"].shape[0]),
              num_layers=n, num_heads=int(tok.shape[1]) // SD_HEAD_CHANNELS,
              mlp_dim=int(sd["encoder.layers.0.mlp.fc1.weight"].shape[0]),
              act="gelu" if openclip else "quick_gelu", layer=layer), sd


def infer_schedule(other: dict, what: str) -> dict:
  """The stage-2 schedule of the file's `betas` buffer (SD's when it has none)."""
  if "betas" not in other:
    return dict(kind="linear", T=1000, linear_start=0.00085, linear_end=0.012,
                zero_terminal_snr=False)
  betas = np.asarray(other["betas"], np.float64)
  for kind in ("linear", "sqrt_linear"):  # both run from betas[0] to betas[-1]
    ref = make_betas(kind, len(betas), float(betas[0]), float(betas[-1]))
    if np.allclose(betas, ref, rtol=1e-4, atol=1e-8):
      # the endpoints as written in a config (the buffer holds them in float32)
      return dict(kind=kind, T=len(betas), linear_start=float(f"{betas[0]:.6g}"),
                  linear_end=float(f"{betas[-1]:.6g}"), zero_terminal_snr=False)
  raise ValueError(f"{what}: its betas buffer follows neither the scaled-linear nor the "
                   "linear schedule")


def load(path: str, *, config: Optional[str] = None, tokenizer_path: Optional[str] = None,
         prediction_type: Optional[str] = None, ema: bool = True) -> Pretrained:
  """Reads a Stable Diffusion single file.

  Args:
    path: a .safetensors or .ckpt/.pt/.bin file (local or an fsspec URL).
    config: optional diffusers folder whose unet/, vae/, text_encoder/ configs describe
      the model (checked against the file) and whose tokenizer/ and scheduler/ are used.
    tokenizer_path: a CLIP tokenizer folder (default: `config`'s tokenizer/, if any).
    prediction_type: overrides 'eps' (SD 1.x) / 'v' (SD 2.x) / the config's scheduler.
    ema: take the UNet from `model_ema.*` when the file has it (the weights the
      reference samples with).

  Returns:
    A `Pretrained` (its tokenizer None when neither tokenizer_path nor config is given).
  """
  if not path.endswith(SUFFIXES):
    raise ValueError(f"{path}: not a single-file checkpoint (expected one of {SUFFIXES})")
  parts = compvis.split(files.read_weights(path))
  for name, prefix in (("unet", compvis.UNET), ("vae", compvis.VAE)):
    if not parts[name]:
      raise ValueError(f"{path}: no {prefix}* tensors: not a Stable Diffusion checkpoint")
  openclip = bool(parts["openclip"])
  if not openclip and not parts["clip"]:
    raise ValueError(f"{path}: no text encoder ({compvis.CLIP}* or {compvis.OPENCLIP}*)")
  extra = [k for k in parts["other"] if k not in compvis.SCHEDULE_BUFFERS]
  if extra:
    raise ValueError(f"{path}: {len(extra)} tensors belong to no part of Stable Diffusion, "
                     f"e.g. {', '.join(extra[:5])}")
  arch = diffusers_folder.architecture_of(config) if config else None
  unet_kw = arch["unet"] if arch else infer_unet(parts["unet"], openclip, path)
  vae_kw = arch["vae"] if arch else infer_vae(parts["vae"], path)
  text_kw, text_sd = _text_kwargs(parts["openclip"] or parts["clip"], openclip,
                                  arch["text"] if arch else None, path)
  text_lib.check_context_dim(text_kw["width"], unet_kw["context_dim"])

  unet_sd = parts["unet"]
  ema_part = {k: v for k, v in parts["unet_ema"].items() if k not in ("decay", "num_updates")}
  if ema and ema_part:
    missing = [k for k in unet_sd if compvis.ema_name(k) not in ema_part]
    if missing:
      raise ValueError(f"{path}: model_ema.* lacks {len(missing)} UNet weights, e.g. {missing[:3]}")
    unet_sd = {k: ema_part[compvis.ema_name(k)] for k in unet_sd}
  params = {}
  for name, sd, kmap, fn, kw in (
      ("unet", unet_sd, compvis.unet_map(unet_kw), weights.unet_params, unet_kw),
      ("vae", {k: v for k, v in parts["vae"].items() if not k.startswith("loss.")},
       compvis.vae_map(vae_kw), weights.vae_params, vae_kw)):
    converted, unused = kmap.to_diffusers(sd)
    if unused:
      raise ValueError(f"{path}: {len(unused)} {name} tensors have no place in the inferred "
                       f"architecture, e.g. {', '.join(unused[:5])}")
    params[name] = fn(converted, kw, f"{path} ({name})")
  params["text"] = weights.text_params(text_sd, text_kw, f"{path} (text encoder)")

  tok_path = tokenizer_path or (files.join(config, "tokenizer") if config else "")
  tok = diffusers_folder.tokenizer(tok_path, text_kw, path) if tok_path else None
  if arch:
    schedule, pred, sampling = arch["schedule"], arch["prediction_type"], arch["sampling"]
    resolution, scale = arch["resolution"], arch["scale_factor"]
  else:
    schedule, sampling = infer_schedule(parts["other"], path), dict(SD_SAMPLING)
    pred = "v" if openclip else "eps"
    resolution, scale = (768 if openclip else 512), architecture.SD_VAE_SCALE
  pred = prediction_type or pred
  if not arch and openclip and pred != "v":
    resolution = 512  # SD 2.x base: eps-prediction at 512 px
  return Pretrained(path=path, layout="single_file", unet=unet_kw, vae=vae_kw, text=text_kw,
                    tokenizer=tok, tokenizer_path=tok_path, schedule=schedule,
                    prediction_type=pred, sampling=sampling, scale_factor=scale,
                    resolution=resolution, params=params)
