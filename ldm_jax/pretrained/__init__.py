"""Stable Diffusion weights into ldm_jax: `load(path) -> Pretrained`.

`path` is a diffusers pipeline folder or a CompVis / Stability single file
(.safetensors, .ckpt), local or any fsspec URL; see `diffusers_folder` and
`single_file`. `stage2` turns a `Pretrained` into an ldm_jax config and stage-2
state; `export` writes a stage-2 model back out in both layouts.
"""
from typing import Optional

from ldm_jax.diffusion.schedule import PREDICTION_TYPES
from ldm_jax.pretrained import diffusers_folder, files, single_file
from ldm_jax.pretrained.model import Pretrained

__all__ = ["Pretrained", "load"]


def load(path: str, *, config: Optional[str] = None, tokenizer: Optional[str] = None,
         prediction_type: Optional[str] = None, ema: bool = True) -> Pretrained:
  """Reads Stable Diffusion 1.x / 2.x weights, their architecture, tokenizer and schedule.

  Args:
    path: a diffusers folder (with model_index.json) or a single-file checkpoint.
    config: single file only: a diffusers folder describing its components (its
      configs, tokenizer and scheduler), as diffusers' `from_single_file(config=...)`.
    tokenizer: a CLIP tokenizer folder (default: the folder's / config's tokenizer/).
    prediction_type: 'eps' | 'v' | 'x0', overriding what the files say or imply.
    ema: single file only: the UNet from `model_ema.*` when the file has it.

  Returns:
    A `Pretrained`.

  Raises:
    FileNotFoundError / ValueError naming the file, component, tensor or field.
  """
  if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type={prediction_type!r} is not one of {PREDICTION_TYPES}")
  if files.isdir(path):
    if config:
      raise ValueError(f"{path}: config= is for single files; a folder has its own configs")
    return diffusers_folder.load(path, tokenizer_path=tokenizer, prediction_type=prediction_type)
  if not files.isfile(path):
    raise FileNotFoundError(f"{path}: no such folder or file")
  return single_file.load(path, config=config, tokenizer_path=tokenizer,
                          prediction_type=prediction_type, ema=ema)

