"""Train states drawn on the host with numpy. Tests that train a few steps or sample
do not need the models' own initialisers, and compiling those costs about as much
as compiling the update step (`parallel.create_sharded`); the initialisers
themselves run in the tests of the default (test_learning, test_entrypoints), of
every task (test_tasks) and of the meshes (test_spine)."""
import jax
import numpy as np


def fill(abstract, seed: int = 0, scale: float = 0.1):
  """Arrays for a tree of sharded ShapeDtypeStructs: floats ~ N(0, scale^2), scalars
  and integers (step, scale_factor) one."""
  rng = np.random.default_rng(seed)

  def one(a):
    if a.ndim == 0 or not np.issubdtype(a.dtype, np.floating):
      return np.ones(a.shape, a.dtype)
    return (scale * rng.standard_normal(a.shape)).astype(a.dtype)
  return jax.tree.map(lambda a: jax.device_put(one(a), a.sharding), abstract)


def initial_state(task, seed: int = 0):
  """`loop.run(initial_state=)`: parameters and frozen parts from `fill`, the EMA
  equal to the parameters (its own buffers: the update donates the state), a fresh
  optimizer state, step 0 and scale factor 1. The same seed gives the same state on
  any mesh."""
  def make(abstract, shardings):
    state = {k: fill(abstract[k], seed) for k in abstract if k not in ("opt", "step")}
    state["ema"] = fill(abstract["params"], seed)
    state["opt"] = jax.jit(task.tx.init, out_shardings=shardings["opt"])(state["params"])
    state["step"] = jax.device_put(np.zeros((), np.int32), shardings["step"])
    return state
  return make
