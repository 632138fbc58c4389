"""Train states drawn on the host with numpy. Tests that train a few steps or sample
do not need the models' own initialisers, and compiling one costs about as much as
compiling the update step (`parallel.create_sharded`). The initialisers themselves
run in the default's tests (test_learning, test_entrypoints, test_preemption) and
the meshes' (test_spine)."""
import jax
import numpy as np


def draw(abstract, rng: np.random.Generator, scale: float = 0.1):
  """numpy arrays ~ N(0, scale^2) of the shapes and dtypes of `abstract`."""
  return jax.tree.map(lambda a: (scale * rng.standard_normal(a.shape)).astype(a.dtype), abstract)


def state(abstract, shardings=None, seed: int = 0):
  """A fresh train state for the abstract one: parameters and frozen parts from
  `draw`, the EMA equal to the parameters, a zero optimizer state (what Adam's init
  gives), step 0, scale factor 1; placed on `shardings` (None: the default device).
  The same seed gives the same state on any mesh. Returns (state, host parameters)."""
  rng = np.random.default_rng(seed)
  params = draw(abstract["params"], rng)
  host = dict(abstract, step=np.zeros((), np.int32), params=params, ema=params,
              frozen=draw(abstract["frozen"], rng), scale_factor=np.ones((), np.float32),
              opt=jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), abstract["opt"]))
  return jax.device_put(host, shardings), params


def initial_state(abstract, shardings):
  """`loop.run(initial_state=)`: `state(abstract, shardings)`."""
  return state(abstract, shardings)[0]


def variables(abstract, seed: int = 0):
  """Flax variables (a first stage's) from `draw`, on the default device."""
  return jax.device_put(draw(abstract, np.random.default_rng(seed)))
