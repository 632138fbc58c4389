"""The frozen first stage as stage 2 sees it: z = E(x) and x = D(z).

KL models give a sample of the posterior (as the reference's
`get_first_stage_encoding`), or its mode when stage 1 trained on the mode; VQ models give the latent *before* quantisation,
and decoding quantises it first.
"""
import dataclasses

import jax.numpy as jnp

from ldm_jax.models import autoencoder


@dataclasses.dataclass
class FirstStage:
  kind: str                 # 'kl' | 'vq'
  model: object             # AutoencoderKL | VQModel
  resolution: int
  sample_posterior: bool = True  # KL: z is a posterior sample (reference) or its mode

  @classmethod
  def from_config(cls, config):
    s1 = config.stage1
    kw = dict(s1.model)
    kw["dtype"] = jnp.bfloat16 if config.dtype == "bfloat16" else None
    model = autoencoder.AutoencoderKL(**kw) if s1.kind == "kl" else autoencoder.VQModel(**kw)
    return cls(s1.kind, model, config.data.resolution, bool(s1.get("sample_posterior", True)))

  @property
  def factor(self) -> int:
    return 2 ** (len(self.model.ch_mult) - 1)

  @property
  def z_channels(self) -> int:
    return self.model.z_channels if self.kind == "kl" else self.model.embed_dim

  def init(self, rng):
    x = jnp.zeros((1, self.resolution, self.resolution, 3))
    return self.model.init(rng, x)

  def encode(self, variables, x, rng):
    """x in [-1, 1] -> unscaled latent z; a posterior sample when rng is given."""
    if self.kind == "kl":
      post = self.model.apply(variables, x, method=self.model.encode)
      return post.sample(rng) if rng is not None and self.sample_posterior else post.mode()
    return self.model.apply(variables, x, method=self.model.encode)

  def moments(self, variables, x):
    """x -> (mean, std) of what `encode` draws z from; std is None when z is
    deterministic (VQ, or KL encoded to its mode)."""
    if self.kind == "kl":
      post = self.model.apply(variables, x, method=self.model.encode)
      return post.mean, (jnp.exp(0.5 * post.logvar) if self.sample_posterior else None)
    return self.model.apply(variables, x, method=self.model.encode), None

  def decode(self, variables, z):
    return jnp.clip(self.model.apply(variables, z, method=self.model.decode), -1, 1)
