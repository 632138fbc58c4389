"""A diffusers Stable Diffusion folder -> `Pretrained`.

The folder (local or any fsspec URL) holds `model_index.json` and the components
  unet/          config.json + diffusion_pytorch_model[.fp16].{safetensors,bin}
  vae/           the same
  text_encoder/  config.json + model[.fp16].safetensors or pytorch_model.bin
  tokenizer/     vocab.json + merges.txt or tokenizer.json (a CLIP BPE tokenizer)
  scheduler/     scheduler_config.json (optional: SD's schedule without it)
(sharded weights through their `.index.json` too). Every architecture is read from
its config and checked before a weight is read; the weights are checked against it.
"""
import logging
from typing import Optional

from ldm_jax.models import text as text_lib
from ldm_jax.pretrained import architecture, files, weights
from ldm_jax.pretrained.model import Pretrained

log = logging.getLogger("ldm_jax")
REQUIRED = ("unet", "vae", "text_encoder", "tokenizer")
_WEIGHT_NAMES = {
    "unet": ("diffusion_pytorch_model", ".safetensors", ".bin"),
    "vae": ("diffusion_pytorch_model", ".safetensors", ".bin"),
    "text_encoder": ("model", ".safetensors", None),
}
# What diffusers' SD 1.x pipelines ship (PNDM, leading spacing, one step of offset).
SD_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear",
                "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
                "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "leading"}


def is_folder(path: str) -> bool:
  """True for a diffusers pipeline folder (it has model_index.json)."""
  return files.isdir(path) and files.isfile(files.join(path, "model_index.json"))


def _config(path: str, component: str, name: str = "config.json") -> dict:
  f = files.join(path, component, name)
  if not files.isfile(f):
    raise FileNotFoundError(f"{path}: no {component}/{name}: a diffusers Stable Diffusion "
                            f"folder has {', '.join(c + '/' for c in REQUIRED)} (and scheduler/)")
  return files.read_json(f)


def _weight_files(path: str, component: str) -> list:
  stem, st, _ = _WEIGHT_NAMES[component]
  names = [stem + st, stem + ".fp16" + st, "pytorch_model.bin" if component == "text_encoder"
           else stem + ".bin", stem + ".fp16.bin"]
  for name in names:
    index = files.join(path, component, name + ".index.json")
    if files.isfile(index):  # sharded: the index names each tensor's shard
      shards = sorted(set(files.read_json(index)["weight_map"].values()))
      return [files.join(path, component, s) for s in shards]
    if files.isfile(files.join(path, component, name)):
      return [files.join(path, component, name)]
  raise FileNotFoundError(f"{path}: {component}/ has no weights (looked for {', '.join(names)})")


def read_state_dict(path: str, component: str) -> dict:
  """A component's weights as one {name: numpy array} dict."""
  sd = {}
  for f in _weight_files(path, component):
    sd.update(files.read_weights(f))
  return sd


def tokenizer(folder: str, text_kw: dict, what: str) -> text_lib.CLIPTokenizerFromFolder:
  """The CLIP tokenizer in `folder` (local or URL), checked against the text encoder."""
  if not any(files.isfile(files.join(folder, n)) for n in ("vocab.json", "tokenizer.json")):
    raise FileNotFoundError(f"{what}: no CLIP tokenizer (vocab.json + merges.txt, or "
                            f"tokenizer.json) in {folder}")
  tok = text_lib.CLIPTokenizerFromFolder(files.local_folder(folder))
  text_lib.check_tokenizer(tok, text_kw, f"{what} ({folder})")
  return tok


def architecture_of(path: str) -> dict:
  """The architecture a folder's configs describe, checked, without reading weights.

  Returns:
    dict(unet, unet_sample_size, vae, scale_factor, text, schedule, prediction_type,
    sampling, resolution).
  """
  unet_kw, unet_size = architecture.unet_kwargs(_config(path, "unet"), f"{path}/unet/config.json")
  vae_kw, scale = architecture.vae_kwargs(_config(path, "vae"), f"{path}/vae/config.json")
  text_kw = text_lib.clip_kwargs_from_config(_config(path, "text_encoder"), "last",
                                             f"{path}/text_encoder/config.json")
  text_lib.check_context_dim(text_kw["width"], unet_kw["context_dim"])
  sched_file = files.join(path, "scheduler", "scheduler_config.json")
  if files.isfile(sched_file):
    sched = architecture.scheduler_settings(files.read_json(sched_file), sched_file)
  else:
    log.info("%s: no scheduler/scheduler_config.json; using Stable Diffusion's schedule", path)
    sched = architecture.scheduler_settings(SD_SCHEDULER, "Stable Diffusion's scheduler")
  f = 2 ** (len(vae_kw["ch_mult"]) - 1)
  resolution = unet_size * f if unet_size else vae_kw["resolution"]
  return dict(unet=unet_kw, vae=vae_kw, scale_factor=scale, text=text_kw, schedule=sched[0],
              prediction_type=sched[1], sampling=sched[2], resolution=int(resolution))


def load(path: str, *, tokenizer_path: Optional[str] = None,
         prediction_type: Optional[str] = None) -> Pretrained:
  """Reads a diffusers Stable Diffusion folder.

  Args:
    path: the folder (local or an fsspec URL).
    tokenizer_path: a CLIP tokenizer folder instead of `path/tokenizer`.
    prediction_type: overrides the scheduler's ('eps' | 'v' | 'x0').

  Returns:
    A `Pretrained` with float32 parameter trees.
  """
  if not is_folder(path):
    raise FileNotFoundError(f"{path}: not a diffusers pipeline folder (no model_index.json)")
  arch = architecture_of(path)
  tok_path = tokenizer_path or files.join(path, "tokenizer")
  tok = tokenizer(tok_path, arch["text"], path)
  params = dict(
      unet=weights.unet_params(read_state_dict(path, "unet"), arch["unet"], f"{path}/unet"),
      vae=weights.vae_params(read_state_dict(path, "vae"), arch["vae"], f"{path}/vae"),
      text=weights.text_params(read_state_dict(path, "text_encoder"), arch["text"],
                               f"{path}/text_encoder"))
  return Pretrained(path=path, layout="diffusers", unet=arch["unet"], vae=arch["vae"],
                    text=arch["text"], tokenizer=tok, tokenizer_path=tok_path,
                    schedule=arch["schedule"],
                    prediction_type=prediction_type or arch["prediction_type"],
                    sampling=arch["sampling"], scale_factor=arch["scale_factor"],
                    resolution=arch["resolution"], params=params)
