"""A trained checkpoint onto whatever devices are here, for sampling and evaluation.

The run's saved config rebuilds the task; a mesh saved for another device count
becomes pure data parallelism over the devices present, and Orbax reshards the
arrays onto it (checkpoints restore onto any mesh).
"""
import logging
from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from ldm_jax import checkpoint, parallel, storage

log = logging.getLogger("ldm_jax")


def restore(ckpt_dir: str, make_task: Callable, *, stage: str, what: str,
            step: Optional[int] = None, devices=None):
  """(task, state, mesh, config) of the checkpoint in `ckpt_dir`.

  Args:
    make_task: config -> Task.
    stage: the stage the checkpoint must hold ('autoencoder' | 'ldm'); its config
      section is 'stage1' | 'stage2'.
    what: the right kind of folder, for the error, e.g. 'autoencoder/checkpoints folder of a run'.
  Raises:
    ValueError: no folder, no complete checkpoint, or a checkpoint of another stage.
  """
  if not storage.exists(ckpt_dir):
    raise ValueError(f"no checkpoint folder at '{ckpt_dir}'")
  ckpt = checkpoint.Checkpointer(ckpt_dir)
  if ckpt.latest_step() is None:
    raise ValueError(f"'{ckpt_dir}' holds no complete checkpoint")
  saved = ckpt.saved_config(step)
  section = {"autoencoder": "stage1", "ldm": "stage2"}[stage]
  stages = saved.get("stages", ()) if saved else ()
  # A stage-2 checkpoint also carries stage1 (its frozen first stage); it is told
  # apart from a stage-1 checkpoint by its stage2 section.
  wrong = not saved or section not in saved or stage not in stages or (
      stage == "autoencoder" and "stage2" in saved)
  if wrong:
    kind = {"autoencoder": "stage-1 (autoencoder)", "ldm": "stage-2 (latent diffusion)"}[stage]
    raise ValueError(f"the checkpoint in '{ckpt_dir}' is not a {kind} model; give the {what}")
  config = ml_collections.ConfigDict(saved)
  n = len(devices or jax.devices())
  sizes = [s for _, s in config.mesh]
  if -1 not in sizes and int(np.prod(sizes)) != n:
    config.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  task = make_task(config)
  mesh = parallel.make_mesh(config, devices)
  abstract, _ = parallel.abstract_state(task.init, jax.random.key(0), mesh, parallel.rules_of(config))
  state, _, at = ckpt.restore(abstract, step=step)
  ckpt.close()
  log.info("restored step %d from %s", at, ckpt_dir)
  return task, state, mesh, config
