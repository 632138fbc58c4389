"""A stage-2 model written out as Stable Diffusion: a diffusers folder or one CompVis file.

`describe(task, state, config)` gathers what a Stable Diffusion pipeline holds --
UNet, KL autoencoder, CLIP text encoder and tokenizer, schedule, latent scale --
from an `LDMTask` and its state, as diffusers-named float32 state dicts and
diffusers configs; an ldm_jax model that diffusers' classes cannot express (its own
text transformer or word / byte tokenizer, a VQ first stage, a patched UNet, class,
pooled or concatenated conditioning, ...) raises `NotExpressible` listing every
reason. `write_diffusers` lays it out as `StableDiffusionPipeline.from_pretrained`
reads it; `write_single_file` as one `.safetensors` in the CompVis layout (SD 1.x
CLIP or, for a GELU text tower, SD 2.x OpenCLIP names), with the schedule's buffers.
"""
import dataclasses
import json
import os

import jax
import numpy as np

from ldm_jax.models import convert, text as text_lib
from ldm_jax.pretrained import architecture, compvis
from ldm_jax.pretrained.architecture import NotExpressible
from ldm_jax.training.ldm import timestep_spacing

_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
    "requires_safety_checker": False, "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclasses.dataclass
class Exported:
  """A Stable Diffusion pipeline's parts, diffusers-named (float32 numpy)."""
  unet_config: dict
  unet: dict
  vae_config: dict
  vae: dict
  text_config: dict
  text: dict
  text_kwargs: dict  # CLIPTextTransformer kwargs (which layout the single file uses)
  tokenizer: text_lib.CLIPTokenizerFromFolder
  scheduler_config: dict


def _module_kwargs(module, names) -> dict:
  return {n: getattr(module, n) for n in names}


def _expressibility(task) -> list:
  problems = []
  cond, first = task.cond, task.first
  if first.kind != "kl":
    problems.append(f"the first stage is a {first.kind.upper()} model (Stable Diffusion's is "
                    "a KL AutoencoderKL)")
  if cond.context != "text":
    problems.append("the model has no text conditioning")
  elif not isinstance(cond.text_model, text_lib.CLIPTextTransformer):
    problems.append(f"the text encoder is ldm_jax's {type(cond.text_model).__name__} "
                    "(diffusers' pipeline takes a transformers CLIPTextModel)")
  elif not isinstance(cond.tokenizer, text_lib.CLIPTokenizerFromFolder):
    problems.append(f"the tokenizer is a {type(cond.tokenizer).__name__} (a CLIP BPE "
                    "tokenizer is needed)")
  if cond.classes:
    problems.append(f"class conditioning ({cond.classes} classes)")
  if cond.concat != "none":
    problems.append(f"concatenated '{cond.concat}' conditioning")
  if cond.pooled:
    problems.append("pooled text conditioning through the adm input")
  for reason in ("patch_size", "resblock_updown"):
    if getattr(task.unet, reason) not in (1, False):
      problems.append(f"the UNet's {reason}={getattr(task.unet, reason)}")
  return problems


