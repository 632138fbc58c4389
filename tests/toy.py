"""A tiny task and an in-memory data iterator that exercise the training spine."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ldm_jax.models import layers
from ldm_jax.training.step import Task, accumulate_gradients


class TinyDenoiser(nn.Module):
  """conv -> swish -> conv, with a dense over channels; every param annotated."""

  @nn.compact
  def __call__(self, x):
    h = layers.Conv(16, name="conv_in")(x)
    h = nn.with_logical_constraint(h, ("batch", "height", "width", "channels"))
    h = layers.Dense(32, name="dense")(nn.swish(h))
    return layers.Conv(x.shape[-1], name="conv_out")(nn.swish(h))


class ToyTask(Task):
  """Learns to remove Gaussian noise from the batch's images."""

  def __init__(self, config):
    self.config = config
    self.model = TinyDenoiser()
    self.tx = optax.adam(config.lr)

  def init(self, rng):
    params = self.model.init(rng, jnp.zeros((1, 8, 8, 3)))
    return dict(step=jnp.zeros((), jnp.int32), params=params, opt=self.tx.init(params))

  def _loss(self, params, batch, rng):
    x = batch["image"]
    noisy = x + 0.3 * jax.random.normal(rng, x.shape)
    loss = jnp.mean((self.model.apply(params, noisy) - x) ** 2)
    return loss, {"loss": loss}

  def update(self, state, batch, rng):
    # The same noise for a given example whatever the sharding: fold in the row.
    loss, aux, grads = accumulate_gradients(self._loss, state["params"], batch, rng,
                                            self.config.grad_accum)
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return dict(step=state["step"] + 1, params=params, opt=opt), aux

  def sample(self, state, batch, rng):
    return self.model.apply(state["params"], batch["image"])

  def prepare_batch(self, host_batch):
    return {"image": host_batch["image"]}


class ArrayIterator:
  """Deterministic global batches from (seed, position); each process keeps its slice."""

  def __init__(self, global_batch, process_index=0, process_count=1, seed=0, state=None):
    self.global_batch, self.p, self.n, self.seed = global_batch, process_index, process_count, seed
    self.position = 0 if state is None else state["position"]
    self.stats_ = {"skipped": 0}

  def __next__(self):
    rng = np.random.default_rng([self.seed, self.position])
    batch = rng.uniform(-1, 1, (self.global_batch, 8, 8, 3)).astype(np.float32)
    self.position += 1
    per = self.global_batch // self.n
    return {"image": batch[self.p * per:(self.p + 1) * per]}

  def get_state(self):
    return {"position": self.position}

  def set_state(self, state):
    self.position = state["position"]

  def stats(self):
    return dict(self.stats_)


def toy_config(**overrides):
  from ldm_jax import config_lib
  c = config_lib.spine(batch_size=16, total_steps=6, log_every=1, ckpt_every=3,
                       sample_every=0, keep_ckpts=5)
  c.lr = 1e-2
  c.mesh = [("data", 1), ("fsdp", 1), ("tensor", 1)]
  for k, v in overrides.items():
    c[k] = v
  return c


def make_data(config, process_index=0, process_count=1):
  def make(state, per_process):
    del per_process
    return ArrayIterator(config.batch_size, process_index, process_count, config.seed, state)
  return make
