"""The Python API for notebooks: load a model, sample from prompts, encode and decode.

  model = ldm_jax.load_run("runs/txt2img")            # or ldm_jax.load_pretrained(SD_PATH)
  images = ldm_jax.sample_images(model, ["a red circle ..."], num=4, seed=0)   # uint8 (N, H, W, 3)
  first = ldm_jax.first_stage(model)                   # or ldm_jax.load_first_stage(workdir)
  z = ldm_jax.encode(first, images)                    # z = scale_factor * E(x)
  x = ldm_jax.decode(first, z)                         # uint8 (N, H, W, 3)

Each function is a thin layer over what the entry points use (`sampling`,
`pretrained`, `training.first_stage`): the same request checks, the same
images for the same seed as `python -m ldm_jax.sample`.
"""
import dataclasses
import os
from typing import Any, Optional, Sequence, Union

import jax
import numpy as np

from ldm_jax import sampling, storage
from ldm_jax.training import images as image_io
from ldm_jax.training.first_stage import SCALE_FILE, FirstStage, model_variables


@dataclasses.dataclass(frozen=True)
class Model:
  """A stage-2 model ready to sample: what `sampling.load` returns, by name."""
  task: Any     # training.ldm.LDMTask: the UNet, its conditioning, schedule and first stage
  state: dict   # the train state: params, ema, frozen (first stage, text encoder), scale_factor
  mesh: Any     # the jax.sharding.Mesh the state is placed on
  config: Any   # the run's ml_collections.ConfigDict

  def __iter__(self):  # (task, state, mesh, config), as the lower-level functions take them
    return iter((self.task, self.state, self.mesh, self.config))


def _checkpoints(path: str, stage: str) -> str:
  """`path` itself when it is a checkpoints folder, else a run's `<path>/<stage>/checkpoints`."""
  inside = storage.join(path, stage, "checkpoints")
  return inside if storage.exists(inside) else path


def load_run(path: str, *, step: Optional[int] = None, devices=None) -> Model:
  """Loads the stage-2 (latent diffusion) model of a training run.

  Args:
    path: a run's workdir (its `ldm/checkpoints` is read) or a stage-2 checkpoints
      folder; local or an fsspec URL.
    step: the checkpoint step (default: the latest).
    devices: the devices to place it on (default: all).

  Returns:
    A `Model`.

  Raises:
    ValueError: no checkpoint there, or one of another stage.
  """
  return Model(*sampling.load(_checkpoints(path, "ldm"), step, devices))


def load_pretrained(path: str, *, config: Optional[str] = None, tokenizer: Optional[str] = None,
                    dtype: str = "float32", devices=None) -> Model:
  """Loads Stable Diffusion 1.x / 2.x weights to sample from (docs/pretrained.md).

  Args:
    path: a diffusers pipeline folder or a CompVis single file (.safetensors / .ckpt).
    config: single file only: a diffusers folder describing its components.
    tokenizer: a CLIP tokenizer folder (a single file holds none).
    dtype: 'float32' | 'bfloat16', the dtype the model computes in.
    devices: the devices to place it on (default: all).

  Returns:
    A `Model` (its state holds no optimizer).
  """
  from ldm_jax import pretrained
  from ldm_jax.pretrained import stage2
  p = pretrained.load(path, config=config, tokenizer=tokenizer)
  return Model(*stage2.for_sampling(p, dtype=dtype, devices=devices))


def sample_images(model: Model, prompts: Union[str, Sequence[str], None] = None, *, num: int = 1,
           seed: int = 0, **request) -> np.ndarray:
  """Samples `num` images per prompt (or `num` in all for a model without text).

  Args:
    model: from `load_run` or `load_pretrained`.
    prompts: a prompt or a list of them (text-to-image models).
    num: images per prompt.
    seed: the noise seed; the same seed gives the same images on any device count.
    **request: any other field of `sampling.Request`, as `python -m ldm_jax.sample`'s
      flags: steps, guidance, sampler ('ddim' | 'ddpm' | 'plms' | 'dpmpp_2m'), eta,
      negative (prompts), labels, height, width, init_image, strength, mask, ema, ...

  Returns:
    uint8 images (num x prompts, H, W, 3), prompt by prompt.

  Raises:
    ValueError: a request the model cannot serve, before anything compiles.
  """
  prompts = [prompts] if isinstance(prompts, str) else list(prompts or [])
  req = sampling.Request(prompts=prompts, num=num, seed=seed, **request)
  images, _ = sampling.sample_request(*model, req)
  return image_io.to_uint8(images)


def first_stage(model: Model) -> FirstStage:
  """The frozen first stage (autoencoder) inside a stage-2 model, with its weights and
  scale factor: a trained run's stage 1, or Stable Diffusion's VAE."""
  return dataclasses.replace(model.task.first, variables=model.state["frozen"]["first_stage"],
                             scale_factor=float(model.state["scale_factor"]), mesh=model.mesh)


def load_first_stage(path: str, *, step: Optional[int] = None, devices=None) -> FirstStage:
  """Loads the first stage (autoencoder) of a training run.

  Args:
    path: a run's workdir (its `autoencoder/checkpoints`) or a stage-1 checkpoints folder.
    step: the checkpoint step (default: the latest).
    devices: the devices to place it on (default: all).

  Returns:
    A `FirstStage` whose scale factor is the one stage 2 measured
    (`autoencoder/scale_factor.json`), or 1.0 before stage 2 has run.
  """
  from ldm_jax.evaluation.restore import restore
  from ldm_jax.training.autoencoder import AutoencoderTask
  ckpt = _checkpoints(path, "autoencoder")
  _, state, mesh, config = restore(ckpt, AutoencoderTask, stage="autoencoder", step=step,
                                   devices=devices,
                                   what="autoencoder/checkpoints folder of a run")
  scale_path = storage.join(os.path.dirname(ckpt.rstrip("/")), SCALE_FILE)
  scale = storage.read_json(scale_path)["scale_factor"] if storage.exists(scale_path) else 1.0
  return FirstStage.from_variables(config, model_variables(state["params"]), float(scale),
                                   mesh=mesh)


def _to_float(images) -> np.ndarray:
  """uint8 images -> [-1, 1]; float images are taken as already in [-1, 1]."""
  x = np.asarray(images)
  return x.astype(np.float32) / 127.5 - 1.0 if x.dtype == np.uint8 else x.astype(np.float32)


def encode(first: FirstStage, images, *, seed: Optional[int] = None) -> np.ndarray:
  """z = scale_factor * E(x), the latent stage 2 is trained on.

  Args:
    first: from `first_stage` or `load_first_stage`.
    images: (N, H, W, 3) uint8, or floats in [-1, 1].
    seed: KL models that sample their posterior (`stage1.sample_posterior`): draw z
      with this seed; None: the posterior's mode.

  Returns:
    float32 latents (N, H/f, W/f, c).
  """
  rng = None if seed is None else jax.random.key(seed)
  z = jax.jit(first.encode)(first.variables, _to_float(images), rng)
  return np.asarray(z, np.float32) * first.scale_factor


def decode(first: FirstStage, z) -> np.ndarray:
  """x = D(z / scale_factor) as uint8 images (N, H, W, 3), for latents from `encode`."""
  x = jax.jit(first.decode)(first.variables, np.asarray(z, np.float32) / first.scale_factor)
  return image_io.to_uint8(np.asarray(x))