def describe(task, state, config, *, ema: bool = True) -> Exported:
  """The pipeline parts of a stage-2 `task` and `state` (EMA weights if `ema`).

  Raises:
    NotExpressible: naming everything diffusers' Stable Diffusion cannot express.
  """
  problems = _expressibility(task)
  if problems:
    raise NotExpressible("this model cannot be written as a Stable Diffusion pipeline: "
                         + "; ".join(problems))
  params = state["ema"] if ema else state["params"]
  unet_kw = _module_kwargs(task.unet, (
      "in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
      "attention_resolutions", "num_heads", "num_head_channels", "transformer_depth",
      "context_dim", "use_linear_in_transformer", "use_scale_shift_norm", "resblock_updown",
      "dropout", "norm_num_groups", "patch_size", "num_classes"))
  vae_kw = _module_kwargs(task.first.model, ("ch", "ch_mult", "num_res_blocks",
                                             "attn_resolutions", "z_channels", "resolution",
                                             "norm_groups"))
  text_kw = _module_kwargs(task.cond.text_model, ("vocab_size", "max_length", "width",
                                                  "num_layers", "num_heads", "mlp_dim", "act",
                                                  "layer"))
  text_params = (params if task.cond.text_trainable else state["frozen"])["cond"]["params"]
  c2 = config.stage2
  sampling = dict(timestep_spacing=timestep_spacing(c2),
                  steps_offset=c2.sample.get("steps_offset", 0),
                  set_alpha_to_one=c2.sample.get("set_alpha_to_one", True))
  scale = float(jax.device_get(state["scale_factor"]))
  return Exported(
      unet_config=architecture.unet_config(unet_kw, config.data.resolution // task.first.factor),
      unet=convert.flax_to_torch(params["unet"]["params"]),
      vae_config=architecture.vae_config(vae_kw, scale),
      vae=convert.flax_to_torch(state["frozen"]["first_stage"]["params"]),
      text_config=architecture.clip_config(text_kw, task.cond.tokenizer),
      text=convert.flax_to_torch(text_params), text_kwargs=text_kw,
      tokenizer=task.cond.tokenizer,
      scheduler_config=architecture.scheduler_config(dict(c2.schedule), c2.prediction_type,
                                                     sampling))


def check_new_output(path: str):
  """Raises ValueError if `path` exists (a non-empty folder or a file)."""
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise ValueError(f"--out={path} exists; give a new path (nothing is overwritten)")


def _save(sd: dict, path: str, dtype: str):
  from safetensors.numpy import save_file
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  save_file({k: np.ascontiguousarray(v.astype(DTYPES[dtype])) for k, v in sd.items()}, path,
            metadata={"format": "pt"})  # transformers refuses files without a format


def _json(obj: dict, path: str):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    json.dump(obj, f, indent=2)


def write_diffusers(e: Exported, out: str, *, dtype: str = "float32") -> str:
  """Writes a diffusers StableDiffusionPipeline folder; returns its path."""
  check_new_output(out)
  import diffusers
  version = diffusers.__version__
  _json(dict(_MODEL_INDEX, _diffusers_version=version), os.path.join(out, "model_index.json"))
  for name, cfg, sd in (("unet", e.unet_config, e.unet), ("vae", e.vae_config, e.vae)):
    _json(dict(cfg, _diffusers_version=version), os.path.join(out, name, "config.json"))
    _save(sd, os.path.join(out, name, "diffusion_pytorch_model.safetensors"), dtype)
  _json(dict(e.text_config, torch_dtype=dtype), os.path.join(out, "text_encoder", "config.json"))
  _save({"text_model." + k: v for k, v in e.text.items()},
        os.path.join(out, "text_encoder", "model.safetensors"), dtype)
  e.tokenizer.tokenizer.save_pretrained(os.path.join(out, "tokenizer"))
  _json(dict(e.scheduler_config, _diffusers_version=version),
        os.path.join(out, "scheduler", "scheduler_config.json"))
  return out


def schedule_buffers(scheduler_config: dict) -> dict:
  """The noise-schedule buffers CompVis' LatentDiffusion stores (v_posterior = 0)."""
  from ldm_jax.diffusion.schedule import make_betas, rescale_zero_terminal_snr
  kind = architecture.BETA_SCHEDULES[scheduler_config["beta_schedule"]]
  b = make_betas(kind, scheduler_config["num_train_timesteps"], scheduler_config["beta_start"],
                 scheduler_config["beta_end"])
  if scheduler_config["rescale_betas_zero_snr"]:
    b = rescale_zero_terminal_snr(b)
  ac = np.cumprod(1 - b)
  prev = np.append(1.0, ac[:-1])
  var = b * (1 - prev) / (1 - ac)
  return dict(betas=b, alphas_cumprod=ac, alphas_cumprod_prev=prev,
              sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1 - ac),
              log_one_minus_alphas_cumprod=np.log(1 - ac), sqrt_recip_alphas_cumprod=np.sqrt(1 / ac),
              sqrt_recipm1_alphas_cumprod=np.sqrt(1 / ac - 1), posterior_variance=var,
              posterior_log_variance_clipped=np.log(np.maximum(var, 1e-20)),
              posterior_mean_coef1=b * np.sqrt(prev) / (1 - ac),
              posterior_mean_coef2=(1 - prev) * np.sqrt(1 - b) / (1 - ac))


def write_single_file(e: Exported, out: str, *, dtype: str = "float32") -> str:
  """Writes one CompVis-layout `.safetensors`; returns its path.

  A 'penultimate' text encoder is written with the layers it uses only (as diffusers'
  conversion script writes SD 2): a 23-layer OpenCLIP tower is read back whole.
  """
  if not out.endswith(".safetensors"):
    raise ValueError(f"--out={out}: a single file is written as .safetensors")
  check_new_output(out)
  unet_kw, _ = architecture.unet_kwargs(e.unet_config)
  vae_kw, _ = architecture.vae_kwargs(e.vae_config)
  sd = {compvis.UNET + k: v for k, v in compvis.unet_map(unet_kw).to_compvis(e.unet).items()}
  sd.update({compvis.VAE + k: v for k, v in compvis.vae_map(vae_kw).to_compvis(e.vae).items()})
  if e.text_kwargs["act"] == "gelu":  # an OpenCLIP tower: SD 2.x's names
    sd.update({compvis.OPENCLIP + k: v for k, v in compvis.transformers_to_openclip(e.text).items()})
  else:
    sd.update({compvis.CLIP + "text_model." + k: v for k, v in e.text.items()})
  sd.update({k: v.astype(np.float32) for k, v in schedule_buffers(e.scheduler_config).items()})
  _save(sd, out, dtype)
  return out


def export_checkpoint(ckpt_dir: str, out: str, *, fmt: str = "diffusers", ema: bool = True,
                      dtype: str = "float32", step=None) -> str:
  """Writes the stage-2 checkpoint in `ckpt_dir` to `out` (the `ldm_jax.export` CLI).

  Args:
    ckpt_dir: a stage-2 checkpoints folder.
    out: a new folder (fmt 'diffusers') or .safetensors file (fmt 'single_file').
    ema: the EMA weights (else the trained ones).
    dtype: 'float32' or 'float16' as stored.
    step: the checkpoint step (default: the latest).

  Returns:
    The written path.
  """
  from ldm_jax import sampling
  if fmt not in ("diffusers", "single_file"):
    raise ValueError(f"format={fmt!r} is not 'diffusers' or 'single_file'")
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}")
  check_new_output(out)  # before the restore
  # onto one device: the weights only go to the host (and a replica per device costs)
  task, state, _, config = sampling.load(ckpt_dir, step, devices=jax.devices()[:1])
  parts = describe(task, state, config, ema=ema)
  write = write_diffusers if fmt == "diffusers" else write_single_file
  return write(parts, out, dtype=dtype)
