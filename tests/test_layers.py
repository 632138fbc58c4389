"""The building blocks of models/layers.py against their closed forms / XLA's own ops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from ldm_jax.models import layers


@pytest.mark.parametrize("shape,k,stride,pad", [
    ((2, 4, 4, 8), 3, 1, ((1, 1), (1, 1))),     # im2col (32 rows)
    ((2, 5, 5, 8), 3, 2, ((0, 1), (0, 1))),     # the VAE's downsampler: asymmetric pad, stride 2
    ((1, 8, 8, 8), 1, 1, ((0, 0), (0, 0))),     # 1x1: a matmul
    ((8, 8, 8, 4), 3, 1, ((1, 1), (1, 1))),     # 512 rows: XLA's convolution
    ((1, 20, 20, 4), 1, 1, ((0, 0), (0, 0))),   # 1x1 with 400 rows: still a matmul
])
def test_conv2d_equals_xla_convolution_and_its_gradient(shape, k, stride, pad):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, shape)
  w = jax.random.normal(kw, (k, k, shape[-1], 6))
  dn = lax.conv_dimension_numbers(shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  ref = lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), pad, dimension_numbers=dn)
  got = lambda x, w: layers.conv2d(x, w, (stride, stride), pad, dimension_numbers=dn)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  y, vjp = jax.vjp(got, x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  for a, b in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
  rows = shape[0] * y.shape[1] * y.shape[2]
  uses_dot = k == 1 or rows <= layers.IM2COL_MAX_ROWS
  hlo = jax.jit(got).lower(x, w).as_text()
  assert ("convolution" not in hlo) == uses_dot, hlo


def test_conv_module_routes_through_conv2d():
  conv = layers.Conv(4, 3)
  x = jnp.ones((1, 4, 4, 2))
  params = conv.init(jax.random.key(0), x)
  assert "convolution" not in jax.jit(conv.apply).lower(params, x).as_text()


@pytest.mark.parametrize("silu,dtype", [(False, jnp.float32), (True, jnp.float32),
                                        (True, jnp.bfloat16)])
def test_group_norm_equals_flax_and_its_gradient(silu, dtype):
  import flax.linen as nn
  kx, ks, kb, kg = jax.random.split(jax.random.key(0), 4)
  x = (3 * jax.random.normal(kx, (2, 4, 4, 16)) + 1).astype(dtype)
  scale = 1 + 0.1 * jax.random.normal(ks, (16,))
  bias = 0.1 * jax.random.normal(kb, (16,))
  flax_gn = nn.GroupNorm(num_groups=4, epsilon=1e-5, dtype=jnp.float32)
  act = nn.silu if silu else (lambda y: y)
  ref = lambda x, s, b: act(flax_gn.apply({"params": {"scale": s, "bias": b}}, x))
  got = lambda x, s, b: layers.group_norm(x, s, b, 4, 1e-5, silu)
  # The reference differentiates flax's GroupNorm in float32 at the same (bf16) values.
  y_ref, vjp_ref = jax.vjp(ref, x.astype(jnp.float32), scale, bias)
  y, vjp = jax.vjp(got, x, scale, bias)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jax.random.normal(kg, y.shape)
  (dx, ds, db), (dx_ref, ds_ref, db_ref) = vjp(g), vjp_ref(g)
  assert dx.dtype == dtype  # the input's dtype, rounded once from float32
  tol = 1e-4 if dtype == jnp.float32 else float(jnp.abs(dx_ref).max()) / 2 ** 8
  np.testing.assert_allclose(dx.astype(jnp.float32), dx_ref, rtol=0, atol=tol)
  np.testing.assert_allclose(ds, ds_ref, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(db, db_ref, rtol=1e-4, atol=1e-4)
  # The module has flax's parameter names and checks the grouping.
  mod = layers.GroupNorm(4, epsilon=1e-5, silu=silu)
  params = mod.init(jax.random.key(0), x)
  assert set(params["params"]) == {"scale", "bias"}
  with pytest.raises(ValueError, match="num_groups"):
    layers.GroupNorm(5).init(jax.random.key(0), x)
