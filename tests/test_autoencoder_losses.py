"""Stage-1 losses against closed forms / finite differences, and the jitted AutoencoderTask.update."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ldm_jax.training import autoencoder_losses as L
from ldm_jax.training.autoencoder import AutoencoderTask, default_config


def test_disc_losses_closed_form():
  rs = np.random.RandomState(0)
  real, fake = rs.randn(2, 3, 3, 1) * 2, rs.randn(2, 3, 3, 1) * 2
  hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
  vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
  np.testing.assert_allclose(L.hinge_d_loss(real, fake), hinge, rtol=1e-6)
  np.testing.assert_allclose(L.vanilla_d_loss(real, fake), vanilla, rtol=1e-6)
  np.testing.assert_allclose(L.generator_loss(fake), -fake.mean(), rtol=1e-6)
  assert float(L.adopt_weight(1.0, 4, 5)) == 0.0 and float(L.adopt_weight(1.0, 5, 5)) == 1.0


def test_nll_rec_kl_closed_form():
  rs = np.random.RandomState(0)
  x, xh = rs.uniform(-1, 1, (2, 4, 4, 3)), rs.uniform(-1, 1, (2, 4, 4, 3))
  p = np.array([0.3, 0.7])
  rec = L.rec_loss(x, xh, "l1", p, 0.5)
  np.testing.assert_allclose(rec, np.abs(x - xh) + 0.5 * p[:, None, None, None], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(L.rec_loss(x, xh, "l2"), (x - xh) ** 2, rtol=1e-5, atol=1e-6)
  lv = 0.4
  np.testing.assert_allclose(L.nll_loss(rec, lv), np.sum(rec / np.exp(lv) + lv) / 2, rtol=1e-5)
  m, v = rs.randn(2, 2, 2, 4), rs.randn(2, 2, 2, 4)
  np.testing.assert_allclose(L.kl_loss(m, v), np.mean(0.5 * np.sum(m ** 2 + np.exp(v) - 1 - v, (1, 2, 3))),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="stage1.loss.rec"):
    L.rec_loss(x, xh, "l3")


def test_gradient_difference_term_closed_form():
  """w_g * pen(grad x - grad x_hat) summed with the pixel term; a constant offset has none."""
  rs = np.random.RandomState(1)
  x, xh = rs.uniform(-1, 1, (2, 5, 4, 3)), rs.uniform(-1, 1, (2, 5, 4, 3))
  for kind, pen in (("l1", np.abs), ("l2", np.square)):
    gy, gx = np.zeros_like(x), np.zeros_like(x)
    gy[:, :-1] = pen((x[:, 1:] - x[:, :-1]) - (xh[:, 1:] - xh[:, :-1]))
    gx[:, :, :-1] = pen((x[:, :, 1:] - x[:, :, :-1]) - (xh[:, :, 1:] - xh[:, :, :-1]))
    np.testing.assert_allclose(L.rec_loss(x, xh, kind, gradient_weight=2.5),
                               pen(x - xh) + 2.5 * (gy + gx), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(L.rec_loss(x, x + 0.3, "l2", gradient_weight=10.0),
                             np.full_like(x, 0.09), rtol=1e-5)


def test_adaptive_weight_matches_finite_differences():
  rs = np.random.RandomState(0)
  feats = jnp.asarray(rs.randn(2, 6, 6, 4), jnp.float32)
  kernel = jnp.asarray(rs.randn(3, 3, 4, 3) * 0.2, jnp.float32)
  x = jnp.asarray(rs.randn(2, 6, 6, 3), jnp.float32)
  a = jnp.asarray(rs.randn(2, 6, 6, 3), jnp.float32)
  conv = nn.Conv(3, (3, 3), padding=1, use_bias=False)
  last = lambda f, k: conv.apply({"params": {"kernel": k}}, f)
  nll = lambda xh: jnp.sum(jnp.abs(x - xh)) / 2
  g = lambda xh: -jnp.mean(jnp.tanh(a * xh))
  g_nll = L.last_layer_grad(nll, last, feats, kernel)
  g_g = L.last_layer_grad(g, last, feats, kernel)

  def fd(fn, idx, eps=1e-2):  # central differences in float64 numpy-land
    k1, k2 = np.array(kernel, np.float64), np.array(kernel, np.float64)
    k1[idx] += eps
    k2[idx] -= eps
    return (float(fn(last(feats, jnp.asarray(k1, jnp.float32))))
            - float(fn(last(feats, jnp.asarray(k2, jnp.float32))))) / (2 * eps)

  for idx in [(0, 0, 0, 0), (1, 2, 3, 1), (2, 1, 2, 2)]:
    np.testing.assert_allclose(g_g[idx], fd(g, idx), rtol=2e-2, atol=1e-4)
  w = L.adaptive_weight(g_nll, g_g, 0.5)
  manual = np.linalg.norm(np.asarray(g_nll)) / (np.linalg.norm(np.asarray(g_g)) + 1e-4) * 0.5
  np.testing.assert_allclose(w, manual, rtol=1e-5)
  # a vanishing G gradient is clipped at 1e4
  np.testing.assert_allclose(L.adaptive_weight(g_nll, jnp.zeros_like(g_g), 0.5), 0.5e4, rtol=1e-6)


def _task(grad_accum, disc_start):
  cfg = ml_collections.ConfigDict(dict(dtype="float32", remat=False, grad_accum=grad_accum))
  c = default_config("kl", 4, "tiny")
  c.f, c.image_size = 1, 16  # one level, no resampling: the smallest graph to compile
  c.model.update(ch=8, ch_mult=(1,), norm_groups=4, resolution=16)
  c.sample_posterior = False  # the same z with and without micro-batches
  c.loss.update(disc_start=disc_start, disc_ch=8, disc_layers=1, disc_norm="group")
  cfg.stage1 = c
  return AutoencoderTask(cfg)


def test_update_runs_changes_params_and_accumulates():
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (4, 16, 16, 3)), jnp.float32)
  t1, t2 = _task(1, disc_start=1), _task(2, disc_start=1)
  # the state's structure from `init`, its values from numpy: compiling `init` (one RNG
  # kernel per parameter) costs more than the rest of this file
  abstract = jax.eval_shape(t1.init, jax.random.PRNGKey(0))
  assert set(abstract) == {"step", "params", "disc_params", "opt", "disc_opt"}
  mu_kernel = abstract["opt"][0].mu["autoencoder"]["decoder"]["conv_out"]["kernel"]
  assert isinstance(mu_kernel, nn.LogicallyPartitioned) and mu_kernel.names[-1] == "mlp"
  rs = np.random.RandomState(0)
  params_like = lambda s: jnp.asarray(0.2 * rs.randn(*s.shape), s.dtype)
  state = nn.unbox(abstract)
  state = dict(state, params=jax.tree.map(params_like, state["params"]),
               disc_params=jax.tree.map(params_like, state["disc_params"]))
  state["params"]["logvar"] = jnp.zeros(())
  state = jax.tree.map(lambda v: jnp.zeros(v.shape, v.dtype) if isinstance(v, jax.ShapeDtypeStruct)
                       else v, state)
  up1, up2 = jax.jit(t1.update), jax.jit(t2.update)
  rng = jax.random.PRNGKey(1)
  s1, m1 = up1(state, {"image": x}, rng)
  s2, m2 = up2(state, {"image": x}, rng)
  # step 0 is before disc_start: micro-batches give the full-batch gradient. Adam's first
  # moment after one step is (1 - b1) * grad; the params themselves move by ~lr * sign(grad),
  # which amplifies float noise in gradients that are 0 in exact arithmetic (biases before a norm)
  g1, g2 = jax.tree.leaves(s1["opt"][0].mu), jax.tree.leaves(s2["opt"][0].mu)
  for a, b in zip(g1, g2):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, float(np.abs(a).max())))
  np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
  changed = [not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(state["params"]), jax.tree.leaves(s1["params"]))]
  assert all(changed)  # every AE parameter and the logvar moved
  assert float(m1["d_weight"]) == 0 and float(m1["disc_loss"]) == 0
  for a, b in zip(jax.tree.leaves(state["disc_params"]), jax.tree.leaves(s1["disc_params"])):
    np.testing.assert_array_equal(a, b)
  # step 1: the GAN terms are on and D trains
  s3, m3 = up1(s1, {"image": x}, rng)
  assert float(m3["d_weight"]) > 0 and float(m3["disc_loss"]) > 0 and float(m3["disc_factor"]) == 1
  assert all(np.isfinite(float(v)) for v in m3.values())
  assert any(not np.allclose(a, b) for a, b in
             zip(jax.tree.leaves(s1["disc_params"]), jax.tree.leaves(s3["disc_params"])))
  assert t1.sample(s3, {"image": x}, rng).shape == x.shape


def test_config_validation():
  cfg = ml_collections.ConfigDict(dict(dtype="float32", remat=False, grad_accum=1))
  cfg.stage1 = default_config("kl", 4, "tiny")
  cfg.stage1.image_size = 30
  with pytest.raises(ValueError, match="stage1.image_size"):
    AutoencoderTask(cfg)
  cfg.stage1 = default_config("kl", 4, "tiny")
  cfg.stage1.loss.gradient_weight = -1.0
  with pytest.raises(ValueError, match="stage1.loss.gradient_weight"):
    AutoencoderTask(cfg)


def test_noisy_round_trip_decodes_noised_latents():
  from ldm_jax.training.autoencoder import _noisy_round_trip
  t = _task(1, disc_start=10**9)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (3, 16, 16, 3)), jnp.float32)
  v = t.model.init(jax.random.PRNGKey(0), x)
  r = jax.random.PRNGKey(3)
  clean = t.model.apply(v, x)[0]
  off = t.model.apply(v, x, None, r, 0.0, method=_noisy_round_trip)[0]
  np.testing.assert_allclose(off, clean, rtol=1e-5, atol=1e-6)  # tau = 0: the plain round trip
  noisy = t.model.apply(v, x, None, r, 0.5, method=_noisy_round_trip)[0]
  # by hand: sigma ~ |N(0, tau^2)| per example, times the batch's std(z)
  z = t.model.apply(v, x, method=lambda m, x: m.encode(x).mode())
  r_sigma, r_eps = jax.random.split(r)
  sigma = 0.5 * jnp.abs(jax.random.normal(r_sigma, (3, 1, 1, 1)))
  want = t.model.apply(v, z + sigma * jnp.std(z) * jax.random.normal(r_eps, z.shape),
                       method=lambda m, z: m.decode(z))
  np.testing.assert_allclose(noisy, want, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(noisy - clean).mean()) > 1e-3
  # the evaluation's fixed noise level: D(z + s std(z) eps), eps from the rng given
  state = {"params": {"autoencoder": v["params"]}}
  eps = jax.random.normal(r, z.shape)
  want = jnp.clip(t.model.apply(v, z + 0.4 * jnp.std(z) * eps, method=lambda m, z: m.decode(z)),
                  -1, 1)
  np.testing.assert_allclose(t.sample(state, {"image": x}, r, latent_noise=0.4), want,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(t.sample(state, {"image": x}, None), jnp.clip(clean, -1, 1),
                             rtol=1e-5, atol=1e-6)


def test_latent_noise_reaches_the_loss_and_validates():
  t = _task(1, disc_start=10**9)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  state = t.init(jax.random.PRNGKey(0))

  def loss(tau):
    t.c.loss.latent_noise = tau
    return float(t._loss({"g": state["params"], "d": state["disc_params"]}, {"image": x},
                         jax.random.PRNGKey(1), state["step"])[0])

  noisy, plain = loss(0.3), loss(0.0)
  assert np.isfinite(noisy) and noisy != plain
  cfg = ml_collections.ConfigDict(dict(dtype="float32", remat=False, grad_accum=1))
  for kind, tau in (("kl", -0.1), ("vq", 0.2)):
    cfg.stage1 = default_config(kind, 4, "tiny")
    cfg.stage1.loss.latent_noise = tau
    with pytest.raises(ValueError, match="stage1.loss.latent_noise"):
      AutoencoderTask(cfg)
