"""train_and_evaluate: stage 1 (autoencoder) and/or stage 2 (latent diffusion).

`config.stages` lists what runs, in order. Each stage trains in its own folder
of the workdir (`autoencoder/`, `ldm/`) and resumes there. Stage 2 takes its first
stage from the autoencoder trained just before, or from
`config.stage2.first_stage_workdir` (a stage-1 workdir of an earlier run).
"""
import json
import logging
import os

import jax
import ml_collections
import numpy as np

from ldm_jax import checkpoint, config_lib, parallel
from ldm_jax import data as data_lib
from ldm_jax.data import make_iterator
from ldm_jax.training import latent_cache, loop
from ldm_jax.training.autoencoder import AutoencoderTask, scale_factor as scale_from_moments
from ldm_jax.training.ldm import LDMTask, check_config as check_ldm_config

log = logging.getLogger("ldm_jax")
STAGES = ("autoencoder", "ldm")
STAGE_CONFIG = {"autoencoder": "stage1", "ldm": "stage2"}  # stage -> its config section


def _data_factory(config, seed_offset: int = 0):
  def make(state, per_process):
    it = make_iterator(config.data, batch_size=per_process, process_index=jax.process_index(),
                       process_count=jax.process_count(), seed=config.seed + seed_offset)
    if state is not None:
      it.set_state(state)
    return it
  return make


def _first_batch(config, n: int, seed_offset: int, heldout: bool = False) -> dict:
  """n host-local examples from a separate stream (for sample / reconstruction grids);
  `heldout`: from images outside the training set where the source has them (shapes)."""
  data = config.data
  if heldout and data.source == "shapes":
    data = data_lib.heldout(data, num=max(n * jax.process_count(), 64))
  it = make_iterator(data, batch_size=n, process_index=jax.process_index(),
                     process_count=jax.process_count(), seed=config.seed + seed_offset)
  return next(it)


def _on_latents(config, pattern: str):
  """`config` reading the latent cache `pattern` instead of its images."""
  d = config.to_dict()
  d["data"].update(source="latents", shards=pattern)
  return ml_collections.ConfigDict(d).lock()


def _autoencoder_stage(config, workdir: str):
  c = config_lib.for_stage(config, "stage1")
  task = AutoencoderTask(c)
  per_process = max(c.num_samples // jax.process_count(), 1)
  res = loop.run(task, c, os.path.join(workdir, "autoencoder"), _data_factory(c),
                 sample_batch=_first_batch(c, per_process, 1000, heldout=True))
  return task, c, res


def _scale_factor(task, c, state, mesh, workdir: str) -> float:
  """1/std(z) over `stage1.scale_batches` global batches from all processes; cached."""
  path = os.path.join(workdir, "autoencoder", "scale_factor.json")
  if os.path.exists(path):
    return float(json.load(open(path))["scale_factor"])
  it = _data_factory(c, 2000)(None, c.batch_size // jax.process_count())
  moments = jax.jit(task.latent_moments)
  total = np.zeros(3)
  for _ in range(c.stage1.scale_batches):
    x = parallel.global_batch({"image": next(it)["image"]}, mesh)["image"]
    total += np.array(jax.device_get(moments(state["params"], x)), np.float64)
  scale = scale_from_moments(*total)
  if jax.process_index() == 0:
    with open(path, "w") as f:
      json.dump({"scale_factor": scale, "batches": c.stage1.scale_batches}, f)
  log.info("scale_factor = 1/std(z) = %.5f over %d batches", scale, c.stage1.scale_batches)
  return scale


def _restore_first_stage(config, stage1_workdir: str):
  """(task, variables, scale_factor) of a finished stage-1 run."""
  c = config_lib.for_stage(config, "stage1")
  task = AutoencoderTask(c)
  mesh = parallel.make_mesh(c)
  abstract, _ = parallel.abstract_state(task.init, jax.random.key(0), mesh, parallel.rules_of(c))
  ckpt = checkpoint.Checkpointer(os.path.join(stage1_workdir, "autoencoder", "checkpoints"))
  if ckpt.latest_step() is None:
    raise ValueError(f"config.stage2.first_stage_workdir='{stage1_workdir}' has no stage-1 checkpoint")
  saved = ckpt.saved_config()
  diffs = checkpoint.config_differences(saved.get("stage1", {}), config_lib.to_dict(c)["stage1"])
  if diffs:
    raise ValueError("config.stage1 differs from the first stage in "
                     f"{stage1_workdir}: " + "; ".join(diffs[:5]))
  state, _, _ = ckpt.restore(abstract)
  ckpt.close()
  return task, c, state, mesh


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the stages of `config.stages` in `workdir`; returns each stage's result."""
  config_lib.validate(config)
  unknown = [s for s in config.stages if s not in STAGES]
  if unknown:
    raise ValueError(f"config.stages: unknown stage(s) {unknown}; known: {STAGES}")
  if "ldm" in config.stages:
    latent_cache.check_config(config)
    check_ldm_config(config)  # before stage 1 trains
  checkpoint.check_writable(workdir)
  results = {}
  first = None  # (task, stage config, state, mesh)
  if "autoencoder" in config.stages:
    task, c, res = _autoencoder_stage(config, workdir)
    results["autoencoder"] = res
    first = (task, c, res["state"], res["mesh"])
  if "ldm" in config.stages:
    c2 = config_lib.for_stage(config, "stage2")
    task2 = LDMTask(c2)
    ldm_dir = os.path.join(workdir, "ldm")

    def initial_values(state, shardings):
      nonlocal first
      state = task2.initial_values(state, shardings)
      if first is None:
        src = config.stage2.first_stage_workdir or workdir
        first = _restore_first_stage(config, src)
      ae_task, c1, ae_state, mesh = first
      src_dir = config.stage2.first_stage_workdir or workdir
      scale = config.stage2.scale_factor or _scale_factor(ae_task, c1, ae_state, mesh, src_dir)
      variables = ae_task._variables(ae_state["params"])
      frozen = dict(state["frozen"], first_stage=jax.device_put(
          variables, shardings["frozen"]["first_stage"]))
      return dict(state, frozen=frozen,
                  scale_factor=jax.device_put(np.float32(scale), shardings["scale_factor"]))

    def cached_data(state, per_process):  # the latent cache in place of the images
      nonlocal first
      cache_dir = os.path.join(ldm_dir, "latents")
      pattern = latent_cache.cached_pattern(cache_dir, c2)
      if not pattern:
        if first is None:
          first = _restore_first_stage(config, config.stage2.first_stage_workdir or workdir)
        ae_task, c1, ae_state, mesh = first
        moments = jax.jit(task2.first.moments, out_shardings=parallel.batch_sharding(mesh))
        variables = ae_task._variables(ae_state["params"])
        with parallel.activate(mesh, parallel.rules_of(c1)):
          pattern = latent_cache.build(c2, lambda x: moments(variables, x), mesh, cache_dir,
                                       batch_size=c2.batch_size)
      return _data_factory(_on_latents(c2, pattern))(state, per_process)

    make_data = cached_data if c2.stage2.latent_cache else _data_factory(c2)

    n = max(c2.num_samples // jax.process_count(), 1)
    data_batch = _first_batch(c2, n, 1000) if task2.cond.concat != "none" else None
    results["ldm"] = loop.run(task2, c2, ldm_dir, make_data,
                              sample_batch=task2.cond.fixed_batch(n, data_batch),
                              initial_values=initial_values)
  return results
