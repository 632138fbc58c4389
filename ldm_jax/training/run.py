"""train_and_evaluate: stage 1 (autoencoder) and/or stage 2 (latent diffusion).

`config.stages` lists what runs, in order:

  stage 1 -> the first stage (FirstStage.restore: weights + scale factor)
          -> stage 2's inputs (the latent cache, when on) -> stage 2.

Each stage trains in its own folder of the workdir (`autoencoder/`, `ldm/`) and
resumes there. Stage 2 takes its first stage from the autoencoder trained just
before, or from `config.stage2.first_stage_workdir` (the workdir of an earlier run),
or, with `config.pretrained`, from Stable Diffusion's files, which also give the
UNet and text encoder it starts from (`pretrained.finetune`).

A SIGTERM stops the job at the next point where it can save (`Preempted`): a
stage saves its checkpoint and nothing after it starts, so stage 2 is never
built on an unfinished first stage; the same command resumes.
"""
import logging
from typing import Iterable, Optional

import jax
import ml_collections

from ldm_jax import config_lib, data as data_lib, parallel, storage
from ldm_jax.data import make_iterator
from ldm_jax.evaluation import periodic
from ldm_jax.pretrained import finetune
from ldm_jax.training import latent_cache, loop
from ldm_jax.training.autoencoder import AutoencoderTask
from ldm_jax.training.first_stage import FirstStage
from ldm_jax.training.ldm import LDMTask, check_config as check_ldm_config

log = logging.getLogger("ldm_jax")
STAGE_CONFIG = config_lib.STAGE_SECTIONS  # stage -> its config section
# The exit status of a job stopped by SIGTERM after saving (sysexits' EX_TEMPFAIL:
# "try again later"); launchers rerun the same command to resume.
EXIT_PREEMPTED = 75


class Preempted(Exception):
  """The job was asked to stop (SIGTERM); what had to be saved is saved."""


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


def _stop_if_asked(preemption, what: str) -> None:
  if preemption.agreed():
    raise Preempted(f"SIGTERM: stopped after {what}; run the same command again to resume")


def train_autoencoder(config, workdir: str) -> dict:
  """Stage 1 in `workdir/autoencoder`; returns the loop's result."""
  c = config_lib.for_stage(config, "stage1")
  per_process = max(c.num_samples // jax.process_count(), 1)
  sample_batch = _first_batch(c, per_process, 1000, heldout=True) if c.num_samples else None
  return loop.run(AutoencoderTask(c), c, storage.join(workdir, "autoencoder"), _data_factory(c),
                  sample_batch=sample_batch)


def latent_data(c2, first: FirstStage, ldm_dir: str):
  """Stage 2's data factory reading the latent cache of `first` in `ldm_dir/latents`,
  encoded first when it is missing or was made from other data or weights."""
  cache_dir = storage.join(ldm_dir, "latents")
  pattern = latent_cache.cached_pattern(cache_dir, c2, first.source)
  if not pattern:
    moments = jax.jit(first.moments, out_shardings=parallel.batch_sharding(first.mesh))
    with parallel.activate(first.mesh, parallel.rules_of(c2)):
      pattern = latent_cache.build(c2, lambda x: moments(first.variables, x), first.mesh,
                                   cache_dir, batch_size=c2.batch_size, source=first.source)
  return _data_factory(_on_latents(c2, pattern))


def train_ldm(config, workdir: str, first: FirstStage, pieces: Optional[dict] = None) -> dict:
  """Stage 2 in `workdir/ldm` on the frozen `first` stage; returns the loop's result.

  `pieces`: pretrained arrays (`pretrained.finetune.pieces`) a fresh state starts
  from, in place of random ones; a resumed state keeps its checkpoint's.
  """
  c2 = config_lib.for_stage(config, "stage2")
  task = LDMTask(c2, first_stage_given=True)
  hooks = {"initial_values": lambda state, sh: first.put(task.initial_values(state, sh), sh)}
  if pieces is not None:
    hooks = {"initial_state": finetune.initial_state(task, pieces)}
  ldm_dir = storage.join(workdir, "ldm")
  make_data = latent_data(c2, first, ldm_dir) if c2.stage2.latent_cache else _data_factory(c2)
  n = max(c2.num_samples // jax.process_count(), 1)
  data_batch = (_first_batch(c2, n, 1000)
                if c2.num_samples and task.cond.concat != "none" else None)
  evaluator = (periodic.Evaluator(task, c2, storage.join(ldm_dir, "eval"))
               if c2.stage2.eval.every else None)
  return loop.run(task, c2, ldm_dir, make_data,
                  sample_batch=task.cond.fixed_batch(n, data_batch) if c2.num_samples else None,
                  evaluator=evaluator, **hooks)


def train_and_evaluate(config, workdir: str, *, explicit: Iterable[str] = ()) -> dict:
  """Runs the stages of `config.stages` in `workdir` (local or URL).

  Args:
    config: the recipe.
    workdir: where each stage trains and resumes.
    explicit: dotted config fields the user set (the command line's overrides):
      with `config.pretrained`, each that the files also fix must agree with them.

  Returns:
    {stage name: the loop's result} of each stage run.
  Raises:
    Preempted: SIGTERM; the running stage saved its checkpoint and nothing after
      it started (the command line exits with EXIT_PREEMPTED).
  """
  config, weights = finetune.resolve(config, explicit)  # files read, nothing compiled
  config_lib.validate(config)  # every stage's settings, before any stage starts
  if "ldm" in config.stages:
    latent_cache.check_config(config)
    check_ldm_config(config)  # before stage 1 trains
    periodic.check_config(config)
  storage.check_writable(workdir)
  results = {}
  with loop.Preemption() as preemption:  # one flag for all stages
    if "autoencoder" in config.stages:
      results["autoencoder"] = train_autoencoder(config, workdir)
      _stop_if_asked(preemption, f"stage 1 saved step {results['autoencoder']['step']}")
    if "ldm" in config.stages:
      if weights is not None:
        c2 = config_lib.for_stage(config, "stage2")
        first = finetune.first_stage(c2, weights, parallel.make_mesh(c2))
        pieces = finetune.pieces(config, weights)
      else:
        first, pieces = FirstStage.restore(config, config.stage2.first_stage_workdir or workdir), None
        _stop_if_asked(preemption, "the scale factor")
      results["ldm"] = train_ldm(config, workdir, first, pieces)
      _stop_if_asked(preemption, f"stage 2 saved step {results['ldm']['step']}")
  return results
