"""Samplers for a trained denoiser: DDIM, ancestral DDPM, PLMS, DPM-Solver++(2M).

Each sampler is a pure function whose whole denoising loop is one `jax.lax.scan`, so
it runs inside one `jax.jit` and traces `model_fn` once whatever the step count.

Notation as in `schedule.py`: a_t = alphas_cumprod[t], and t = -1 is the clean level
a = 1. A grid t_0 > t_1 > ... > t_{n-1} (from `timesteps`, reversed) is walked
t_i -> t_{i+1}, the last step going from t_{n-1} to a = 1. The reference (CompVis
DDIM) instead ends at alphas_cumprod[0]; ending at a = 1 is diffusers'
`set_alpha_to_one=True` (`final_alpha_cumprod = 1`). The grids are diffusers'
`timestep_spacing` options under their names (Lin et al. 2023, Table 2); the
reference's own grid, and Stable Diffusion's schedulers', is 'leading' with
`steps_offset=1` and `set_alpha_to_one=False` (`sample`).

model_fn(z_t, t) -> raw output of `prediction_type` ('eps' | 'v' | 'x0'), t an int32
(B,) array. Guidance is a model_fn too (`cfg_model_fn`).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax.diffusion.schedule import Schedule, x0_eps_from_output

SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def timesteps(T: int, steps: int, spacing: str = "leading", steps_offset: int = 0) -> np.ndarray:
  """An ascending grid of distinct timesteps in [0, T) (diffusers' `set_timesteps`).

  Args:
    T: training timesteps.
    steps: number of sampling steps, 1 <= steps <= T.
    spacing: 'leading' (k * (T // steps) + steps_offset: starts near 0, never reaches
      T - 1), 'trailing' (round(T - k T / steps) - 1: contains T - 1, where a
      zero-terminal-SNR schedule has SNR 0, so sampling starts from pure noise),
      'linspace' (round(linspace(0, T - 1, steps)): both ends) or 'quadratic'
      (CompVis `ddim_discretize='quad'`: floor(linspace(0, sqrt(0.8 T), steps)^2),
      duplicates removed so it may have fewer than `steps` points).
    steps_offset: added to the 'leading' grid (Stable Diffusion's scheduler: 1);
      the other spacings ignore it, as diffusers does.

  Returns:
    int32 numpy array, ascending.
  """
  if not 1 <= steps <= T:
    raise ValueError(f"steps must be in [1, T={T}], got {steps}")
  if spacing == "leading":
    ts = np.arange(steps) * (T // steps) + steps_offset
  elif spacing == "trailing":
    ts = (np.round(T - np.arange(steps) * T / steps) - 1)[::-1]
  elif spacing == "linspace":
    ts = np.round(np.linspace(0, T - 1, steps))
  elif spacing == "quadratic":
    ts = np.unique((np.linspace(0, np.sqrt(T * 0.8), steps) ** 2).astype(np.int64))
  else:
    raise ValueError(f"timestep spacing must be one of {SPACINGS}, got {spacing!r}")
  if ts[0] < 0 or ts[-1] >= T:
    raise ValueError(f"steps_offset={steps_offset} puts the {spacing} grid of {steps} steps "
                     f"outside [0, T={T})")
  return ts.astype(np.int32)


def _levels(ts_desc):
  """Scan inputs for a descending grid: (t_i, t_{i+1}) with t_n = -1 (a = 1)."""
  ts = jnp.asarray(ts_desc, jnp.int32)
  return ts, jnp.concatenate([ts[1:], jnp.full((1,), -1, jnp.int32)])


def _call(model_fn, z, t):
  return model_fn(z, jnp.full((z.shape[0],), t, jnp.int32))


def ddim_step(model_out, z_t, a_t, a_prev, *, prediction_type: str = "eps", eta: float = 0.0,
              noise=None):
  """One DDIM step z_t -> z_prev (Song et al. 2021, eq. 12).

    x0_hat = (z_t - sqrt(1 - a_t) eps) / sqrt(a_t)
    sigma  = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    z_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev - sigma^2) eps + sigma * noise

  Args:
    model_out: raw model output of `prediction_type` at (z_t, t).
    z_t: current latent.
    a_t, a_prev: alphas_cumprod at the current and the next (less noisy) level.
    prediction_type: 'eps' | 'v' | 'x0'.
    eta: 0 is deterministic DDIM, 1 the DDPM posterior variance.
    noise: N(0, I) noise, needed when eta > 0.

  Returns:
    (z_prev, x0_hat).
  """
  x0, eps = x0_eps_from_output(prediction_type, model_out, z_t, a_t)
  # eta is a Python number; skipping sigma at eta = 0 keeps the a_t = 1 start of the
  # inversion finite (0 * sqrt(x / 0)).
  sigma = eta * jnp.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) if eta else 0.0
  z_prev = jnp.sqrt(a_prev) * x0 + jnp.sqrt(jnp.maximum(1 - a_prev - sigma ** 2, 0.0)) * eps
  if noise is not None:
    z_prev = z_prev + sigma * noise
  return z_prev, x0


def _identity_project(z, t_prev, key):
  return z


def ddim(model_fn, z, ts_desc, rng, schedule: Schedule, *, prediction_type="eps", eta=0.0,
         project=_identity_project):
  """DDIM from z at level ts_desc[0] to a = 1. `project(z, t_prev, key)` runs after
  each step (inpainting). Returns the final latent."""
  def body(z, xs):
    i, t, t_prev = xs
    key = jax.random.fold_in(rng, i)
    noise = jax.random.normal(key, z.shape, z.dtype) if eta else None
    z, _ = ddim_step(_call(model_fn, z, t), z, schedule.alpha_bar(t), schedule.alpha_bar(t_prev),
                     prediction_type=prediction_type, eta=eta, noise=noise)
    return project(z, t_prev, jax.random.fold_in(key, 1)), None
  t, t_prev = _levels(ts_desc)
  return jax.lax.scan(body, z, (jnp.arange(t.shape[0]), t, t_prev))[0]


def ddpm(model_fn, z, ts_desc, rng, schedule: Schedule, *, prediction_type="eps", eta=1.0,
         project=_identity_project):
  """Ancestral sampling from the posterior q(z_prev | z_t, x0_hat) (Ho et al. 2020, eq. 7)
  on a possibly strided grid, with beta' = 1 - a_t / a_prev:

    mean = sqrt(a_prev) beta' / (1 - a_t) x0_hat + sqrt(1 - beta') (1 - a_prev) / (1 - a_t) z_t
    var  = (1 - a_prev) / (1 - a_t) beta'        (the "fixed small" variance)

  In distribution this equals DDIM with eta = 1. `eta` is ignored.
  """
  del eta
  def body(z, xs):
    i, t, t_prev = xs
    key = jax.random.fold_in(rng, i)
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    beta = 1 - a_t / a_prev
    x0, _ = x0_eps_from_output(prediction_type, _call(model_fn, z, t), z, a_t)
    mean = (jnp.sqrt(a_prev) * beta * x0 + jnp.sqrt(1 - beta) * (1 - a_prev) * z) / (1 - a_t)
    std = jnp.sqrt((1 - a_prev) / (1 - a_t) * beta)
    z = mean + std * jax.random.normal(key, z.shape, z.dtype)
    return project(z, t_prev, jax.random.fold_in(key, 1)), None
  t, t_prev = _levels(ts_desc)
  return jax.lax.scan(body, z, (jnp.arange(t.shape[0]), t, t_prev))[0]


def _plms_table(n: int):
  """For model call j = 0..n: the weights of [e, e_1, e_2, e_3] (e the new eps, e_k the
  k-th most recent stored one) and the index of the step that call j completes."""
  coef = np.zeros((n + 1, 4), np.float32)
  coef[0] = (1, 0, 0, 0)                     # tentative Euler step (pseudo improved Euler)
  coef[1] = (0.5, 0.5, 0, 0)                 # (e_t + e_next) / 2
  coef[2:3] = (1.5, -0.5, 0, 0)              # Adams-Bashforth 2, 3, 4
  coef[3:4] = (23 / 12, -16 / 12, 5 / 12, 0)
  coef[4:] = (55 / 24, -59 / 24, 37 / 24, -9 / 24)
  step = np.maximum(np.arange(n + 1) - 1, 0)
  return coef, step


def plms(model_fn, z, ts_desc, rng, schedule: Schedule, *, prediction_type="eps", eta=0.0,
         project=_identity_project):
  """PLMS (Liu et al. 2022, pseudo linear multistep; the CompVis `PLMSSampler`, eta 0).

  The first step is a pseudo improved Euler step: eps' = (e(z_0, t_0) + e(z~_1, t_1)) / 2
  with z~_1 the DDIM step of e(z_0, t_0); later steps combine the stored eps with
  Adams-Bashforth weights of order 2, 3, 4; every combined eps drives a DDIM (eta 0)
  step. That is n + 1 model calls for n steps; the scan makes exactly one per
  iteration, the warm-up's second call reading the tentative z~_1. `eta` is ignored.

  From a = 0 (the top of a zero-terminal-SNR schedule on a 'trailing' grid) eps
  says nothing about x0, so a step driven by a combined eps is undefined there
  (so is diffusers' PNDM's): the first step is then the DDIM step with the model's
  own x0 (a 'v' or 'x0' model's), without the warm-up's correction.
  """
  del eta
  n = len(ts_desc)
  coef, step = _plms_table(n)
  t, t_prev = _levels(ts_desc)
  # The model call j reads level t_{step[j]}, except the warm-up's second call, which
  # reads the tentative z~_1 at t_1 (CompVis: time_range[min(1, n - 1)]).
  t_eval = t[step].at[1].set(t[min(1, n - 1)])
  t, t_prev = t[step], t_prev[step]

  def body(carry, xs):
    z, z_tent, hist = carry
    j, c, t, t_prev, t_eval = xs
    z_in = jnp.where(j == 1, z_tent, z)
    x0, e = x0_eps_from_output(prediction_type, _call(model_fn, z_in, t_eval), z_in,
                               schedule.alpha_bar(t_eval))
    e_prime = c[0] * e + jnp.einsum("k,k...->...", c[1:], hist)
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    z_new, _ = ddim_step(e_prime, z, a_t, a_prev)
    from_pure_noise = jnp.sqrt(a_prev) * x0 + jnp.sqrt(1 - a_prev) * e  # read at j = 0 only
    z_new = jnp.where(a_t > 0, z_new, jnp.where(j == 0, from_pure_noise, z_tent))
    z_new = project(z_new, t_prev, jax.random.fold_in(rng, j))
    hist = jnp.where(j == 1, hist, jnp.concatenate([e[None], hist[:-1]]))
    return (jnp.where(j == 0, z, z_new), z_new, hist), None

  hist = jnp.zeros((3,) + z.shape, z.dtype)
  xs = (jnp.arange(n + 1), jnp.asarray(coef), t, t_prev, t_eval)
  return jax.lax.scan(body, (z, z, hist), xs)[0][0]


def dpmpp_2m(model_fn, z, ts_desc, rng, schedule: Schedule, *, prediction_type="eps", eta=0.0,
             project=_identity_project):
  """DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep, order 2, data prediction.

  With alpha = sqrt(a), sigma = sqrt(1 - a), lambda = log(alpha / sigma),
  h_i = lambda_{i+1} - lambda_i, r_i = h_{i-1} / h_i:

    D_i     = (1 + 1/(2 r_i)) x0_i - 1/(2 r_i) x0_{i-1}      (D_0 = x0_0)
    z_{i+1} = sigma_{i+1} / sigma_i z_i - alpha_{i+1} (e^{-h_i} - 1) D_i

  The last step goes to a = 1 (sigma = 0, lambda = inf) where the second-order term
  is undefined; it is first order and returns x0_hat, which is diffusers'
  `lower_order_final` / `final_sigmas_type='zero'`. `eta` is ignored.
  """
  del eta
  n = len(ts_desc)
  t, t_prev = _levels(ts_desc)

  def lam(a):
    return 0.5 * (jnp.log(a) - jnp.log1p(-a))

  def body(carry, xs):
    z, x0_last, h_last = carry
    i, t, t_prev = xs
    a_t, a_prev = schedule.alpha_bar(t), schedule.alpha_bar(t_prev)
    x0, _ = x0_eps_from_output(prediction_type, _call(model_fn, z, t), z, a_t)
    h = lam(a_prev) - lam(a_t)
    half_over_r = 0.5 * h / h_last
    first_order = (i == 0) | (i == n - 1)
    d = jnp.where(first_order, x0, (1 + half_over_r) * x0 - half_over_r * x0_last)
    # sigma_{i+1}/sigma_i z_i + (alpha_{i+1} - alpha_i sigma_{i+1}/sigma_i) D_i, which is the
    # update above with e^{-h} written as a ratio so that a = 0 or a = 1 stay finite.
    ratio = jnp.sqrt((1 - a_prev) / (1 - a_t))
    z = ratio * z + (jnp.sqrt(a_prev) - jnp.sqrt(a_t) * ratio) * d
    z = project(z, t_prev, jax.random.fold_in(rng, i))
    return (z, x0, h), None

  carry = (z, jnp.zeros_like(z), jnp.ones((), jnp.float32))
  return jax.lax.scan(body, carry, (jnp.arange(n), t, t_prev))[0][0]


SAMPLERS = {"ddim": ddim, "ddpm": ddpm, "plms": plms, "dpmpp_2m": dpmpp_2m}


def ddim_invert(model_fn, z0, schedule: Schedule, *, steps: int = 50, spacing: str = "leading",
                steps_offset: int = 0, prediction_type: str = "eps"):
  """Deterministic DDIM inversion: runs the eta = 0 update forward in time, z0 -> z_{t_{n-1}}.

  The step s -> t (s < t, s = -1 the clean level) is the DDIM update with the roles of
  the levels swapped, the model evaluated at the latent's own level s: that is the
  explicit Euler step of the probability-flow ODE, the mirror of a sampling step (the
  reference's `encode` passed the loop index i as the timestep). The first step, from
  a = 1, has no timestep of its own and evaluates at t_0.

  Returns:
    The latent at the top of the grid, for `sample(..., shape_or_init=that,
    steps=steps, spacing=spacing, steps_offset=steps_offset)` with the DDIM sampler.
  """
  ts = timesteps(schedule.T, steps, spacing, steps_offset)
  t_to = jnp.asarray(ts)
  t_from = jnp.concatenate([jnp.full((1,), -1, jnp.int32), t_to[:-1]])
  t_eval = t_from.at[0].set(t_to[0])

  def body(z, xs):
    s, t, t_eval = xs
    out = _call(model_fn, z, t_eval)
    return ddim_step(out, z, schedule.alpha_bar(s), schedule.alpha_bar(t),
                     prediction_type=prediction_type)[0], None
  return jax.lax.scan(body, z0, (t_from, t_to, t_eval))[0]


def cfg_model_fn(apply: Callable, cond, uncond, scale: float, rescale: float = 0.0,
                 interval=None):
  """Classifier-free guidance as a model_fn: out = out_u + scale (out_c - out_u).

  Both halves run in ONE batch (concatenated along the batch axis). A negative prompt
  is just a different `uncond`. `rescale` = phi of Lin et al. 2023 (Sec. 3.4): the
  guided output is rescaled to the per-example std of the conditional output,
  out = phi * out * std(out_c) / std(out) + (1 - phi) * out (diffusers' guidance_rescale).
  `interval` = (t_lo, t_hi): guidance only at timesteps t_lo <= t <= t_hi, the
  conditional output elsewhere (Kynkaanniemi et al. 2024, guidance in a limited interval).

  Args:
    apply: (z_t, t, c) -> raw model output; c a pytree of arrays with a batch axis.
    cond, uncond: conditioning pytrees of the same structure, batch B each.
    scale: guidance scale s (1 gives the conditional model).
    rescale: phi in [0, 1].
    interval: None (every step) or (t_lo, t_hi) in the model's timesteps.

  Returns:
    model_fn(z_t, t).
  """
  c = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), cond, uncond)

  def model_fn(z_t, t):
    out = apply(jnp.concatenate([z_t, z_t]), jnp.concatenate([t, t]), c)
    out_c, out_u = jnp.split(out, 2)
    out = out_u + scale * (out_c - out_u)
    if rescale:
      axes = tuple(range(1, out.ndim))
      std_c = jnp.std(out_c, axis=axes, keepdims=True)
      std = jnp.std(out, axis=axes, keepdims=True)
      out = rescale * out * std_c / std + (1 - rescale) * out
    if interval is not None:
      on = (t >= interval[0]) & (t <= interval[1])
      out = jnp.where(on.reshape((-1,) + (1,) * (out.ndim - 1)), out, out_c)
    return out
  return model_fn


def _inpaint_project(schedule: Schedule, mask, known_latent):
  """Replaces the known region (mask == 0) by known_latent noised to level t_prev;
  at t_prev = -1 (a = 1) that is known_latent exactly."""
  def project(z, t_prev, key):
    noised = schedule.q_sample(known_latent, t_prev, jax.random.normal(key, z.shape, z.dtype))
    return mask * z + (1 - mask) * noised
  return project


def sample(model_fn: Callable, shape_or_init, rng, schedule: Schedule, *, sampler: str = "ddim",
           steps: int = 50, eta: float = 0.0, spacing: str = "leading", steps_offset: int = 0,
           set_alpha_to_one: bool = True, prediction_type: str = "eps", init_latent=None,
           strength: float = 1.0, mask=None, known_latent=None):
  """Samples latents z0 with one of `SAMPLERS`; jit-able (everything but the arrays static).

  Args:
    model_fn: (z_t, t) -> raw output of `prediction_type` (a `cfg_model_fn` for guidance).
    shape_or_init: a shape (noise drawn from `rng`) or the starting noise array itself.
    rng: PRNG key.
    schedule: the training noise schedule.
    sampler: 'ddim' | 'ddpm' | 'plms' | 'dpmpp_2m'.
    steps, spacing, steps_offset: the grid, see `timesteps`.
    set_alpha_to_one: the last step ends at a = 1; False ends it at alphas_cumprod[0]
      (diffusers' flag of the same name; Stable Diffusion's schedulers set it False).
    eta: DDIM noise scale (other samplers ignore it).
    prediction_type: 'eps' | 'v' | 'x0'.
    init_latent: img2img: the encoded image z0. The noise is added up to the grid
      timestep at about strength * T and only the remaining int(strength * n) steps of
      the grid run (diffusers' convention); strength 0 returns init_latent.
    strength: in [0, 1], used with init_latent.
    mask: inpainting, broadcastable to the latent: 1 = repaint, 0 = keep
      `known_latent` (Stable Diffusion's convention).
    known_latent: the latent whose unmasked region is kept (defaults to init_latent).

  Returns:
    The sampled latent z0.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength must be in [0, 1], got {strength}")
  ts = timesteps(schedule.T, steps, spacing, steps_offset)[::-1]
  if not set_alpha_to_one:
    schedule = schedule.replace(final_alpha_cumprod=schedule.alphas_cumprod[0])
  if init_latent is not None:
    n_run = min(int(strength * len(ts)), len(ts))
    if n_run == 0:
      return init_latent
    ts = ts[len(ts) - n_run:]
  rng_init, rng_loop = jax.random.split(rng)
  if isinstance(shape_or_init, (tuple, list)):
    noise = jax.random.normal(rng_init, tuple(shape_or_init), jnp.float32)
  else:
    noise = jnp.asarray(shape_or_init, jnp.float32)
  project = _identity_project
  if mask is not None:
    known_latent = init_latent if known_latent is None else known_latent
    if known_latent is None:
      raise ValueError("mask needs known_latent (or init_latent)")
    project = _inpaint_project(schedule, jnp.asarray(mask, jnp.float32), known_latent)
  if init_latent is not None:
    z = schedule.q_sample(init_latent, jnp.full((noise.shape[0],), ts[0], jnp.int32), noise)
  else:
    z = noise
  z = project(z, int(ts[0]), jax.random.fold_in(rng_init, 1))
  return SAMPLERS[sampler](model_fn, z, ts, rng_loop, schedule, prediction_type=prediction_type,
                           eta=eta, project=project)
