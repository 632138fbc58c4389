"""diffusers / transformers configs <-> ldm_jax model kwargs, both ways, checked.

Reading: a `config.json` of `UNet2DConditionModel`, `AutoencoderKL` or
`CLIPTextModel`, or a `scheduler_config.json`, becomes the kwargs of
`models.unet.UNetModel`, `models.autoencoder.AutoencoderKL`,
`models.text.CLIPTextTransformer` or the stage-2 schedule. Any setting ldm_jax's
modules do not implement fails with `ValueError` naming the file's field, so an
unknown architecture stops before a weight is read.

Writing: the same kwargs become configs diffusers reads; what diffusers cannot
express (a patched UNet, resnets that resample, ...) raises `NotExpressible`.
"""
import logging
from typing import Optional, Tuple

log = logging.getLogger("ldm_jax")

# UNet2DConditionModel fields ldm_jax implements with one value only (absent = default).
_UNET_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0,
    "time_embedding_type": "positional", "class_embed_type": None, "addition_embed_type": None,
    "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "dual_cross_attention": False, "downsample_padding": 1, "mid_block_type":
    "UNetMidBlock2DCrossAttn", "mid_block_scale_factor": 1, "norm_eps": 1e-5,
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "attention_type": "default",
    "class_embeddings_concat": False, "cross_attention_norm": None,
    "reverse_transformer_layers_per_block": None,
}
_VAE_FIXED = {"in_channels": 3, "out_channels": 3, "act_fn": "silu", "shift_factor": None,
              "latents_mean": None, "latents_std": None, "use_quant_conv": True,
              "use_post_quant_conv": True, "mid_block_add_attention": True}
# diffusers beta_schedule -> ldm_jax schedule kind
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear",
                  "squaredcos_cap_v2": "cosine"}
_PREDICTION_TYPES = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}
_SPACINGS = {"leading": "leading", "trailing": "trailing", "linspace": "linspace"}
SD_VAE_SCALE = 0.18215  # diffusers' AutoencoderKL default scaling_factor (SD 1.x / 2.x)


class NotExpressible(ValueError):
  """An ldm_jax model that diffusers' Stable Diffusion classes cannot express."""


def _fixed(cfg: dict, fixed: dict, what: str):
  for key, want in fixed.items():
    got = cfg.get(key, want)
    if got != want and not (isinstance(want, float) and abs(float(got) - want) < 1e-9):
      raise ValueError(f"{what}: {key}={got!r} is not supported (ldm_jax implements {want!r})")


def _per_level(value, n: int, key: str, what: str) -> list:
  values = list(value) if isinstance(value, (list, tuple)) else [value] * n
  if len(values) != n:
    raise ValueError(f"{what}: {key} has {len(values)} entries for {n} levels")
  return values


def _uniform(values: list, key: str, what: str):
  if len(set(map(str, values))) > 1:
    raise ValueError(f"{what}: {key}={values} differs between levels (ldm_jax's UNet uses one)")
  return values[0]


