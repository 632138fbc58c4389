"""Samplers against diffusers' schedulers and against an exactly known denoiser.

Grids are diffusers' `timestep_spacing` options under their names (with
`steps_offset` for 'leading'); our last step goes to a = 1, which is DDIMScheduler's
`set_alpha_to_one=True` and DPMSolverMultistepScheduler's `final_sigmas_type='zero'`.

The exact denoiser: for data x0 ~ N(mu, Sigma) the noised marginal is
N(sqrt(a) mu, C) with C = a Sigma + (1 - a) I, and
  eps*(z_t, t) = sqrt(1 - a) C^-1 (z_t - sqrt(a) mu),
  x0*(z_t, t)  = mu + sqrt(a) Sigma C^-1 (z_t - sqrt(a) mu),
  v*           = sqrt(a) eps* - sqrt(1 - a) x0*.
A correct sampler with a fine enough grid maps N(0, I) (at a ~ 0) to N(mu, Sigma).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.diffusion import samplers as P, schedule as S

MU = np.array([1.0, -0.5, 0.3, 2.0], np.float32)
_A = np.array([[1.0, 0.0, 0.0, 0.0], [0.6, 0.8, 0.0, 0.0], [-0.3, 0.2, 0.5, 0.0],
               [0.1, -0.4, 0.3, 0.7]], np.float32)
SIGMA = _A @ _A.T + 0.05 * np.eye(4, dtype=np.float32)   # non-diagonal, eigenvalues in (0.05, 2)
LAM, Q = np.linalg.eigh(SIGMA.astype(np.float64))           # C^-1 = Q diag(1/(a LAM + 1 - a)) Q^T
N = 20000


def exact_model(schedule, kind):
  def model_fn(z_t, t):
    a = schedule.alpha_bar(t[0])  # one level per call in the samplers
    c_inv = (Q / (a * LAM + 1 - a)) @ Q.T
    r = (z_t - jnp.sqrt(a) * MU) @ c_inv.astype(jnp.float32)  # C symmetric
    eps = jnp.sqrt(1 - a) * r
    x0 = MU + jnp.sqrt(a) * r @ SIGMA
    return {"eps": eps, "x0": x0, "v": jnp.sqrt(a) * eps - jnp.sqrt(1 - a) * x0}[kind]
  return model_fn


@pytest.fixture(scope="module")
def cosine():
  return S.make_schedule("cosine")   # a_999 ~ 2e-9: N(0, I) is the marginal at t = 999


@pytest.mark.parametrize("sampler,steps,kind,cov_tol", [
    ("ddim", 50, "eps", 0.08), ("ddim", 50, "v", 0.08), ("dpmpp_2m", 15, "eps", 0.05),
    ("dpmpp_2m", 15, "v", 0.05), ("ddpm", 250, "eps", 0.05)])
def test_gaussian_data_is_recovered(cosine, sampler, steps, kind, cov_tol):
  """From N(0, I) at t = 999 ('trailing'). DDIM is first order: ~0.04 covariance error
  at 50 steps (0.11 at 25); Monte-Carlo std of the mean ~0.01, of a covariance ~0.015."""
  run = jax.jit(functools.partial(P.sample, exact_model(cosine, kind), (N, 4), schedule=cosine,
                                  sampler=sampler, steps=steps, spacing="trailing",
                                  prediction_type=kind))
  z0 = np.asarray(run(rng=jax.random.PRNGKey(0)), np.float64)
  np.testing.assert_allclose(z0.mean(0), MU, atol=0.04)
  np.testing.assert_allclose(np.cov(z0.T), SIGMA, atol=cov_tol)


@pytest.mark.parametrize("kind", ["eps", "v"])
def test_plms_gaussian_data_is_recovered(cosine, kind):
  """PLMS mixes eps of several levels, and x0_hat = (z - sqrt(1-a) eps') / sqrt(a) amplifies
  that by 1/sqrt(a): it cannot start at a ~ 2e-9 (t = 999 of the cosine schedule). On the
  'leading' grid the top level is t = 980 (a ~ 9e-4), where N(0, I) is not yet the marginal
  (mean off by sqrt(a) mu ~ 0.06), so start from the exact marginal N(sqrt(a) mu, C) there."""
  a = float(cosine.alpha_bar(P.timesteps(1000, 50)[-1]))
  chol = np.linalg.cholesky(a * SIGMA + (1 - a) * np.eye(4))
  z_T = np.sqrt(a) * MU + np.random.default_rng(0).standard_normal((N, 4)) @ chol.T
  z0 = P.sample(exact_model(cosine, kind), z_T.astype(np.float32), jax.random.PRNGKey(0), cosine,
                sampler="plms", steps=50, prediction_type=kind)
  z0 = np.asarray(z0, np.float64)
  np.testing.assert_allclose(z0.mean(0), MU, atol=0.04)
  np.testing.assert_allclose(np.cov(z0.T), SIGMA, atol=0.04)


def test_few_steps_are_detectably_wrong(cosine):
  """The tolerances above can fail: 3 DDIM steps miss the covariance."""
  z0 = jax.jit(lambda r: P.sample(exact_model(cosine, "eps"), (N, 4), r, cosine, steps=3,
                                  spacing="trailing"))(jax.random.PRNGKey(0))
  assert np.abs(np.cov(np.asarray(z0, np.float64).T) - SIGMA).max() > 0.1


def test_ddpm_equals_ddim_eta_one_in_distribution(cosine):
  # Same noise stream: identical up to the algebra of the posterior (Song et al. 2021, eq. 16).
  model, rng = exact_model(cosine, "eps"), jax.random.PRNGKey(1)
  kw = dict(steps=20, spacing="trailing", schedule=cosine)
  a, b = jax.jit(lambda r: (P.sample(model, (64, 4), r, sampler="ddpm", **kw),
                            P.sample(model, (64, 4), r, sampler="ddim", eta=1.0, **kw)))(rng)
  np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def _fake_model(z, t):
  """A fixed deterministic stand-in for a UNet, shared with the torch reference."""
  return 0.3 * z + 0.5 * (t.reshape((-1,) + (1,) * (z.ndim - 1)) / 1000) ** 2


@pytest.mark.parametrize("kind,theirs", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_one_ddim_step_matches_diffusers(kind, theirs, eta):
  torch = pytest.importorskip("torch")
  import diffusers
  ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=True, steps_offset=0,
                                timestep_spacing="leading", prediction_type=theirs)
  ref.set_timesteps(20)
  sch = S.make_schedule("linear")
  z, out, noise = np.random.default_rng(0).standard_normal((3, 2, 4, 4, 3)).astype(np.float32)
  for t in (950, 500, 0):  # 0 -> a = 1 (final step)
    want = ref.step(torch.tensor(out), t, torch.tensor(z), eta=eta,
                    variance_noise=torch.tensor(noise)).prev_sample.numpy()
    got, _ = P.ddim_step(out, z, sch.alpha_bar(t), sch.alpha_bar(t - 50), prediction_type=kind,
                         eta=eta, noise=noise)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


# (spacing, steps_offset, set_alpha_to_one); the second is Stable Diffusion's schedulers' grid.
@pytest.mark.parametrize("spacing,offset,one", [("leading", 0, True), ("leading", 1, False),
                                                ("trailing", 0, True)])
@pytest.mark.parametrize("kind,theirs", [("eps", "epsilon"), ("v", "v_prediction")])
def test_ddim_trajectory_matches_diffusers(spacing, offset, one, kind, theirs):
  torch = pytest.importorskip("torch")
  import diffusers
  ref = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                clip_sample=False, set_alpha_to_one=one, steps_offset=offset,
                                timestep_spacing=spacing, prediction_type=theirs)
  ref.set_timesteps(20)
  np.testing.assert_array_equal(P.timesteps(1000, 20, spacing, offset)[::-1], ref.timesteps.numpy())
  z_T = np.random.default_rng(1).standard_normal((2, 4, 4, 3)).astype(np.float32)
  z = torch.tensor(z_T)
  for t in ref.timesteps:
    z = ref.step(_fake_model(z, torch.full((2,), int(t))), t, z).prev_sample
  got = P.sample(_fake_model, z_T, jax.random.PRNGKey(0), S.make_schedule("linear"), steps=20,
                 spacing=spacing, steps_offset=offset, set_alpha_to_one=one,
                 prediction_type=kind)
  np.testing.assert_allclose(got, z.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [20, 8])
def test_dpmpp_2m_trajectory_matches_diffusers(steps):
  torch = pytest.importorskip("torch")
  import diffusers
  ref = diffusers.DPMSolverMultistepScheduler(
      beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
      algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="trailing",
      final_sigmas_type="zero", lower_order_final=True)
  ref.set_timesteps(steps)
  np.testing.assert_array_equal(P.timesteps(1000, steps, "trailing")[::-1], ref.timesteps.numpy())
  z_T = np.random.default_rng(2).standard_normal((2, 4, 4, 3)).astype(np.float32)
  z = torch.tensor(z_T)
  for t in ref.timesteps:
    z = ref.step(_fake_model(z, torch.full((2,), int(t))), t, z).prev_sample
  got = P.sample(_fake_model, z_T, jax.random.PRNGKey(0), S.make_schedule("linear"),
                 sampler="dpmpp_2m", steps=steps, spacing="trailing")
  np.testing.assert_allclose(got, z.numpy(), rtol=1e-4, atol=1e-4)


def test_guidance_scale_one_and_rescale():
  def apply(z, t, c):
    return z * c["w"][:, None] + c["b"][:, None]
  cond = {"w": jnp.full((3,), 2.0), "b": jnp.full((3,), 1.0)}
  uncond = {"w": jnp.full((3,), 0.5), "b": jnp.zeros((3,))}
  z, t = jax.random.normal(jax.random.PRNGKey(0), (3, 5)), jnp.zeros((3,), jnp.int32)
  out_c, out_u = apply(z, t, cond), apply(z, t, uncond)
  np.testing.assert_allclose(P.cfg_model_fn(apply, cond, uncond, 1.0)(z, t), out_c, rtol=1e-6)
  guided = out_u + 7.5 * (out_c - out_u)
  np.testing.assert_allclose(P.cfg_model_fn(apply, cond, uncond, 7.5)(z, t), guided, rtol=1e-5)
  # phi = 1: the guided output rescaled to the std of the conditional one.
  full = P.cfg_model_fn(apply, cond, uncond, 7.5, rescale=1.0)(z, t)
  np.testing.assert_allclose(full.std(axis=1), out_c.std(axis=1), rtol=1e-5)
  half = P.cfg_model_fn(apply, cond, uncond, 7.5, rescale=0.5)(z, t)
  np.testing.assert_allclose(half, 0.5 * (full + guided), rtol=1e-5, atol=1e-5)
  # One batched call of 2B examples.
  calls = []
  P.cfg_model_fn(lambda z, t, c: calls.append(z.shape) or z, cond, uncond, 3.0)(z, t)
  assert calls == [(6, 5)]
  # A guidance interval: guided at t in [100, 500], conditional elsewhere, per example.
  t3 = jnp.array([99, 100, 700], jnp.int32)
  got = P.cfg_model_fn(apply, cond, uncond, 7.5, interval=(100, 500))(z, t3)
  np.testing.assert_allclose(got, np.stack([out_c[0], guided[1], out_c[2]]), rtol=1e-5)


def test_img2img_and_inpainting(cosine):
  model = exact_model(cosine, "eps")
  rng = jax.random.PRNGKey(3)
  x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 4)), jnp.float32)
  assert P.sample(model, (8, 4), rng, cosine, init_latent=x, strength=0.0) is x
  # Low strength stays near the input; strength 1 forgets it.
  low = jax.jit(lambda r, x: P.sample(model, (8, 4), r, cosine, steps=20, init_latent=x,
                                      strength=0.1))(rng, x)
  assert float(jnp.abs(low - x).mean()) < 0.15
  mask = jnp.array([0.0, 1.0, 0.0, 1.0])  # 1 = repaint: the odd columns
  for sampler in P.SAMPLERS:
    out = jax.jit(functools.partial(P.sample, model, (8, 4), schedule=cosine, sampler=sampler,
                                    steps=10, eta=0.5))(rng=rng, mask=mask, known_latent=x)
    np.testing.assert_array_equal(out[:, ::2], x[:, ::2])
    assert float(jnp.abs(out[:, 1::2] - x[:, 1::2]).mean()) > 0.1


def test_ddim_inversion_round_trip(cosine):
  model = exact_model(cosine, "eps")
  x = MU + np.random.default_rng(4).standard_normal((256, 4)).astype(np.float32) @ _A.T
  kw = dict(steps=100, spacing="leading")
  z_T = P.ddim_invert(model, x, cosine, **kw)
  assert float(jnp.abs(z_T - x).mean()) > 0.5                  # it did move to noise
  back = P.sample(model, z_T, jax.random.PRNGKey(0), cosine, **kw)
  err = float(jnp.abs(back - x).mean())
  # 0.018 at 100 steps (0.065 at 25). Evaluating at the destination timestep gives 0.047,
  # the reference's loop index as timestep 0.70.
  assert err < 0.03, err


@pytest.mark.parametrize("sampler", list(P.SAMPLERS))
def test_loop_traces_model_once(cosine, sampler):
  for steps in (10, 50):
    calls = []

    def model_fn(z, t):
      calls.append(1)
      return 0.1 * z
    jax.make_jaxpr(lambda r: P.sample(model_fn, (2, 4), r, cosine, sampler=sampler,
                                      steps=steps))(jax.random.PRNGKey(0))
    assert len(calls) == 1, (sampler, steps, len(calls))
  calls = []
  jax.make_jaxpr(lambda z: P.ddim_invert(lambda z, t: calls.append(1) or z, z, cosine,
                                         steps=50))(jnp.zeros((2, 4)))
  assert len(calls) == 1


def test_timesteps_and_errors():
  np.testing.assert_array_equal(P.timesteps(1000, 4, "leading"), [0, 250, 500, 750])
  np.testing.assert_array_equal(P.timesteps(1000, 4, "leading", 1), [1, 251, 501, 751])
  np.testing.assert_array_equal(P.timesteps(1000, 4, "trailing"), [249, 499, 749, 999])
  np.testing.assert_array_equal(P.timesteps(1000, 4, "linspace"), [0, 333, 666, 999])
  q = P.timesteps(1000, 10, "quadratic")
  assert q[0] == 0 and q[-1] in (799, 800) and np.all(np.diff(q) > 0)
  with pytest.raises(ValueError, match="steps"):
    P.timesteps(1000, 0)
  with pytest.raises(ValueError, match="spacing"):
    P.timesteps(1000, 10, "uniform")
  with pytest.raises(ValueError, match="steps_offset"):
    P.timesteps(1000, 1000, "leading", 1)  # the top would be t = 1000
  with pytest.raises(ValueError, match="sampler"):
    P.sample(lambda z, t: z, (1, 4), jax.random.PRNGKey(0), S.make_schedule(), sampler="euler")


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_grids_are_diffusers_set_timesteps(spacing):
  """Every spacing against DDIMScheduler.set_timesteps, over step counts that do and
  do not divide T; 'trailing' always starts at T - 1 (SNR 0 after the rescale)."""
  diffusers = pytest.importorskip("diffusers")
  for offset in ((0, 1) if spacing == "leading" else (0,)):
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing=spacing,
                                  steps_offset=offset)
    for steps in (1, 3, 7, 20, 50, 333, 999):
      ref.set_timesteps(steps)
      ours = P.timesteps(1000, steps, spacing, offset)
      np.testing.assert_array_equal(ours[::-1], ref.timesteps.numpy(),
                                    err_msg=f"{spacing} offset {offset} steps {steps}")
      if spacing == "trailing":
        assert ours[-1] == 999


@pytest.mark.parametrize("sampler,steps,cov_tol", [
    ("ddim", 50, 0.08), ("ddpm", 100, 0.08), ("plms", 50, 0.08), ("dpmpp_2m", 25, 0.05)])
def test_zero_terminal_snr_trailing_starts_from_pure_noise(sampler, steps, cov_tol):
  """A zero-terminal-SNR schedule with 'trailing' spacing: every sampler's first step
  is at t = T - 1, where a = 0 and N(0, I) is exactly the marginal; a v model takes
  them to N(mu, Sigma). 'leading' would start at t = 980, where the marginal is not N(0, I)."""
  ztsnr = S.make_schedule("linear", zero_terminal_snr=True)
  assert float(ztsnr.alphas_cumprod[-1]) == 0.0
  run = jax.jit(functools.partial(P.sample, exact_model(ztsnr, "v"), (N, 4), schedule=ztsnr,
                                  sampler=sampler, steps=steps, spacing="trailing",
                                  prediction_type="v"))
  z0 = np.asarray(run(rng=jax.random.PRNGKey(0)), np.float64)
  assert np.isfinite(z0).all()
  np.testing.assert_allclose(z0.mean(0), MU, atol=0.04)
  np.testing.assert_allclose(np.cov(z0.T), SIGMA, atol=cov_tol)
