"""Pieces every update step shares: the contracts of the shared loop (`Task`,
`DataIterator` for its input, `Evaluator` for periodic measurements) and
micro-batch gradient accumulation.

A *task* is what one training stage is to the shared loop
(`ldm_jax.training.loop`), which jits `update` with explicit in/out shardings and
a donated state.
"""
from typing import Callable, Iterator, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import optax


class Task(Protocol):
  """One training stage. Stages subclass it, which gives them the optional parts."""

  def init(self, rng) -> dict:
    """Pure. The train state as a dict with at least 'step'.

    Leaves that are `nn.LogicallyPartitioned` (flax boxed params, and optimizer
    states built from them) are sharded by the config's rules; the rest are
    replicated. The loop traces it under `jax.eval_shape`, then jits it with
    out_shardings, so weights are born sharded.
    """
    ...

  def update(self, state: dict, batch: dict, rng) -> tuple[dict, dict]:
    """Pure. `state` is unboxed. Returns (state, metrics), metrics a flat dict of scalars."""
    ...

  def sample(self, state: dict, batch: dict, rng):
    """Pure. NHWC images in [-1, 1] for the periodic grids (reconstructions for
    stage 1, generated images for stage 2)."""
    ...

  def prepare_batch(self, host_batch: dict) -> dict:
    """Host side: the data pipeline's batch (images, captions, labels) as arrays
    (e.g. captions tokenised) before they become global arrays."""
    ...

  def sample_metrics(self, batch: dict, images) -> dict:
    """Pure. Scalars about the periodic samples, logged as `sample/*` (stage 1:
    PSNR and SSIM of the held-out reconstructions). Default: none."""
    del batch, images
    return {}


class Evaluator(Protocol):
  """What the loop calls every `every` steps and at the end to measure the state
  (stage 2: `evaluation.periodic.Evaluator`); its scalars are logged as `eval/*`."""
  every: int

  def __call__(self, state: dict, mesh) -> dict:
    """Scalars about `state` (not donated: the loop waits for them)."""
    ...


@runtime_checkable
class DataIterator(Protocol):
  """What the loop reads batches from, and saves the position of in each checkpoint."""

  def __next__(self) -> dict:
    """The next host-local batch."""
    ...

  def get_state(self) -> dict:
    """A JSON-able position; `set_state` of it continues the stream exactly."""
    ...

  def set_state(self, state: dict) -> None:
    ...

  def stats(self) -> dict:
    """Counters (e.g. skipped samples by cause), logged as `data/*`."""
    ...


@runtime_checkable
class OnePassIterator(DataIterator, Protocol):
  """A data iterator that can also yield each example of its data once (the latent cache)."""

  def one_epoch(self) -> Iterator[dict]:
    ...


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

  The micro-batches are a `lax.scan` over strided slices of the leading (batch)
  axis, so activation memory is that of one micro-batch while the result equals
  the full-batch gradient of a mean loss. Micro-batch i holds rows i, i + m,
  i + 2m, ... (m = num_micro): a batch sharded over devices in contiguous blocks
  then gives every device its own rows of every micro-batch, and no data moves
  (contiguous micro-batches would each live on a few devices and be gathered).

  Args:
    loss_fn: (params, batch, rng) -> (loss, aux) with aux a dict of scalars.
    params: the differentiated parameters.
    batch: dict of arrays with a common leading batch axis.
    rng: a PRNG key; micro-batch i uses fold_in(rng, i).
    num_micro: number of micro-batches; must divide the batch (and, for the
      split to stay local, each device's rows).

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
    return jnp.swapaxes(x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]), 0, 1)

  micro = jax.tree.map(split, batch)

  def body(carry, i_mb):
    i, mb = i_mb
    (loss, aux), grads = grad_fn(params, mb, jax.random.fold_in(rng, i))
    return jax.tree.map(jnp.add, carry, (loss, aux, grads)), None

  zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro), rng)))
  zeros = (zeros[0][0], zeros[0][1], zeros[1])
  total, _ = jax.lax.scan(body, zeros, (jnp.arange(num_micro), micro))
  return jax.tree.map(lambda x: x / num_micro, total)
