"""Fine-tuning Stable Diffusion: `config.pretrained` -> the config the files fix, the
frozen first stage and the initial stage-2 state.

  resolve(config, explicit)  reads the files; returns the config with every field
                             they fix set from them (stage 1 skipped: the VAE comes
                             trained), after checking the fields the user set;
  first_stage(config, p)     the pretrained VAE as the frozen `FirstStage` (what the
                             latent cache encodes with);
  pieces(config, p)          the arrays of the initial state, and
  initial_state(task, pieces) `loop.run`'s fresh-start hook that places them (no
                             random init). A restored state keeps its own: a
                             resumed fine-tune continues from its checkpoint.
"""
import hashlib
import json
import logging
import math
from typing import Iterable, Optional

import jax
import ml_collections
import numpy as np

from ldm_jax.pretrained import load, stage2
from ldm_jax.pretrained.model import Pretrained

log = logging.getLogger("ldm_jax")

# Fields a user may set against the files: they change how the weights train or
# run, not what they are (a convolutional UNet fine-tunes at another resolution).
USER_WINS = ("data.resolution", "stage1.image_size", "stage2.unet.dropout",
             "stage2.unet.attention")


def _lookup(overrides: dict, field: str):
  """(True, value) of the dotted `field` in `overrides` (inside a dict value too);
  (False, None) when the files do not fix it."""
  for key, value in overrides.items():
    if field == key:
      return True, value
    if field.startswith(key + ".") and isinstance(value, dict):
      for name in field[len(key) + 1:].split("."):
        if not isinstance(value, dict) or name not in value:
          return False, None
        value = value[name]
      return True, value
  return False, None


def _same(a, b) -> bool:
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
  if isinstance(a, dict) or isinstance(b, dict):
    return dict(a) == dict(b)
  if isinstance(a, float) or isinstance(b, float):
    try:
      return math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-12)
    except (TypeError, ValueError):
      return False
  return a == b


def _get(config, field: str):
  node = config
  for name in field.split("."):
    node = node[name]
  return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def _differs(config, field: str, value) -> bool:
  old = _get(config, field)
  if isinstance(value, dict):
    return any(not _same((old or {}).get(k), v) for k, v in value.items())
  return not _same(old, value)


def check_needs_weights(config) -> None:
  """Fails, naming the fields, when stage 2 would start without a first stage:
  a recipe that trains none (size=sd15 / sd2) and neither `config.pretrained` nor
  `config.stage2.first_stage_workdir` says where one is."""
  if ("ldm" in config.stages and "autoencoder" not in config.stages
      and not config.get("pretrained") and not config.stage2.get("first_stage_workdir")
      and not config.stage1.total_steps):
    raise ValueError("config.pretrained is empty and this recipe trains no first stage "
                     "(config.stage1.total_steps=0, as configs/txt2img.py size=sd15|sd2): give "
                     "--config.pretrained=<a Stable Diffusion diffusers folder or single file> "
                     "to fine-tune it, or config.stage2.first_stage_workdir")


