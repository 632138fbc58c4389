"""The forward (noising) process of a discrete-time diffusion model.

Notation (Ho et al. 2020; Song et al. 2021, DDIM): t in {0, ..., T-1} indexes the
training timesteps, `betas[t]` the per-step noise variance and

  a_t = alphas_cumprod[t] = prod_{s <= t} (1 - betas[s])

(alpha-bar_t in DDPM, alpha_t in DDIM). The noised latent is

  z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps,          eps ~ N(0, I),

with SNR(t) = a_t / (1 - a_t). A network predicts one of
  'eps': eps,
  'v':   v = sqrt(a_t) eps - sqrt(1 - a_t) z0      (Salimans & Ho 2022),
  'x0':  z0,
and `to_x0_eps` turns any of them into the pair (x0_hat, eps_hat).

The level t = -1 stands for the clean data, a = `final_alpha_cumprod` (1 unless a
sampler's grid ends at alphas_cumprod[0], as diffusers' `set_alpha_to_one=False` of
Stable Diffusion's schedulers): samplers step to it last.
Everything here is a pure function of arrays; `Schedule` is a pytree so it can
be passed through `jax.jit`.
"""
import math

import flax.struct
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("eps", "v", "x0")
BETA_SCHEDULES = ("linear", "cosine", "sqrt_linear", "sqrt")


