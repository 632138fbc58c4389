"""Device mesh, logical-axis rules and shardings: everything about where arrays live.

The mesh has the axes `data`, `fsdp` and `tensor` (sizes from `config.mesh`,
one may be -1 = the rest of the devices; `config.dcn_mesh` adds the sizes across
slices for multi-slice jobs). Parameters carry logical axis names
(`ldm_jax.models.layers`); `config.sharding_rules` maps them to mesh axes. The
batch is split over `data` x `fsdp`.
"""
import contextlib
import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical name -> mesh axis. Weights: fsdp over input features, tensor over
# output features and heads. Activations: batch over data x fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("norm", None),
    ("length", None),
    ("height", None),
    ("width", None),
    ("channels", None),
)


def _resolve_sizes(axes: Sequence, n: int, field: str) -> tuple:
  names = tuple(a for a, _ in axes)
  sizes = [int(s) for _, s in axes]
  if names != MESH_AXES:
    raise ValueError(f"config.{field} must name the axes {MESH_AXES} in this order, got {names}")
  if sizes.count(-1) > 1:
    raise ValueError(f"config.{field}: at most one axis may be -1, got {list(axes)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if n % known:
      raise ValueError(f"config.{field}={list(axes)} does not divide the {n} devices")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(f"config.{field}={list(axes)} needs {math.prod(sizes)} devices, "
                     f"but {n} are available")
  return tuple(sizes)


def cpu_device_count(stage_configs: Sequence, cores: int) -> int:
  """How many XLA devices to split a CPU host into: the most, up to one per core,
  that every stage's `mesh` and `batch_size` (x `grad_accum`) accept.

  XLA's CPU runtime spreads one device's small convolutions and matmuls poorly
  over cores, so one device per core with the batch split over `data` is faster
  (`python bench/train.py --compare_devices 1,2` times it; docs/experiments.md).
  """
  for n in range(max(cores, 1), 1, -1):
    def fits(c):
      if c.get("dcn_mesh"):
        return False
      try:
        sizes = _resolve_sizes(c.mesh, n, "mesh")
      except ValueError:
        return False
      return c.batch_size % (sizes[0] * sizes[1] * max(c.grad_accum, 1)) == 0
    if all(fits(c) for c in stage_configs):
      return n
  return 1


def make_mesh(config, devices=None) -> Mesh:
  """The mesh of `config.mesh` (per slice) x `config.dcn_mesh` (across slices)."""
  devices = list(jax.devices() if devices is None else devices)
  dcn = config.get("dcn_mesh")
  if dcn:
    dcn_sizes = _resolve_sizes(dcn, jax.process_count() if not hasattr(devices[0], "slice_index")
                               else len({d.slice_index for d in devices}), "dcn_mesh")
    ici_sizes = _resolve_sizes(config.mesh, len(devices) // math.prod(dcn_sizes), "mesh")
    arr = mesh_utils.create_hybrid_device_mesh(ici_sizes, dcn_sizes, devices)
  else:
    sizes = _resolve_sizes(config.mesh, len(devices), "mesh")
    try:
      arr = mesh_utils.create_device_mesh(sizes, devices)
    except (ValueError, AssertionError, NotImplementedError):
      arr = np.asarray(devices).reshape(sizes)
  return Mesh(arr, MESH_AXES)


def rules_of(config) -> tuple:
  return tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in config.sharding_rules)


@contextlib.contextmanager
def activate(mesh: Mesh, rules):
  """Mesh + logical rules for tracing code that uses `nn.with_logical_constraint`."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit(shape_struct, sharding: NamedSharding) -> NamedSharding:
  """Drops mesh axes from dimensions they do not divide (e.g. RGB's 3 over fsdp=8)."""
  spec = list(sharding.spec) + [None] * (len(shape_struct.shape) - len(sharding.spec))
  mesh = sharding.mesh
  for i, (dim, axes) in enumerate(zip(shape_struct.shape, spec)):
    if axes is None:
      continue
    names = axes if isinstance(axes, tuple) else (axes,)
    if dim % math.prod(mesh.shape[a] for a in names):
      spec[i] = None
  return NamedSharding(mesh, P(*spec))


def unbox(tree):
  """Strips the logical-axis boxes, leaving plain arrays (no sharding constraints:
  placement is fixed by the shardings the caller passes to jit)."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)
  return jax.tree.map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def state_shardings(abstract_boxed: Any, mesh: Mesh, rules) -> Any:
  """Shardings for a (boxed, abstract) train state: rules for annotated leaves,
  replication for the rest, dimensions not divisible by their axes replicated."""
  specs = nn.get_partition_spec(abstract_boxed)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
  abstract = unbox(abstract_boxed)
  return jax.tree.map(_fit, abstract, shardings)


def create_sharded(init_fn: Callable, rng, mesh: Mesh, rules):
  """Runs `init_fn(rng)` so that every leaf is born sharded.

  Returns:
    (state, shardings): the unboxed state and the matching tree of NamedShardings.
  """
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, rng)
    shardings = state_shardings(abstract, mesh, rules)
    init = jax.jit(lambda r: unbox(init_fn(r)), out_shardings=shardings)
    if mesh.devices.flat[0].platform == "cpu":
      # It runs once: LLVM's optimisations would cost more than they save (the tiny
      # default's state compiles in 13 s instead of 23 s).
      init = init.lower(rng).compile(compiler_options={"xla_backend_optimization_level": 0})
    return init(rng), shardings


def abstract_state(init_fn: Callable, rng, mesh: Mesh, rules):
  """ShapeDtypeStructs with shardings, for restoring a checkpoint onto `mesh`."""
  with activate(mesh, rules):
    abstract = jax.eval_shape(init_fn, rng)
    shardings = state_shardings(abstract, mesh, rules)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      unbox(abstract), shardings), shardings


def global_batch(local: dict, mesh: Mesh) -> dict:
  """Host-local numpy arrays -> global arrays split over data x fsdp."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)),
                      local)


def check_batch(global_batch_size: int, mesh: Mesh, grad_accum: int = 1) -> int:
  """Validates `config.batch_size`; returns the per-process batch size."""
  dp = data_parallel_size(mesh)
  if global_batch_size % (dp * max(grad_accum, 1)):
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by the data-parallel "
                     f"size {dp} (data x fsdp) times config.grad_accum={grad_accum}")
  if global_batch_size % jax.process_count():
    raise ValueError(f"config.batch_size={global_batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  return global_batch_size // jax.process_count()

