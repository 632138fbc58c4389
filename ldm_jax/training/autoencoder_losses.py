"""Stage-1 losses as pure functions (taming-transformers' LPIPSWithDiscriminator /
VQLPIPSWithDiscriminator, in the paper's symbols).

KL model:  L = sum(rec / exp(logvar) + logvar) / B + kl_weight * KL
               + lambda * disc_factor * G
VQ model:  L = mean(rec) + codebook_weight * L_vq + lambda * disc_factor * G
with rec = |x - x_hat| (or squared) + w_g * the same of its image gradients
+ w_p * LPIPS(x, x_hat), G = -mean(D(x_hat)),
and the discriminator trained on disc_factor * hinge/vanilla(D(x), D(sg[x_hat])).
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax


def kl_loss(mean, logvar):
  """KL(N(mean, exp(logvar)) || N(0, I)) summed over latent elements, averaged over the batch."""
  kl = 0.5 * jnp.sum(mean ** 2 + jnp.exp(logvar) - 1.0 - logvar, axis=tuple(range(1, mean.ndim)))
  return jnp.mean(kl)


def rec_loss(x, x_hat, kind: str = "l1", p_loss=None, perceptual_weight: float = 1.0,
             gradient_weight: float = 0.0):
  """Per-element reconstruction loss (B, H, W, C): |x - x_hat| or (x - x_hat)^2, plus
  `perceptual_weight * p_loss` broadcast from a per-example LPIPS (B,) when given, plus
  `gradient_weight` times the same penalty on the difference of the images' finite
  differences along H and W (the gradient-difference loss of Mathieu et al., 2016)."""
  d = x.astype(jnp.float32) - x_hat.astype(jnp.float32)
  if kind == "l1":
    pen = jnp.abs
  elif kind == "l2":
    pen = jnp.square
  else:
    raise ValueError(f"stage1.loss.rec: expected 'l1' or 'l2', got {kind!r}")
  r = pen(d)
  if gradient_weight:
    # d's finite differences are grad(x) - grad(x_hat); each is charged to the pixel it
    # starts from (the last row / column has none).
    gy = jnp.pad(pen(d[:, 1:] - d[:, :-1]), ((0, 0), (0, 1), (0, 0), (0, 0)))
    gx = jnp.pad(pen(d[:, :, 1:] - d[:, :, :-1]), ((0, 0), (0, 0), (0, 1), (0, 0)))
    r = r + gradient_weight * (gy + gx)
  if p_loss is not None:
    r = r + perceptual_weight * p_loss.reshape((-1,) + (1,) * (r.ndim - 1))
  return r


def nll_loss(rec, logvar):
  """Gaussian/Laplace NLL with one learned scalar log-variance: sum(rec/exp(logvar) + logvar) / B."""
  return jnp.sum(rec / jnp.exp(logvar) + logvar) / rec.shape[0]


def hinge_d_loss(logits_real, logits_fake):
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(x_hat)))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real, logits_fake):
  """0.5 * (mean softplus(-D(x)) + mean softplus(D(x_hat))): the non-saturating BCE."""
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real)) + jnp.mean(jax.nn.softplus(logits_fake)))


DISC_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake):
  """G = -mean D(x_hat)."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad, g_grad, disc_weight: float):
  """lambda = ||grad NLL|| / (||grad G|| + 1e-4), clipped to [0, 1e4], times disc_weight.

  Args:
    nll_grad, g_grad: gradients (arrays or trees) of the NLL and of G w.r.t. the
      decoder's last layer (its conv_out kernel).
  Returns:
    A scalar with no gradient.
  """
  w = optax.tree.norm(nll_grad) / (optax.tree.norm(g_grad) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, 1e4) * disc_weight)


def last_layer_grad(loss_of_x_hat: Callable, last_layer: Callable, feats, kernel):
  """d loss / d kernel of the decoder's last layer, with its input `feats` held fixed.

  Since x_hat = last_layer(feats, kernel), this is the true gradient w.r.t. the
  kernel, without a second backward pass through the decoder.
  """
  feats = jax.lax.stop_gradient(feats)
  return jax.grad(lambda k: loss_of_x_hat(last_layer(feats, k)))(kernel)


def adopt_weight(weight, step, threshold: int):
  """`weight` from step `threshold` on, 0 before (disc_start gating)."""
  return jnp.where(step >= threshold, weight, 0.0)
