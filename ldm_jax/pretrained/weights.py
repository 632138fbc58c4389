"""diffusers-named state dicts -> flax parameter trees of ldm_jax's modules, checked.

The UNet, VAE and CLIP text encoder of a pretrained model each become the params of
`UNetModel`, `AutoencoderKL` and `CLIPTextTransformer` built from the architecture
read beside them. The template tree comes from `jax.eval_shape` (nothing is
compiled or allocated), and `convert.torch_to_flax` names any missing or extra
tensor, or a shape mismatch with both shapes, before anything runs.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from ldm_jax.models import autoencoder, convert, text as text_lib, unet as unet_lib


def _template(model, *args):
  return nn.unbox(jax.eval_shape(model.init, jax.random.key(0), *args)["params"])


def unet_params(state_dict: dict, kw: dict, what: str) -> dict:
  """UNetModel(**kw) params from a diffusers UNet2DConditionModel state dict."""
  model = unet_lib.UNetModel(**kw)
  s = 2 ** (len(kw["channel_mult"]) - 1) * kw.get("patch_size", 1)
  template = _template(model, jnp.zeros((1, s, s, kw["in_channels"])), jnp.zeros((1,), jnp.int32),
                       jnp.zeros((1, 1, kw["context_dim"])))
  return convert.torch_to_flax(state_dict, template, what=what)


def vae_params(state_dict: dict, kw: dict, what: str) -> dict:
  """AutoencoderKL(**kw) params from a diffusers AutoencoderKL state dict."""
  s = 2 ** (len(kw["ch_mult"]) - 1)
  template = _template(autoencoder.AutoencoderKL(**kw), jnp.zeros((1, s, s, 3)))
  return convert.torch_to_flax(state_dict, template, what=what)


def text_params(state_dict: dict, kw: dict, what: str) -> dict:
  """CLIPTextTransformer(**kw) params from a transformers CLIPTextModel state dict."""
  return text_lib.clip_params(state_dict, text_lib.CLIPTextTransformer(**kw), what=what)