def resolve(config, explicit: Iterable[str] = ()) -> tuple[ml_collections.ConfigDict,
                                                            Optional[Pretrained]]:
  """The config of a fine-tune of `config.pretrained`, and the weights read.

  Args:
    config: a stage-2 recipe (`configs/txt2img.py`, any size) with `pretrained` set.
    explicit: dotted config fields the user set (the command line's overrides).
      Each that the files also fix must agree with them; the recipe's own values
      of those fields give way (logged). `stage2.prediction_type` is the files'
      override (`pretrained.load(prediction_type=)`: SD 2.x base is eps, a single
      file cannot tell), the fields of `USER_WINS` are the user's.

  Returns:
    (config, Pretrained), or (config, None) when `config.pretrained` is empty.

  Raises:
    ValueError before anything compiles: `autoencoder` in an explicit
    `config.stages`, or an explicit field that differs from the files (naming it
    and both values); and `pretrained.load`'s errors.
  """
  check_needs_weights(config)
  if not config.get("pretrained"):
    return config, None
  explicit = set(explicit)
  if "stages" in explicit and "autoencoder" in config.stages:
    raise ValueError(f"config.stages={tuple(config.stages)} with config.pretrained: the first "
                     "stage comes trained from the files; list only 'ldm'")
  p = load(config.pretrained, config=config.get("pretrained_config") or None,
           tokenizer=config.get("pretrained_tokenizer") or None,
           prediction_type=(config.stage2.prediction_type
                            if "stage2.prediction_type" in explicit else None))
  overrides = stage2.config_overrides(p, text_trainable=bool(config.stage2.text.trainable))
  mine = {f for f in USER_WINS if f in explicit}
  for field in sorted(explicit - mine - {"pretrained", "stages"}):
    fixed, want = _lookup(overrides, field)
    if fixed and not _same(_get(config, field), want):
      raise ValueError(f"config.{field}={_get(config, field)!r}, but {p.path} has {want!r}; "
                       "drop the override (the files fix this field)")
  changed = [f for f, v in overrides.items() if f not in mine and _differs(config, f, v)]
  out = stage2.apply(config, overrides)
  for field in mine:  # the user's value stands, also inside a section the files replaced
    *parents, leaf = field.split(".")
    node = out
    for name in parents:
      node = node[name]
    node[leaf] = _get(config, field)
  if "data.resolution" in mine:
    out.stage1.image_size = out.data.resolution
  log.info("fine-tuning %s (%s): the files set %s", p.path, p.layout,
           ", ".join(changed) or "nothing the recipe did not already say")
  return out, p


def source(p: Pretrained) -> dict:
  """Where the VAE's weights came from, for the latent cache's signature: the path
  and a checksum, so files replaced at the same path are noticed."""
  sums = [float(np.sum(np.asarray(a, np.float64)))
          for a in jax.tree.leaves(p.params["vae"])]
  digest = hashlib.sha256(json.dumps([p.vae, sums], default=str).encode()).hexdigest()[:16]
  return {"pretrained": p.path, "vae": digest}


def first_stage(config, p: Pretrained, mesh):
  """The files' VAE as the frozen first stage on `mesh`, with their scale factor;
  its weights are put on the devices (replicated) only where the latent cache
  encodes with them (the state carries its own copy)."""
  from jax.sharding import NamedSharding, PartitionSpec
  from ldm_jax.training.first_stage import FirstStage
  variables = {"params": p.params["vae"]}
  if config.stage2.get("latent_cache"):
    variables = jax.device_put(variables, NamedSharding(mesh, PartitionSpec()))
  return FirstStage.from_variables(config, variables, p.scale_factor, source=source(p), mesh=mesh)


def pieces(config, p: Pretrained) -> dict:
  """The arrays of the initial stage-2 state (`stage2.state_pieces`), the text
  encoder trainable or frozen after `config.stage2.text.trainable`."""
  return stage2.state_pieces(p, text_trainable=bool(config.stage2.text.trainable))


def initial_state(task, pieces: dict):
  """(abstract state, shardings) -> the fresh state of `task` holding `pieces`, with
  a new optimizer state and step 0 (`loop.run(initial_state=)`).

  Raises ValueError naming the first tensor whose name or shape differs, before
  anything compiles.
  """
  def make(abstract, shardings):
    missing = set(abstract) - set(pieces) - {"opt", "step"}
    if missing:
      raise ValueError(f"the pretrained weights fill no state.{sorted(missing)}")
    state = stage2.place({k: abstract[k] for k in pieces}, {k: shardings[k] for k in pieces},
                         pieces)
    state["opt"] = jax.jit(task.tx.init, out_shardings=shardings["opt"])(state["params"])
    state["step"] = jax.device_put(np.zeros((), np.int32), shardings["step"])
    return state
  return make
