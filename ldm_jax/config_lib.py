"""Shared pieces of the `configs/*.py` files: arg strings, the training spine's
fields and their validation. Model presets live beside the models."""
from typing import Any

import ml_collections

from ldm_jax import parallel


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'size=tiny,data=shapes' -> ConfigDict, typed after `defaults`.

  An unknown key fails with its name (the config file's documented args are
  `defaults`' keys).
  """
  out = ml_collections.ConfigDict(defaults)
  if arg:
    for item in arg.split(","):
      key, _, value = item.partition("=")
      key = key.strip()
      if key not in defaults:
        raise ValueError(f"unknown config arg '{key}'; known: {sorted(defaults)}")
      kind = type(defaults[key])
      out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out.lock()


def spine(**overrides: Any) -> ml_collections.ConfigDict:
  """Fields of the training spine shared by every config (each commented)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                       # one seed for init, data order and noise
  c.batch_size = 32                # global batch over all processes and devices
  c.total_steps = 1000             # optimizer steps of this stage
  c.grad_accum = 1                 # micro-batches per step (lax.scan inside the jitted step)
  c.dtype = "float32"              # compute dtype: float32 | bfloat16 (master weights stay f32)
  c.remat = False                  # rematerialise each block in the backward pass
  # Mesh axes (data, fsdp, tensor), one may be -1 = the remaining devices.
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.dcn_mesh = ()                  # sizes across slices for multi-slice jobs, same axis order
  c.sharding_rules = [list(r) for r in parallel.DEFAULT_RULES]  # logical name -> mesh axes
  c.log_every = 50                 # console + TensorBoard scalars
  c.ckpt_every = 500               # async Orbax save
  c.keep_ckpts = 3                 # checkpoints kept
  c.sample_every = 1000            # PNG grid + TensorBoard image (0 = only at the end)
  c.num_samples = 16               # images in a sample grid
  for k, v in overrides.items():
    c[k] = v
  return c


def validate(config) -> None:
  """Checks that need no devices; raises ValueError naming the field."""
  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"config.{field}: {msg} (got {config.get(field)!r})")

  need(config.batch_size > 0, "batch_size", "must be positive")
  need(config.total_steps >= 0, "total_steps", "must be >= 0")
  need(config.grad_accum >= 1, "grad_accum", "must be >= 1")
  need(config.dtype in ("float32", "bfloat16"), "dtype", "must be float32 or bfloat16")
  need(config.log_every > 0, "log_every", "must be positive")
  need(config.ckpt_every > 0, "ckpt_every", "must be positive")
  need([a for a, _ in config.mesh] == list(parallel.MESH_AXES), "mesh",
       f"must list the axes {parallel.MESH_AXES}")
  rule_names = {r[0] for r in config.sharding_rules}
  need("batch" in rule_names, "sharding_rules", "needs a rule for 'batch'")


def to_dict(config) -> dict:
  """A JSON-able dict of a config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()
