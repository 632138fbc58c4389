"""ldm_jax: Latent Diffusion Models in JAX/Flax, from one CPU to a TPU pod.

The notebook API (`ldm_jax.api`, imported on first use so that `import ldm_jax`
stays light):

  load_run(workdir)              a trained run's stage-2 model
  load_pretrained(path)          Stable Diffusion 1.x / 2.x weights
  sample_images(model, prompts)  uint8 images (N, H, W, 3)
  first_stage(model)             its frozen autoencoder; load_first_stage(workdir): a run's
  encode(first, images)          z = scale_factor * E(x); decode(first, z): uint8 images
"""
import importlib

__version__ = "0.1.0"
__all__ = ["Model", "load_run", "load_pretrained", "sample_images", "first_stage",
           "load_first_stage", "encode", "decode"]


def __getattr__(name):
  if name in __all__:
    return getattr(importlib.import_module("ldm_jax.api"), name)
  raise AttributeError(f"module 'ldm_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + __all__)