def unet_kwargs(cfg: dict, what: str = "unet/config.json") -> Tuple[dict, Optional[int]]:
  """(UNetModel kwargs, sample_size) of a UNet2DConditionModel config."""
  _fixed(cfg, _UNET_FIXED, what)
  oca = cfg.get("only_cross_attention", False)
  if any(oca) if isinstance(oca, (list, tuple)) else oca:
    raise ValueError(f"{what}: only_cross_attention={oca} is not supported")
  boc = list(cfg["block_out_channels"])
  n, mc = len(boc), boc[0]
  if any(c % mc for c in boc):
    raise ValueError(f"{what}: block_out_channels={boc} are not multiples of the first")
  down = list(cfg["down_block_types"])
  attn = []
  for t in down:
    if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
      raise ValueError(f"{what}: down block type {t!r} is not supported "
                       "(CrossAttnDownBlock2D, DownBlock2D)")
    attn.append(t == "CrossAttnDownBlock2D")
  want_up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
  if list(cfg["up_block_types"]) != want_up:
    raise ValueError(f"{what}: up_block_types={cfg['up_block_types']} do not mirror "
                     f"down_block_types (expected {want_up})")
  heads = _per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), n,
                     "attention_head_dim", what)  # diffusers' legacy name for the head count
  used = [i for i in range(n) if attn[i]] + [n - 1]  # levels with attention, and the middle
  if len({heads[i] for i in used}) == 1:
    num_heads, head_channels = heads[used[0]], -1
  elif len({boc[i] // heads[i] for i in used}) == 1:
    num_heads, head_channels = -1, boc[used[0]] // heads[used[0]]
  else:
    raise ValueError(f"{what}: attention heads {heads} keep neither the head count nor "
                     f"the head width across block_out_channels={boc}")
  depth = _per_level(cfg.get("transformer_layers_per_block", 1), n,
                     "transformer_layers_per_block", what)
  context = _per_level(cfg.get("cross_attention_dim", 1280), n, "cross_attention_dim", what)
  shift = cfg.get("resnet_time_scale_shift", "default")
  if shift not in ("default", "scale_shift"):
    raise ValueError(f"{what}: resnet_time_scale_shift={shift!r} is not supported")
  kw = dict(in_channels=cfg.get("in_channels", 4), out_channels=cfg.get("out_channels", 4),
            model_channels=mc, channel_mult=tuple(c // mc for c in boc),
            num_res_blocks=_uniform(_per_level(cfg.get("layers_per_block", 2), n,
                                               "layers_per_block", what), "layers_per_block", what),
            attention_resolutions=tuple(2 ** i for i in range(n) if attn[i]),
            num_heads=num_heads, num_head_channels=head_channels,
            transformer_depth=_uniform([depth[i] for i in used[:-1]] or [1],
                                       "transformer_layers_per_block", what),
            context_dim=_uniform(context, "cross_attention_dim", what),
            use_linear_in_transformer=bool(cfg.get("use_linear_projection", False)),
            use_scale_shift_norm=shift == "scale_shift", resblock_updown=False,
            dropout=float(cfg.get("dropout", 0.0)), norm_num_groups=cfg.get("norm_num_groups", 32),
            patch_size=1)
  return kw, cfg.get("sample_size")


def unet_config(kw: dict, sample_size: int) -> dict:
  """UNet2DConditionModel config of UNetModel kwargs (the inverse of `unet_kwargs`)."""
  if kw.get("patch_size", 1) != 1:
    raise NotExpressible(f"a UNet with patch_size={kw['patch_size']} (diffusers' "
                         "UNet2DConditionModel has no patchified input)")
  if kw.get("resblock_updown"):
    raise NotExpressible("a UNet whose resnets resample (resblock_updown=True) with "
                         "cross-attention (no such diffusers block)")
  if kw.get("context_dim") is None:
    raise NotExpressible("a UNet without cross-attention (context_dim=None) in a "
                         "text-to-image pipeline")
  if kw.get("num_classes") is not None:
    raise NotExpressible("a UNet with class / adm conditioning (num_classes) in "
                         "StableDiffusionPipeline")
  mc, mult = kw["model_channels"], list(kw["channel_mult"])
  boc = [mc * m for m in mult]
  attn = [2 ** i in tuple(kw["attention_resolutions"]) for i in range(len(mult))]
  if kw.get("num_head_channels", -1) == -1:
    heads = kw["num_heads"]
  else:
    heads = [max(c // kw["num_head_channels"], 1) for c in boc]
  return {
      "_class_name": "UNet2DConditionModel", "sample_size": sample_size,
      "in_channels": kw["in_channels"], "out_channels": kw["out_channels"],
      "block_out_channels": boc, "layers_per_block": kw["num_res_blocks"],
      "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attn],
      "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
      "mid_block_type": "UNetMidBlock2DCrossAttn", "attention_head_dim": heads,
      "cross_attention_dim": kw["context_dim"],
      "transformer_layers_per_block": kw.get("transformer_depth", 1),
      "use_linear_projection": bool(kw.get("use_linear_in_transformer", False)),
      "resnet_time_scale_shift": "scale_shift" if kw.get("use_scale_shift_norm") else "default",
      "norm_num_groups": kw.get("norm_num_groups", 32), "norm_eps": 1e-5,
      "dropout": kw.get("dropout", 0.0), "act_fn": "silu", "flip_sin_to_cos": True,
      "freq_shift": 0, "downsample_padding": 1, "center_input_sample": False,
      "upcast_attention": False, "only_cross_attention": False,
  }


def vae_kwargs(cfg: dict, what: str = "vae/config.json") -> Tuple[dict, float]:
  """(AutoencoderKL kwargs, latent scale factor) of a diffusers AutoencoderKL config."""
  _fixed(cfg, _VAE_FIXED, what)
  boc = list(cfg.get("block_out_channels", (64,)))
  n, ch = len(boc), boc[0]
  if any(c % ch for c in boc):
    raise ValueError(f"{what}: block_out_channels={boc} are not multiples of the first")
  down = list(cfg.get("down_block_types", ("DownEncoderBlock2D",)))
  known = ("DownEncoderBlock2D", "AttnDownEncoderBlock2D")
  if len(down) != n or any(t not in known for t in down):
    raise ValueError(f"{what}: down_block_types={down} are not {n} of {known}")
  attn = [t == "AttnDownEncoderBlock2D" for t in down]
  want_up = ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in reversed(attn)]
  if list(cfg.get("up_block_types", ("UpDecoderBlock2D",))) != want_up:
    raise ValueError(f"{what}: up_block_types={cfg.get('up_block_types')} do not mirror "
                     f"down_block_types (expected {want_up})")
  size = int(cfg.get("sample_size", 32))
  kw = dict(ch=ch, ch_mult=tuple(c // ch for c in boc), num_res_blocks=cfg.get("layers_per_block", 1),
            attn_resolutions=tuple(size // 2 ** i for i in range(n) if attn[i]),
            z_channels=cfg.get("latent_channels", 4), dropout=0.0, resolution=size,
            norm_groups=cfg.get("norm_num_groups", 32))
  return kw, float(cfg.get("scaling_factor", SD_VAE_SCALE))


def vae_config(kw: dict, scale_factor: float) -> dict:
  """diffusers AutoencoderKL config of AutoencoderKL kwargs."""
  n, size = len(kw["ch_mult"]), kw["resolution"]
  attn = [size // 2 ** i in tuple(kw.get("attn_resolutions", ())) for i in range(n)]
  return {
      "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3,
      "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in attn],
      "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D"
                         for a in reversed(attn)],
      "block_out_channels": [kw["ch"] * m for m in kw["ch_mult"]],
      "layers_per_block": kw["num_res_blocks"], "act_fn": "silu",
      "latent_channels": kw["z_channels"], "norm_num_groups": kw.get("norm_groups", 32),
      "sample_size": size, "scaling_factor": float(scale_factor),
  }


def clip_config(kw: dict, tokenizer=None) -> dict:
  """transformers CLIPTextConfig fields of CLIPTextTransformer kwargs: the layers it
  uses (a 'penultimate' encoder is written without its unused last layer, as diffusers'
  SD 2 `text_encoder/`)."""
  layers = kw["num_layers"] - (kw.get("layer", "last") == "penultimate")
  cfg = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
         "vocab_size": kw["vocab_size"], "max_position_embeddings": kw["max_length"],
         "hidden_size": kw["width"], "num_hidden_layers": layers,
         "num_attention_heads": kw["num_heads"], "intermediate_size": kw["mlp_dim"],
         "hidden_act": kw.get("act", "quick_gelu"), "layer_norm_eps": 1e-5,
         "projection_dim": kw["width"], "attention_dropout": 0.0, "dropout": 0.0,
         "initializer_factor": 1.0, "initializer_range": 0.02}
  if tokenizer is not None:  # the ids transformers checks against the vocabulary
    tok = tokenizer.tokenizer
    cfg.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
               pad_token_id=tok.pad_token_id)
  return cfg


def scheduler_settings(cfg: dict, what: str = "scheduler/scheduler_config.json"):
  """(schedule, prediction_type, sampling) of a diffusers scheduler config.

  Returns:
    schedule: config.stage2.schedule fields (kind, T, linear_start, linear_end,
      zero_terminal_snr); prediction_type: 'eps' | 'v' | 'x0'; sampling:
      config.stage2.sample fields (timestep_spacing, steps_offset, set_alpha_to_one).
  """
  if cfg.get("trained_betas") is not None:
    raise ValueError(f"{what}: trained_betas is not supported (a named beta_schedule is)")
  name = cfg.get("beta_schedule", "linear")
  if name not in BETA_SCHEDULES:
    raise ValueError(f"{what}: beta_schedule={name!r} is not one of {sorted(BETA_SCHEDULES)}")
  pred = cfg.get("prediction_type", "epsilon")
  if pred not in _PREDICTION_TYPES:
    raise ValueError(f"{what}: prediction_type={pred!r} is not one of {sorted(_PREDICTION_TYPES)}")
  spacing = cfg.get("timestep_spacing", "leading")
  if spacing not in _SPACINGS:
    raise ValueError(f"{what}: timestep_spacing={spacing!r} is not one of {sorted(_SPACINGS)}")
  cls = cfg.get("_class_name", "DDIMScheduler")
  if cls == "DDIMScheduler" and cfg.get("clip_sample", True):
    log.warning("%s: clip_sample=True (x0 clipped to [-1, 1]) is not applied", what)
  if cfg.get("thresholding", False):
    log.warning("%s: thresholding=True is not applied", what)
  schedule = dict(kind=BETA_SCHEDULES[name], T=int(cfg.get("num_train_timesteps", 1000)),
                  linear_start=float(cfg.get("beta_start", 0.0001)),
                  linear_end=float(cfg.get("beta_end", 0.02)),
                  zero_terminal_snr=bool(cfg.get("rescale_betas_zero_snr", False)))
  # PNDM (SD 1.x's shipped scheduler) ends at alphas_cumprod[0]; DDIM's default ends at 1.
  sampling = dict(timestep_spacing=_SPACINGS[spacing], steps_offset=int(cfg.get("steps_offset", 0)),
                  set_alpha_to_one=bool(cfg.get("set_alpha_to_one", cls != "PNDMScheduler")))
  return schedule, _PREDICTION_TYPES[pred], sampling


def scheduler_config(schedule: dict, prediction_type: str, sampling: dict) -> dict:
  """A DDIMScheduler config of the stage-2 schedule and sampling grid."""
  inverse = {v: k for k, v in BETA_SCHEDULES.items()}
  if schedule["kind"] not in inverse:
    raise NotExpressible(f"the beta schedule {schedule['kind']!r} (diffusers names "
                         f"{sorted(BETA_SCHEDULES)})")
  spacing = {v: k for k, v in _SPACINGS.items()}.get(sampling.get("timestep_spacing", "leading"))
  if spacing is None:
    raise NotExpressible(f"timestep_spacing={sampling['timestep_spacing']!r} in a diffusers "
                         "scheduler")
  return {
      "_class_name": "DDIMScheduler", "num_train_timesteps": int(schedule["T"]),
      "beta_start": float(schedule["linear_start"]), "beta_end": float(schedule["linear_end"]),
      "beta_schedule": inverse[schedule["kind"]], "trained_betas": None, "clip_sample": False,
      "set_alpha_to_one": bool(sampling.get("set_alpha_to_one", True)),
      "steps_offset": int(sampling.get("steps_offset", 0)),
      "prediction_type": {v: k for k, v in _PREDICTION_TYPES.items()}[prediction_type],
      "thresholding": False, "timestep_spacing": spacing,
      "rescale_betas_zero_snr": bool(schedule.get("zero_terminal_snr", False)),
  }

