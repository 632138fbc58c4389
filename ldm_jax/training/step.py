"""Pieces every update step shares: the Task contract and micro-batch gradient accumulation.

A *task* is what one training stage is to the shared loop (`ldm_jax.training.loop`):

  class Task:
    def init(self, rng) -> dict
      # Pure. The train state as a dict with at least 'step'. Leaves that are
      # `nn.LogicallyPartitioned` (flax boxed params, and optimizer states built
      # from them) are sharded by the config's rules; the rest are replicated.
      # The loop traces it under `jax.eval_shape`, then jits it with out_shardings,
      # so weights are born sharded.
    def update(self, state, batch, rng) -> (state, metrics)
      # Pure. `state` is unboxed. `metrics` is a flat dict of scalars.
    def sample(self, state, batch, rng) -> images
      # Pure. NHWC images in [-1, 1] for the periodic grids (reconstructions for
      # stage 1, generated images for stage 2).
    def sample_metrics(self, batch, images) -> dict   # optional
      # Pure. Scalars about the periodic samples (stage 1: PSNR and SSIM of the
      # reconstructions of the held-out sample batch), logged as `sample/*`.
    def prepare_batch(self, host_batch) -> dict of numpy arrays
      # Host side: turns the data pipeline's batch (images, captions, labels)
      # into arrays (e.g. tokenises captions) before they become global arrays.

The loop jits `update` with explicit in/out shardings and donated state.
"""
from typing import Callable

import jax
import jax.numpy as jnp
import optax

LR_DECAYS = ("constant", "cosine")


def lr_schedule(peak: float, *, warmup_steps: int, total_steps: int, decay: str,
                final_ratio: float = 0.0) -> optax.Schedule:
  """Linear warm-up to `peak`, then constant or a cosine to `final_ratio * peak`
  at `total_steps` (the field that names it is in the error)."""
  if decay not in LR_DECAYS:
    raise ValueError(f"lr_decay must be one of {LR_DECAYS}, got {decay!r}")
  warm = max(int(warmup_steps), 1)
  if decay == "cosine":
    return optax.warmup_cosine_decay_schedule(0.0 if warmup_steps else peak, peak, warm,
                                              max(int(total_steps), warm + 1),
                                              end_value=final_ratio * peak)
  if not warmup_steps:
    return optax.constant_schedule(peak)
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warm),
                               optax.constant_schedule(peak)], [warm])


def cast_kernels(params, dtype):
  """`params` with every floating leaf of 2 or more dimensions (dense and conv kernels,
  embeddings) cast to `dtype`; norm scales and biases stay as they are.

  A bfloat16 model casts its float32 master weights at every use; casting them once
  before the forward pass gives the backward pass (and a remat's recomputation, and an
  FSDP gather) the half-width copy instead. The gradient flows back through the cast
  to the float32 weights, so the optimizer is unchanged.
  """
  def cast(x):
    return x.astype(dtype) if x.ndim >= 2 and jnp.issubdtype(x.dtype, jnp.floating) else x
  return jax.tree.map(cast, params)


def accumulate_gradients(loss_fn: Callable, params, batch: dict, rng, num_micro: int):
  """Mean loss, aux and gradients of `loss_fn` over `num_micro` micro-batches.

  The micro-batches are a `lax.scan` over slices of the leading (batch) axis,
  so activation memory is that of one micro-batch while the result equals the
  full-batch gradient of a mean loss.

  Args:
    loss_fn: (params, batch, rng) -> (loss, aux) with aux a dict of scalars.
    params: the differentiated parameters.
    batch: dict of arrays with a common leading batch axis.
    rng: a PRNG key; micro-batch i uses fold_in(rng, i).
    num_micro: number of micro-batches; must divide the batch.

  Returns:
    (loss, aux, grads), each the mean over micro-batches.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if num_micro <= 1:
    (loss, aux), grads = grad_fn(params, batch, rng)
    return loss, aux, grads

  def split(x):
    if x.shape[0] % num_micro:
      raise ValueError(f"grad_accum={num_micro} does not divide the batch of {x.shape[0]}")
    return x.reshape((num_micro, x.shape[0] // num_micro) + x.shape[1:])

  micro = jax.tree.map(split, batch)

  def body(carry, i_mb):
    i, mb = i_mb
    (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)))
  zeros = (zeros[0][0], zeros[0][1], zeros[1])
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
  return jax.tree.map(lambda x: x / num_micro, total)
