"""Autoencoder numerics: diffusers AutoencoderKL on tiny random weights, VQ and KL closed forms, presets."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import flax.linen as nn

from ldm_jax.models import autoencoder as ae
from ldm_jax.models.convert import torch_to_flax


def _template(model, x):
  return nn.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), x))["params"]


def test_matches_diffusers_autoencoder_kl():
  torch = pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  torch.manual_seed(0)
  # level 1 (8x8 at 16 px) has attention in both encoder and decoder
  ref = diffusers.AutoencoderKL(
      in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
      block_out_channels=(32, 64), sample_size=16,
      down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
      up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D")).eval()
  with torch.no_grad():  # make norms non-trivial so their conversion is tested
    for n, p in ref.named_parameters():
      if "norm" in n:
        p.add_(0.1 * torch.randn_like(p))
  model = ae.AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4,
                           resolution=16, attn_resolutions=(8,))
  x = np.random.RandomState(0).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  params = torch_to_flax(ref.state_dict(), _template(model, x))
  z = np.random.RandomState(1).randn(2, 4, 4, 4).astype(np.float32)
  # one jit: compiling once is far cheaper than dispatching every op eagerly
  post, x_hat = jax.jit(lambda p: (model.apply({"params": p}, x, method="encode"),
                                   model.apply({"params": p}, z, method="decode")))(params)
  with torch.no_grad():
    dist = ref.encode(torch.tensor(x).permute(0, 3, 1, 2)).latent_dist
    dec = ref.decode(torch.tensor(z).permute(0, 3, 1, 2)).sample
  to_nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(post.mean, to_nhwc(dist.mean), atol=1e-4)
  np.testing.assert_allclose(post.logvar, to_nhwc(dist.logvar), atol=1e-4)
  np.testing.assert_allclose(x_hat, to_nhwc(dec), atol=1e-4)


def test_checkpoint_of_other_config_fails_with_names():
  pytest.importorskip("torch")
  diffusers = pytest.importorskip("diffusers")
  ref = diffusers.AutoencoderKL(latent_channels=8, layers_per_block=1, block_out_channels=(32, 64),
                                down_block_types=("DownEncoderBlock2D",) * 2,
                                up_block_types=("UpDecoderBlock2D",) * 2)
  model = ae.AutoencoderKL(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, resolution=16)
  with pytest.raises(ValueError, match="quant_conv"):
    torch_to_flax(ref.state_dict(), _template(model, jnp.zeros((1, 16, 16, 3))))


def test_vq_straight_through_and_codebook_loss():
  rs = np.random.RandomState(0)
  n_embed, dim, beta = 16, 3, 0.25
  codebook = rs.randn(n_embed, dim).astype(np.float32)
  z = rs.randn(2, 4, 4, dim).astype(np.float32)
  vq = ae.VectorQuantizer(n_embed, dim, beta)
  params = {"embedding": {"embedding": jnp.asarray(codebook)}}
  z_q, loss, info = vq.apply({"params": params}, z)
  flat = z.reshape(-1, dim)
  idx = np.argmin(((flat[:, None] - codebook[None]) ** 2).sum(-1), 1)
  np.testing.assert_array_equal(info["indices"].reshape(-1), idx)
  np.testing.assert_allclose(z_q.reshape(-1, dim), codebook[idx], atol=1e-6)
  mse = np.mean((codebook[idx] - flat) ** 2)
  np.testing.assert_allclose(loss, (1 + beta) * mse, rtol=1e-5)
  p = np.bincount(idx, minlength=n_embed) / idx.size
  np.testing.assert_allclose(info["perplexity"], np.exp(-np.sum(p * np.log(p + 1e-10))), rtol=1e-5)
  np.testing.assert_allclose(info["usage"], np.mean(p > 0), rtol=1e-6)

  # straight-through: d(sum w * z_q)/dz = w; the losses' gradients in closed form
  w = rs.randn(*z.shape).astype(np.float32)
  g_out = jax.grad(lambda z: jnp.sum(w * vq.apply({"params": params}, z)[0]))(z)
  np.testing.assert_allclose(g_out, w, atol=1e-6)
  g_z, g_e = jax.grad(lambda z, e: vq.apply({"params": {"embedding": {"embedding": e}}}, z)[1],
                      argnums=(0, 1))(z, codebook)
  n = flat.size
  np.testing.assert_allclose(g_z.reshape(-1, dim), 2 * beta * (flat - codebook[idx]) / n, atol=1e-6)
  expect_e = np.zeros_like(codebook)
  np.add.at(expect_e, idx, 2 * (codebook[idx] - flat) / n)
  np.testing.assert_allclose(g_e, expect_e, atol=1e-6)


def test_vq_model_decode_quantises_prequant_latent():
  model = ae.VQModel(ch=16, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, embed_dim=4,
                     n_embed=32, resolution=16, norm_groups=4)
  x = jnp.asarray(np.random.RandomState(0).uniform(-1, 1, (1, 16, 16, 3)), jnp.float32)
  rs = np.random.RandomState(1)  # random weights from numpy: no per-shape RNG compiles
  params = jax.tree.map(lambda s: jnp.asarray(0.2 * rs.randn(*s.shape), jnp.float32),
                        _template(model, x))

  @jax.jit
  def run(p):
    v = {"params": p}
    h = model.apply(v, x, method="encode")
    z_q = model.apply(v, h, method=lambda m, h: m.quantize(h)[0])
    return (h, z_q, model.apply(v, h, method="decode"),
            model.apply(v, z_q, True, method="decode"), model.apply(v, x))

  h, z_q, dec_h, dec_zq, (x_hat, _, info) = run(params)
  assert h.shape == (1, 8, 8, 4) and info["indices"].shape == (1, 8, 8)
  assert not np.allclose(h, z_q)
  np.testing.assert_allclose(dec_h, dec_zq, atol=1e-5)
  np.testing.assert_allclose(x_hat, dec_h, atol=1e-5)


def test_kl_closed_form_and_clipping():
  rs = np.random.RandomState(0)
  mean, logvar = rs.randn(2, 3, 3, 4), rs.randn(2, 3, 3, 4)
  logvar[0, 0, 0, 0] = 50.0  # clipped to 20
  post = ae.DiagonalGaussian.from_moments(jnp.asarray(np.concatenate([mean, logvar], -1)))
  lv = np.clip(logvar, -30, 20)
  expect = 0.5 * np.sum(mean ** 2 + np.exp(lv) - 1 - lv, axis=(1, 2, 3))
  np.testing.assert_allclose(post.kl(), expect, rtol=1e-5)
  s = post.sample(jax.random.PRNGKey(0))
  assert s.shape == mean.shape and not np.allclose(s, post.mode())


@pytest.mark.parametrize("kind,f,z_shape,n_params", [
    ("kl", 8, (1, 32, 32, 4), 83_653_863),  # Stable Diffusion's VAE
    ("vq", 4, (1, 64, 64, 3), None),
    ("kl", 16, (1, 16, 16, 16), None)])
def test_preset_shapes(kind, f, z_shape, n_params):
  kw = ae.preset(kind, f, "ref")
  model = (ae.AutoencoderKL if kind == "kl" else ae.VQModel)(**kw)
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  params = _template(model, x)
  enc = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="encode"), params, x)
  z = enc.mean if kind == "kl" else enc
  assert z.shape == z_shape
  if n_params:
    assert sum(np.prod(p.shape) for p in jax.tree.leaves(params)) == n_params
  if kind == "kl" and f == 16:  # attention at 16x16: the last encoder level, the first decoder level
    assert "attentions_0" in params["encoder"]["down_blocks_4"]
    assert "attentions_0" in params["decoder"]["up_blocks_0"]
    assert "attentions_0" not in params["encoder"]["down_blocks_3"]
  tiny = ae.preset(kind, f, "tiny")
  assert 2 ** (len(tiny["ch_mult"]) - 1) == f and tiny["z_channels"] == kw["z_channels"]
  with pytest.raises(ValueError, match="kind/f"):
    ae.preset(kind, 64)


def test_attention_field_reaches_encoder_and_decoder():
  # On a CPU 'cudnn' cannot run, so a model whose attention uses it fails to trace.
  kw = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, resolution=16,
            attn_resolutions=(8,))
  x, z = jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 8, 8, 4))
  params = _template(ae.AutoencoderKL(**kw, attention="explicit"), x)
  if jax.default_backend() == "gpu":
    pytest.skip("cuDNN runs on a GPU")
  bad = ae.AutoencoderKL(**kw, attention="cudnn")
  for method, arg in (("encode", x), ("decode", z)):
    with pytest.raises(Exception):
      jax.eval_shape(lambda p: bad.apply({"params": p}, arg, method=method), params)
