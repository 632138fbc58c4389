"""ldm_jax: Latent Diffusion Models in JAX/Flax, from one CPU to a TPU pod."""

__version__ = "0.1.0"
