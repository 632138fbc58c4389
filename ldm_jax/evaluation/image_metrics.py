"""PSNR and SSIM of NHWC image batches in jnp.

SSIM follows Wang et al. 2004 as `skimage.metrics.structural_similarity(...,
gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=...)`:
an 11x11 Gaussian window (sigma 1.5), K1 0.01, K2 0.03, per-channel maps
averaged over the valid (unpadded) region and the channels.
"""
import jax
import jax.numpy as jnp


def psnr(x, y, data_range: float = 2.0):
  """Peak signal-to-noise ratio in dB, one value per example.

  Args:
    x, y: (B, H, W, C) images; `data_range` is max - min (2 for [-1, 1]).
  Returns:
    (B,) PSNR = 10 log10(range^2 / MSE).
  """
  mse = jnp.mean(jnp.square(x.astype(jnp.float32) - y.astype(jnp.float32)), axis=(1, 2, 3))
  return 10.0 * jnp.log10(data_range ** 2 / jnp.maximum(mse, 1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5):
  r = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
  g = jnp.exp(-r ** 2 / (2 * sigma ** 2))
  return g / g.sum()


def _filter(x, g):
  """Separable 'valid' Gaussian filter of (B, H, W, C), channel by channel."""
  b, h, w, c = x.shape
  x = x.transpose(0, 3, 1, 2).reshape(b * c, h, w, 1)
  dn = ("NHWC", "HWIO", "NHWC")
  x = jax.lax.conv_general_dilated(x, g.reshape(-1, 1, 1, 1), (1, 1), "VALID", dimension_numbers=dn)
  x = jax.lax.conv_general_dilated(x, g.reshape(1, -1, 1, 1), (1, 1), "VALID", dimension_numbers=dn)
  return x.reshape(b, c, x.shape[1], x.shape[2]).transpose(0, 2, 3, 1)


def ssim(x, y, data_range: float = 2.0, win_size: int = 11, sigma: float = 1.5):
  """Structural similarity, one value per example (mean over positions and channels).

  Args:
    x, y: (B, H, W, C) images with H, W >= win_size.
    data_range: max - min of the image range (2 for [-1, 1]).
  Returns:
    (B,) SSIM.
  """
  x = x.astype(jnp.float32)
  y = y.astype(jnp.float32)
  g = _gaussian_window(win_size, sigma)
  c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
  mx, my = _filter(x, g), _filter(y, g)
  vx = _filter(x * x, g) - mx ** 2
  vy = _filter(y * y, g) - my ** 2
  cxy = _filter(x * y, g) - mx * my
  s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
  return jnp.mean(s, axis=(1, 2, 3))
