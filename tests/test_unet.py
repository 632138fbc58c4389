"""UNetModel against diffusers' UNet2DConditionModel / UNet2DModel on tiny random weights,
and the Stable Diffusion parameter counts (abstract shapes only, nothing allocated)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax.models import convert, unet

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

B, S, L = 2, 8, 5


def _count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(tree))


def _compare(torch_model, model, *, context_dim=None, y_torch=None, y=None, tol=1e-4):
  """Converts torch weights into `model` and compares one forward pass."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((B, S, S, model.in_channels)).astype(np.float32)
  t = np.array([3, 977], np.int32)
  ctx = (rng.standard_normal((B, L, context_dim)).astype(np.float32)
         if context_dim else None)
  template = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, ctx, y)["params"])
  params = convert.torch_to_flax(torch_model.state_dict(), template, what="diffusers unet")
  out = jax.jit(model.apply)({"params": params}, x, t, ctx, y)
  with torch.no_grad():
    args = dict(encoder_hidden_states=torch.from_numpy(ctx)) if ctx is not None else {}
    if y_torch is not None:
      args["class_labels"] = y_torch
    ref = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), **args)
  ref = ref.sample.permute(0, 2, 3, 1).numpy()
  assert out.shape == ref.shape
  assert np.abs(ref).mean() > 1e-2  # the comparison is not trivially between zeros
  np.testing.assert_allclose(np.asarray(out), ref, atol=tol, rtol=tol)


def _tiny_diffusers(**kw):
  torch.manual_seed(0)
  cfg = dict(sample_size=S, in_channels=4, out_channels=4, block_out_channels=(32, 64),
             layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
             up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
             attention_head_dim=8, norm_num_groups=8)
  cfg.update(kw)
  return diffusers.UNet2DConditionModel(**cfg).eval()


_TINY = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=(1, 2),
             num_res_blocks=1, attention_resolutions=(1,), num_heads=8, context_dim=32,
             norm_num_groups=8)


def test_matches_diffusers_crossattn_conv_proj():
  _compare(_tiny_diffusers(), unet.UNetModel(**_TINY), context_dim=32)


def test_matches_diffusers_linear_proj_scale_shift_adm():
  # SD 2 style linear projection, FiLM time conditioning and a projected adm vector.
  tm = _tiny_diffusers(use_linear_projection=True, resnet_time_scale_shift="scale_shift",
                       class_embed_type="projection", projection_class_embeddings_input_dim=6)
  model = unet.UNetModel(**{**_TINY, "use_linear_in_transformer": True,
                            "use_scale_shift_norm": True, "num_classes": "continuous",
                            "adm_in_channels": 6})
  y = np.random.default_rng(1).standard_normal((B, 6)).astype(np.float32)
  _compare(tm, model, context_dim=32, y=y, y_torch=torch.from_numpy(y))


def test_matches_diffusers_class_labels_resblock_updown():
  # resnets sample up/down (resblock_updown); integer class labels through an nn.Embed.
  tm = _tiny_diffusers(down_block_types=("ResnetDownsampleBlock2D", "ResnetDownsampleBlock2D"),
                       up_block_types=("ResnetUpsampleBlock2D", "ResnetUpsampleBlock2D"),
                       num_class_embeds=10)
  model = unet.UNetModel(**{**_TINY, "attention_resolutions": (), "resblock_updown": True,
                            "num_classes": 10})
  y = np.array([3, 7], np.int32)
  _compare(tm, model, context_dim=32, y=y, y_torch=torch.from_numpy(y).long())


def test_matches_diffusers_unconditional_self_attention():
  # context_dim=None: plain self-attention blocks, as diffusers' UNet2DModel.
  torch.manual_seed(0)
  tm = diffusers.UNet2DModel(sample_size=S, in_channels=3, out_channels=3,
                             block_out_channels=(32, 64), layers_per_block=1,
                             down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                             attention_head_dim=8, norm_num_groups=8).eval()
  model = unet.UNetModel(**{**_TINY, "in_channels": 3, "out_channels": 3, "context_dim": None,
                            "num_heads": -1, "num_head_channels": 8})
  _compare(tm, model)


@pytest.mark.parametrize("size,context_dim,expected", [
    ("sd15", 768, 859_520_964), ("sd2", 1024, 865_910_724)])
def test_stable_diffusion_parameter_counts(size, context_dim, expected):
  model = unet.UNetModel(**unet.preset(size))
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 4)),
                          jnp.zeros((1,)), jnp.zeros((1, 77, context_dim)))
  assert _count(shapes["params"]) == expected
  # The same count from diffusers' own configuration, built on the meta device (no memory).
  heads = dict(attention_head_dim=8) if size == "sd15" else dict(
      attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
  with torch.device("meta"):
    tm = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=context_dim, **heads)
  assert sum(p.numel() for p in tm.parameters()) == expected


