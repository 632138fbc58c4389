"""The denoising loss L = E_{z0, eps, t} w(t) ||target - model(z_t, t)||^2.

Timesteps are uniform in {0, ..., T-1}, or logit-normal (Esser et al. 2024, SD3):
t = floor(T * sigmoid(u)) with u ~ N(m, s), which spends more of each batch on the
middle of the schedule, where an image's shapes are settled, than uniform t does.
Weightings:
  'simple'  -- w = 1 (Ho et al. 2020; LDM's L_simple).
  'min_snr' -- Min-SNR-gamma (Hang et al. 2023): the loss measured on x0 weighted by
               min(SNR(t), gamma). Since for the same x0_hat
                 ||eps_hat - eps||^2 = SNR     ||x0_hat - x0||^2,
                 ||v_hat - v||^2     = (SNR+1) ||x0_hat - x0||^2,
               the weight in the target's own space is
                 eps: min(SNR, gamma) / SNR,  v: min(SNR, gamma) / (SNR + 1),  x0: min(SNR, gamma).
              With a floor f > 0 the x0 weight is min(max(SNR, f), gamma): f = 1 is the
              truncated-SNR weighting of Salimans & Ho (2022) capped at gamma. It keeps
              the high-noise steps (SNR << 1), where the layout of an image is decided,
              at x0 weight 1 instead of SNR.
Offset noise (Guttenberg 2023): eps += offset_noise * n with n ~ N(0, 1) shared by all
positions of a channel, so the model learns to shift a latent's mean.
"""
from typing import Callable

import jax
import jax.numpy as jnp

from ldm_jax.diffusion.schedule import Schedule, _check_kind

WEIGHTINGS = ("simple", "min_snr")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal")


def sample_timesteps(rng, batch: int, T: int, sampling: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0):
  """(batch,) int32 timesteps in [0, T): uniform, or floor(T sigmoid(u)), u ~ N(mean, std)."""
  if sampling == "uniform":
    return jax.random.randint(rng, (batch,), 0, T, dtype=jnp.int32)
  if sampling == "logit_normal":
    u = logit_mean + logit_std * jax.random.normal(rng, (batch,), jnp.float32)
    return jnp.clip(jnp.floor(T * jax.nn.sigmoid(u)), 0, T - 1).astype(jnp.int32)
  raise ValueError(f"timestep_sampling must be one of {TIMESTEP_SAMPLINGS}, got {sampling!r}")


def min_snr_weight(snr, prediction_type: str, gamma: float = 5.0, floor: float = 0.0):
  """Min-SNR-gamma weight in the space of `prediction_type` (see the module docstring).

  `floor` > 0 raises the x0-space weight of the high-noise steps to `floor`.
  """
  _check_kind(prediction_type)
  w_x0 = jnp.minimum(jnp.maximum(snr, floor), gamma)
  if prediction_type == "eps":
    if floor <= 0:
      return jnp.minimum(1.0, gamma / snr)  # = min(snr, gamma) / snr, and 1 at snr = 0
    return w_x0 / snr
  if prediction_type == "v":
    return w_x0 / (snr + 1)
  return w_x0


def diffusion_loss(model_fn: Callable, z0, rng, schedule: Schedule, *, prediction_type: str = "eps",
                   weighting: str = "simple", min_snr_gamma: float = 5.0,
                   min_snr_floor: float = 0.0, offset_noise: float = 0.0,
                   timestep_sampling: str = "uniform", logit_mean: float = 0.0,
                   logit_std: float = 1.0):
  """Per-example denoising loss.

  Args:
    model_fn: (z_t, t) -> prediction of `prediction_type`, with t an int32 (B,) array.
      Conditioning is closed over by the caller.
    z0: (B, ..., C) clean latents, channels last.
    rng: PRNG key for t and eps.
    schedule: the noise schedule.
    prediction_type: 'eps' | 'v' | 'x0', what the model predicts.
    weighting: 'simple' | 'min_snr'.
    min_snr_gamma: gamma of Min-SNR weighting.
    min_snr_floor: the floor of the x0-space Min-SNR weight (0 = none, 1 = truncated SNR).
    offset_noise: scale of the per-channel offset added to eps (0 disables it).
    timestep_sampling, logit_mean, logit_std: how t is drawn (`sample_timesteps`).

  Returns:
    (B,) float32 losses: w(t) * mean over non-batch axes of (model - target)^2.
  """
  _check_kind(prediction_type)
  if weighting not in WEIGHTINGS:
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
  rng_t, rng_eps, rng_off = jax.random.split(rng, 3)
  batch = z0.shape[0]
  t = sample_timesteps(rng_t, batch, schedule.T, timestep_sampling, logit_mean, logit_std)
  eps = jax.random.normal(rng_eps, z0.shape, jnp.float32)
  if offset_noise:
    shape = (batch,) + (1,) * (z0.ndim - 2) + (z0.shape[-1],)
    eps = eps + offset_noise * jax.random.normal(rng_off, shape, jnp.float32)
  z0 = z0.astype(jnp.float32)
  z_t = schedule.q_sample(z0, t, eps)
  target = schedule.target(prediction_type, z0, eps, t)
  err = jnp.square(model_fn(z_t, t).astype(jnp.float32) - target)
  loss = err.reshape(batch, -1).mean(axis=1)
  if weighting == "min_snr":
    loss = loss * min_snr_weight(schedule.snr(t), prediction_type, min_snr_gamma,
                                  min_snr_floor)
  return loss