def make_betas(kind: str = "linear", T: int = 1000, linear_start: float = 0.00085,
               linear_end: float = 0.012, cosine_s: float = 8e-3) -> np.ndarray:
  """Betas of the CompVis `make_beta_schedule`, in float64.

  Args:
    kind: 'linear' (linear in sqrt(beta): diffusers' "scaled_linear", the LDM / SD
      schedule), 'cosine' (Nichol & Dhariwal 2021, offset `cosine_s`, betas clipped
      to 0.999: diffusers' "squaredcos_cap_v2"), 'sqrt_linear' (linear in beta:
      diffusers' "linear") or 'sqrt' (sqrt of a linear grid).
    T: number of training timesteps.
    linear_start, linear_end: first and last beta (all but 'cosine').
    cosine_s: the offset s of the cosine schedule.

  Returns:
    betas, a float64 numpy array of shape (T,).
  """
  if T < 1:
    raise ValueError(f"T must be >= 1, got {T}")
  if kind == "linear":
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, T, dtype=np.float64) ** 2
  if kind == "cosine":
    # a(t) = cos^2((t/T + s) / (1 + s) * pi/2) / a(0);  beta_t = 1 - a(t+1) / a(t).
    u = np.arange(T + 1, dtype=np.float64) / T
    f = np.cos((u + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
    return np.clip(1 - f[1:] / f[:-1], 0, 0.999)
  if kind == "sqrt_linear":
    return np.linspace(linear_start, linear_end, T, dtype=np.float64)
  if kind == "sqrt":
    return np.linspace(linear_start, linear_end, T, dtype=np.float64) ** 0.5
  raise ValueError(f"beta schedule kind must be one of {BETA_SCHEDULES}, got {kind!r}")


def rescale_zero_terminal_snr(betas) -> np.ndarray:
  """Rescales betas so that a_{T-1} = 0 (Lin et al. 2023, "Common diffusion noise
  schedules and sample steps are flawed", Algorithm 1).

  sqrt(a_t) is shifted so its last value is 0 and scaled so its first value is
  unchanged. A model trained on it must predict 'v' (or 'x0'): at a = 0 an eps
  prediction carries no information about z0.

  Args:
    betas: (T,) betas.

  Returns:
    (T,) float64 betas with alphas_cumprod[-1] == 0.
  """
  sqrt_a = np.sqrt(np.cumprod(1 - np.asarray(betas, np.float64)))
  first, last = sqrt_a[0], sqrt_a[-1]
  sqrt_a = (sqrt_a - last) * first / (first - last)
  a = sqrt_a ** 2
  alphas = np.concatenate([a[:1], a[1:] / a[:-1]])
  return 1 - alphas


def _check_kind(kind: str):
  if kind not in PREDICTION_TYPES:
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")


def x0_eps_from_output(kind: str, out, z_t, a_t):
  """(x0_hat, eps_hat) from a model output `out` of type `kind` at level a_t.

  Args:
    kind: 'eps' | 'v' | 'x0'.
    out: the model output, shaped like z_t.
    z_t: the noised latent.
    a_t: alphas_cumprod at the level of z_t, broadcastable to z_t.

  Returns:
    (x0_hat, eps_hat). For 'eps' x0_hat divides by sqrt(a_t) (undefined at a_t = 0);
    for 'x0' eps_hat divides by sqrt(1 - a_t) (undefined at a_t = 1).
  """
  _check_kind(kind)
  sqrt_a, sqrt_1ma = jnp.sqrt(a_t), jnp.sqrt(1 - a_t)
  if kind == "eps":
    return (z_t - sqrt_1ma * out) / sqrt_a, out
  if kind == "x0":
    return out, (z_t - sqrt_a * out) / sqrt_1ma
  # v = sqrt(a) eps - sqrt(1-a) z0 and z_t = sqrt(a) z0 + sqrt(1-a) eps  (a rotation).
  return sqrt_a * z_t - sqrt_1ma * out, sqrt_1ma * z_t + sqrt_a * out


def output_from_x0_eps(kind: str, x0, eps, a_t):
  """The training target of type `kind` for the pair (x0, eps) at level a_t."""
  _check_kind(kind)
  if kind == "eps":
    return eps
  if kind == "x0":
    return x0
  return jnp.sqrt(a_t) * eps - jnp.sqrt(1 - a_t) * x0


@flax.struct.dataclass
class Schedule:
  """betas and a_t = alphas_cumprod (float32, shape (T,)) with the q(z_t | z0) helpers.

  Timesteps `t` are int arrays of shape (B,) (one per example) or scalars; t = -1
  means the clean level a = final_alpha_cumprod (1 by default).
  """
  betas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  final_alpha_cumprod: float = 1.0

  @classmethod
  def from_betas(cls, betas) -> "Schedule":
    betas = np.asarray(betas, np.float64)
    return cls(betas=jnp.asarray(betas, jnp.float32),
               alphas_cumprod=jnp.asarray(np.cumprod(1 - betas), jnp.float32))

  @property
  def T(self) -> int:
    return self.betas.shape[0]

  def alpha_bar(self, t, ndim: int = 0):
    """a_t, with a = final_alpha_cumprod at t = -1, reshaped to (B, 1, ..., 1) of rank
    `ndim` if ndim > 0."""
    t = jnp.asarray(t)
    a = jnp.where(t >= 0, self.alphas_cumprod[jnp.clip(t, 0, self.T - 1)],
                  self.final_alpha_cumprod)
    return a.reshape(a.shape + (1,) * (ndim - a.ndim)) if ndim else a

  def q_sample(self, z0, t, eps):
    """z_t = sqrt(a_t) z0 + sqrt(1 - a_t) eps."""
    a = self.alpha_bar(t, z0.ndim)
    return jnp.sqrt(a) * z0 + jnp.sqrt(1 - a) * eps

  def target(self, kind: str, z0, eps, t):
    """The regression target of prediction type `kind` ('eps' | 'v' | 'x0')."""
    return output_from_x0_eps(kind, z0, eps, self.alpha_bar(t, z0.ndim))

  def to_x0_eps(self, kind: str, model_out, z_t, t):
    """(x0_hat, eps_hat) from a model output of prediction type `kind`."""
    return x0_eps_from_output(kind, model_out, z_t, self.alpha_bar(t, z_t.ndim))

  def snr(self, t):
    """SNR(t) = a_t / (1 - a_t)."""
    a = self.alpha_bar(t)
    return a / (1 - a)


def make_schedule(kind: str = "linear", T: int = 1000, linear_start: float = 0.00085,
                  linear_end: float = 0.012, zero_terminal_snr: bool = False) -> Schedule:
  """A `Schedule` from `make_betas` (defaults: Stable Diffusion's), optionally
  rescaled to zero terminal SNR."""
  betas = make_betas(kind, T, linear_start, linear_end)
  if zero_terminal_snr:
    betas = rescale_zero_terminal_snr(betas)
  return Schedule.from_betas(betas)