def test_remat_dropout_and_bad_inputs():
  # One level keeps the compile of the backward pass short on CPU.
  model = unet.UNetModel(**{**_TINY, "model_channels": 16, "channel_mult": (1,),
                            "attention_resolutions": (), "num_heads": 2, "context_dim": 16,
                            "remat": True, "dropout": 0.1})
  x, t, ctx = jnp.ones((1, 4, 4, 4)), jnp.array([10]), jnp.ones((1, 3, 16))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, ctx)["params"])
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), shapes)
  loss = lambda p, key: model.apply({"params": p}, x, t, ctx, train=True,
                                    rngs={"dropout": key}).sum()
  grad = jax.jit(jax.value_and_grad(loss))
  (l1, g), (l2, _) = grad(params, jax.random.key(1)), grad(params, jax.random.key(2))
  assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))
  assert abs(float(l1) - float(l2)) > 1e-6  # dropout is active in training
  with pytest.raises(ValueError, match="context_dim"):
    model.init(jax.random.key(0), x, t, jnp.ones((1, 3, 32)))
  with pytest.raises(ValueError, match="in_channels"):
    model.init(jax.random.key(0), jnp.ones((1, 4, 4, 3)), t, ctx)


def test_patch_size_is_the_unet_on_space_to_depth():
  # patch_size=p is exactly the p=1 UNet with p^2 x the channels applied to the
  # space-to-depth latent, its output put back by depth-to-space.
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  t, ctx = jnp.array([3, 700]), jnp.ones((2, 3, 8))
  np.testing.assert_array_equal(unet.depth_to_space(unet.space_to_depth(x, 2), 2), x)
  assert unet.space_to_depth(x, 2)[0, 1, 2].tolist() == x[0, 2:4, 4:6].reshape(-1).tolist()
  kw = {**_TINY, "model_channels": 16, "channel_mult": (1, 2), "attention_resolutions": (2,),
        "num_heads": 2, "context_dim": 8}
  flat = unet.UNetModel(**{**kw, "in_channels": 12, "out_channels": 12})
  patched = unet.UNetModel(**{**kw, "in_channels": 3, "out_channels": 3, "patch_size": 2})
  shapes = nn.unbox(jax.eval_shape(flat.init, jax.random.key(0), unet.space_to_depth(x, 2),
                                   t, ctx)["params"])
  rng = np.random.default_rng(0)  # non-zero everywhere (conv_out starts at zero)
  params = jax.tree.map(lambda s: 0.1 * rng.standard_normal(s.shape, np.float32), shapes)
  want = unet.depth_to_space(flat.apply({"params": params}, unet.space_to_depth(x, 2), t, ctx), 2)
  got = patched.apply({"params": params}, x, t, ctx)
  assert got.shape == x.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="patch_size"):
    patched.init(jax.random.key(0), jnp.ones((1, 6, 6, 3)), t[:1], ctx[:1])


def test_attention_kernel_choice():
  """Every kernel computes causal softmax attention per head; 'auto' is the explicit
  heads-major form off a GPU; cuDNN needs a GPU; a misspelt kernel is refused."""
  from ldm_jax.models import attention
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 6, 16)) for i in range(3))
  run = lambda impl: np.asarray(jax.jit(lambda q, k, v: attention.multi_head_attention(
      q, k, v, 2, is_causal=True, implementation=impl))(q, k, v))
  # Closed form: causal softmax attention per head.
  qh, kh, vh = (np.asarray(a).reshape(2, 6, 2, 8) for a in (q, k, v))
  logits = np.einsum("bnhd,bmhd->bhnm", qh, kh) / np.sqrt(8)
  logits = np.where(np.tril(np.ones((6, 6), bool)), logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  ref = np.einsum("bhnm,bmhd->bnhd", w / w.sum(-1, keepdims=True), vh).reshape(2, 6, 16)
  for impl in ("auto", "explicit", "xla"):
    np.testing.assert_allclose(run(impl), ref, atol=1e-5)
  if jax.default_backend() != "gpu":
    np.testing.assert_array_equal(run("auto"), run("explicit"))
    with pytest.raises(Exception):
      run("cudnn")
  with pytest.raises(ValueError, match="attention implementation"):
    run("flash")


def test_attention_field_reaches_every_attention():
  """UNetModel.attention is the kernel of its cross- and self-attention blocks (on a CPU
  'cudnn' cannot run, so a model that uses it anywhere fails); a bad name fails at init."""
  x, t, ctx = jnp.ones((1, 4, 4, 4)), jnp.array([10]), jnp.ones((1, 3, 16))
  for context_dim in (16, None):
    kw = {**_TINY, "model_channels": 16, "channel_mult": (1,), "attention_resolutions": (1,),
          "num_heads": 2, "context_dim": context_dim}
    c = ctx if context_dim else None
    ok = unet.UNetModel(**kw, attention="explicit")
    jax.eval_shape(ok.init, jax.random.key(0), x, t, c)
    if jax.default_backend() != "gpu":
      with pytest.raises(Exception):
        jax.eval_shape(unet.UNetModel(**kw, attention="cudnn").init, jax.random.key(0), x, t, c)
  with pytest.raises(ValueError, match="UNetModel: attention implementation"):
    unet.UNetModel(**{**_TINY, "attention": "flash"}).init(
        jax.random.key(0), jnp.ones((1, 8, 8, 4)), t, jnp.ones((1, 3, 32)))
