"""Noise schedules, targets and the loss weighting against closed forms and diffusers."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import losses, schedule as S


def test_betas_closed_forms():
  T = 1000
  b = S.make_betas("linear", T, 0.00085, 0.012)
  assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
  np.testing.assert_allclose(np.sqrt(b), np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T), rtol=1e-12)
  np.testing.assert_allclose(S.make_betas("sqrt_linear", T, 1e-4, 2e-2), np.linspace(1e-4, 2e-2, T))
  np.testing.assert_allclose(S.make_betas("sqrt", T, 1e-4, 2e-2) ** 2, np.linspace(1e-4, 2e-2, T))
  # cosine: a_t = f(t+1) / f(0), f(u) = cos^2((u/T + s)/(1 + s) pi/2), where betas are unclipped.
  a = np.cumprod(1 - S.make_betas("cosine", T))
  f = lambda u: math.cos((u / T + 0.008) / 1.008 * math.pi / 2) ** 2
  for t in (0, 10, 500, 900):
    assert a[t] == pytest.approx(f(t + 1) / f(0), rel=1e-9)
  assert S.make_betas("cosine", T).max() == pytest.approx(0.999)
  with pytest.raises(ValueError, match="beta schedule kind"):
    S.make_betas("quadratic")


@pytest.mark.parametrize("ours,theirs", [("linear", "scaled_linear"), ("sqrt_linear", "linear"),
                                         ("cosine", "squaredcos_cap_v2")])
def test_betas_match_diffusers(ours, theirs):
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                beta_schedule=theirs)
  sch = S.make_schedule(ours, 1000, 0.00085, 0.012)
  np.testing.assert_allclose(np.asarray(sch.betas), ref.betas.numpy(), rtol=2e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(sch.alphas_cumprod), ref.alphas_cumprod.numpy(),
                             rtol=2e-5, atol=1e-7)


def test_zero_terminal_snr_matches_diffusers():
  torch = pytest.importorskip("torch")
  from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr
  betas = S.make_betas("linear")
  ours = S.rescale_zero_terminal_snr(betas)
  np.testing.assert_allclose(ours, rescale_zero_terminal_snr(torch.tensor(betas)).numpy(),
                             rtol=1e-10, atol=1e-12)
  sch = S.make_schedule("linear", zero_terminal_snr=True)
  assert float(sch.alphas_cumprod[-1]) == 0.0
  # The first level is unchanged.
  assert float(sch.alphas_cumprod[0]) == pytest.approx(1 - betas[0], rel=1e-6)


def test_targets_and_conversions_agree():
  sch = S.make_schedule("linear")
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  z0 = jax.random.normal(k1, (4, 3, 3, 2))
  eps = jax.random.normal(k2, z0.shape)
  t = jnp.array([0, 250, 700, 999])
  z_t = sch.q_sample(z0, t, eps)
  a = np.asarray(sch.alphas_cumprod)[np.asarray(t)][:, None, None, None]
  np.testing.assert_allclose(z_t, np.sqrt(a) * z0 + np.sqrt(1 - a) * eps, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(sch.target("v", z0, eps, t), np.sqrt(a) * eps - np.sqrt(1 - a) * z0,
                             rtol=1e-6, atol=1e-6)
  for kind in S.PREDICTION_TYPES:
    x0_hat, eps_hat = sch.to_x0_eps(kind, sch.target(kind, z0, eps, t), z_t, t)
    # x0 from eps at t = 0 divides by sqrt(1 - a) ~ 0.03: looser there.
    np.testing.assert_allclose(x0_hat, z0, rtol=1e-4, atol=2e-4)
    np.testing.assert_allclose(eps_hat, eps, rtol=1e-4, atol=5e-3 if kind == "x0" else 2e-4)
  np.testing.assert_allclose(sch.snr(t), a.ravel() / (1 - a.ravel()), rtol=1e-5)
  # The clean level t = -1 is a = 1.
  assert float(sch.alpha_bar(-1)) == 1.0
  with pytest.raises(ValueError, match="prediction_type"):
    sch.target("noise", z0, eps, t)


def test_min_snr_weights_closed_form():
  """With min-SNR, the eps-, v- and x0-losses of the same x0_hat all equal
  min(SNR, gamma) * ||x0_hat - x0||^2 (Hang et al. 2023, eq. 4-5)."""
  sch = S.make_schedule("linear")
  z0 = jax.random.normal(jax.random.PRNGKey(1), (16, 4, 4, 3))
  rng = jax.random.PRNGKey(2)
  seen = {}

  def make_model(kind):
    def model_fn(z_t, t):
      x0_hat = 0.7 * z_t + 0.1           # any estimate of z0
      a = sch.alpha_bar(t, z_t.ndim)
      eps_hat = (z_t - jnp.sqrt(a) * x0_hat) / jnp.sqrt(1 - a)
      seen[kind] = (t, x0_hat)
      return sch.target(kind, x0_hat, eps_hat, t)
    return model_fn

  gamma = 1.5  # SD's SNR(t) spans (0.005, 1000); this batch's t fall on both sides of gamma
  for floor in (0.0, 0.5):  # with a floor the x0 weight is min(max(SNR, floor), gamma)
    out = {k: losses.diffusion_loss(make_model(k), z0, rng, sch, prediction_type=k,
                                    weighting="min_snr", min_snr_gamma=gamma, min_snr_floor=floor)
           for k in S.PREDICTION_TYPES}
    t, x0_hat = seen["x0"]
    snr_t = sch.snr(t)
    expected = np.minimum(np.maximum(snr_t, floor), gamma) * np.mean((x0_hat - z0) ** 2,
                                                                      axis=(1, 2, 3))
    assert float(snr_t.min()) < floor or floor == 0
    assert float(snr_t.min()) < gamma < float(snr_t.max())
    for k in S.PREDICTION_TYPES:
      np.testing.assert_allclose(out[k], expected, rtol=2e-3)
  # Closed forms of the weights themselves, including SNR = 0 (zero terminal SNR).
  snr = jnp.array([0.0, 0.5, 5.0, 50.0])
  np.testing.assert_allclose(losses.min_snr_weight(snr, "eps"), [1, 1, 1, 0.1], rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, "v"), [0, 0.5 / 1.5, 5 / 6, 5 / 51],
                             rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, "x0"), [0, 0.5, 5, 5], rtol=1e-6)
  # Floor 1 (truncated SNR, capped): x0 weight clip(SNR, 1, 5).
  np.testing.assert_allclose(losses.min_snr_weight(snr, "x0", floor=1.0), [1, 1, 5, 5], rtol=1e-6)
  np.testing.assert_allclose(losses.min_snr_weight(snr, "v", floor=1.0), [1, 1 / 1.5, 5 / 6, 5 / 51],
                             rtol=1e-6)


def test_simple_loss_and_offset_noise():
  sch = S.make_schedule("linear")
  z0 = jnp.zeros((2, 8, 8, 4))
  rng = jax.random.PRNGKey(3)
  captured = []

  def model_fn(z_t, t):  # predicts eps exactly when z0 = 0 and there is no offset noise
    captured.append(z_t / jnp.sqrt(1 - sch.alpha_bar(t, z_t.ndim)))
    return captured[-1]

  np.testing.assert_allclose(losses.diffusion_loss(model_fn, z0, rng, sch), 0.0, atol=1e-10)
  losses.diffusion_loss(model_fn, z0, rng, sch, offset_noise=0.5)
  # Same rng: the two eps differ by the offset, one N(0, 0.5^2) value per (example, channel).
  offset = captured[1] - captured[0]
  np.testing.assert_allclose(offset, offset[:, :1, :1, :] * jnp.ones_like(offset), atol=1e-5)
  assert float(jnp.abs(offset).mean()) > 0.05
  zero = losses.diffusion_loss(lambda z, t: jnp.zeros_like(z), z0, rng, sch)
  assert zero.shape == (2,) and np.all(np.abs(np.asarray(zero) - 1) < 0.3)  # E[eps^2] = 1
  with pytest.raises(ValueError, match="weighting"):
    losses.diffusion_loss(model_fn, z0, rng, sch, weighting="snr")


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (-0.85, 1.0), (0.5, 0.6)])
def test_logit_normal_timesteps_follow_their_cdf(mean, std):
  """P(t < k) = P(T sigmoid(u) < k) = Phi((logit(k / T) - mean) / std)."""
  T, n = 1000, 200_000
  t = np.asarray(losses.sample_timesteps(jax.random.key(0), n, T, "logit_normal", mean, std))
  assert t.dtype == np.int32 and t.min() >= 0 and t.max() < T
  for k in (50, 150, 350, 500, 800, 950):
    expected = 0.5 * (1 + math.erf((math.log(k / (T - k)) - mean) / (std * math.sqrt(2))))
    assert abs(np.mean(t < k) - expected) < 4e-3, k
  u = np.asarray(losses.sample_timesteps(jax.random.key(0), n, T, "uniform"))
  assert abs(np.mean(u < 250) - 0.25) < 4e-3
  with pytest.raises(ValueError, match="timestep_sampling"):
    losses.sample_timesteps(jax.random.key(0), 4, T, "lognormal")
