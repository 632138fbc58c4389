"""A pretrained Stable Diffusion as ldm_jax's stage 2: config fields and train-state pieces.

`config_overrides(p)` lists every config field the files fix (the first stage as a
frozen KL autoencoder, the UNet, the CLIP text tower and its tokenizer, the noise
schedule, the prediction type, the latent scale and the sampling grid);
`state_pieces(p)` the arrays of an `LDMTask` state (`params.unet`, `frozen.first_stage`,
the text encoder in `frozen.cond` or, trainable, `params.cond`, `ema` = `params`,
`scale_factor`); `place` puts them into a state born sharded on a mesh. Training
calls these from its fresh-start hook; `for_sampling` builds everything
`sampling.generate` needs without a checkpoint.
"""

import jax
import ml_collections
import numpy as np

from ldm_jax.pretrained.model import Pretrained


def config_overrides(p: Pretrained, *, text_trainable: bool = False) -> dict:
  """Dotted config field -> value for everything `p` fixes.

  Args:
    p: the pretrained model.
    text_trainable: fine-tune the text encoder with the UNet (it sits in `params.cond`).
  """
  if p.tokenizer is None:
    raise ValueError(f"{p.path}: no tokenizer was read (a single file holds none): give a "
                     "CLIP tokenizer folder (tokenizer=, --pretrained_config or "
                     "--pretrained_tokenizer)")
  s = p.schedule
  return {
      "stages": ("ldm",),  # the autoencoder comes trained
      "data.resolution": p.resolution,
      "stage1.kind": "kl", "stage1.f": p.factor, "stage1.image_size": p.resolution,
      "stage1.model": dict(p.vae), "stage1.sample_posterior": True,
      "stage2.unet": dict(p.unet),
      "stage2.text.encoder": "clip", "stage2.text.path": p.path,
      "stage2.text.clip": dict(p.text), "stage2.text.layer": p.text["layer"],
      "stage2.text.tokenizer_path": p.tokenizer_path,
      "stage2.text.max_length": p.tokenizer.max_length, "stage2.text.trainable": text_trainable,
      "stage2.conditioning.context": "text", "stage2.conditioning.classes": 0,
      "stage2.conditioning.concat": "none", "stage2.conditioning.pooled": False,
      "stage2.schedule.kind": s["kind"], "stage2.schedule.T": s["T"],
      "stage2.schedule.linear_start": s["linear_start"], "stage2.schedule.linear_end": s["linear_end"],
      "stage2.schedule.zero_terminal_snr": s["zero_terminal_snr"],
      "stage2.prediction_type": p.prediction_type, "stage2.scale_factor": p.scale_factor,
      **{f"stage2.sample.{k}": v for k, v in p.sampling.items()},
  }


def apply(config, overrides: dict) -> ml_collections.ConfigDict:
  """An unlocked copy of `config` with the dotted `overrides` set. A dict value is
  merged into the section it replaces: keys the files do not hold (e.g.
  `unet.attention`, an implementation choice) keep the config's value."""
  out = ml_collections.ConfigDict(config.to_dict())
  for dotted, value in overrides.items():
    *parents, leaf = dotted.split(".")
    node = out
    for name in parents:
      node = node[name]
    if isinstance(value, dict):
      old = node.get(leaf)
      value = ml_collections.ConfigDict(
          {**(old.to_dict() if isinstance(old, ml_collections.ConfigDict) else {}), **value})
    node[leaf] = value
  return out


def stage2_config(p: Pretrained, base=None, *, dtype: str = "float32",
                  text_trainable: bool = False) -> ml_collections.ConfigDict:
  """The ldm_jax config of `p`: `base` (default: the txt2img config of SD's size) with
  `config_overrides(p)` and `dtype` set."""
  if base is None:
    from ldm_jax import config_lib
    size = "sd2" if p.text["act"] == "gelu" else "sd15"
    base = config_lib.config_module("txt2img").get_config(f"size={size},data=wds").unlock()
    base.stage2.sample.guidance = 7.5  # Stable Diffusion's pipelines' default
  config = apply(base, config_overrides(p, text_trainable=text_trainable))
  config.dtype = dtype
  return config


def state_pieces(p: Pretrained, *, text_trainable: bool = False) -> dict:
  """The parts of an `LDMTask` state the files fill (host numpy arrays)."""
  params = {"unet": {"params": p.params["unet"]}}
  frozen = {"first_stage": {"params": p.params["vae"]}}
  (params if text_trainable else frozen)["cond"] = {"params": p.params["text"]}
  return dict(params=params, ema=params, frozen=frozen,
              scale_factor=np.float32(p.scale_factor))


def check(state, pieces: dict) -> None:
  """Raises ValueError naming the first leaf of `state` (arrays or shapes, e.g. from
  `jax.eval_shape`) whose name or shape differs in `pieces`: a config that is not
  the files'."""
  for key, piece in pieces.items():
    ref = jax.tree_util.tree_flatten_with_path(state[key])[0]
    got = jax.tree_util.tree_flatten_with_path(piece)[0]
    if [k for k, _ in ref] != [k for k, _ in got]:
      missing = {jax.tree_util.keystr(k) for k, _ in ref} ^ {jax.tree_util.keystr(k) for k, _ in got}
      raise ValueError(f"state.{key} and the pretrained weights differ in {sorted(missing)[:5]}")
    for (k, a), (_, b) in zip(ref, got):
      if tuple(np.shape(a)) != tuple(np.shape(b)):
        raise ValueError(f"state.{key}{jax.tree_util.keystr(k)}: shape {np.shape(b)} in the "
                         f"files vs {np.shape(a)} in the model")


def place(state: dict, shardings: dict, pieces: dict) -> dict:
  """`state` with `pieces` put in, each array onto its leaf's sharding (after `check`)."""
  check(state, pieces)
  out = dict(state)
  for key, piece in pieces.items():
    out[key] = jax.tree.map(lambda a, s, ref: jax.device_put(np.asarray(a, ref.dtype), s),
                            piece, shardings[key], state[key])
  return out


def for_sampling(p: Pretrained, *, base=None, dtype: str = "float32", devices=None):
  """(task, state, mesh, config) of `p` for `sampling.generate` / `LDMTask.sample`; the
  state holds no optimizer (nothing trains)."""
  from ldm_jax import parallel
  from ldm_jax.training.ldm import LDMTask
  config = stage2_config(p, base, dtype=dtype)
  task = LDMTask(config)
  mesh = parallel.make_mesh(config, devices)
  abstract, shardings = parallel.abstract_state(task.init, jax.random.key(0), mesh,
                                                parallel.rules_of(config))
  pieces = state_pieces(p)
  del pieces["ema"]  # sampling reads the EMA: the same arrays as params, placed once
  state = place({k: abstract[k] for k in pieces}, {k: shardings[k] for k in pieces}, pieces)
  state.update(ema=state["params"], step=jax.device_put(np.zeros((), np.int32), shardings["step"]))
  return task, state, mesh, config
