"""The shared training loop: mesh -> sharded state (new or restored) -> compiled
update step -> steps with logging, checkpoints, sample grids, periodic
evaluation, divergence and SIGTERM handling. A stage plugs in as a Task (`ldm_jax.training.step`).

No diverged state becomes a checkpoint. Step N's metrics are checked while step
N+1 runs, so the host never waits on the device, except before a save or an
evaluation: then they are checked first, and the state itself is checked to be
finite (a program of its own, so the update step compiles no check). The metrics
hold the loss of the state before step N. A state's own loss is known one step
after it is saved, so a checkpoint whose next loss is non-finite or divergent
is removed: the latest checkpoint is always one whose loss was seen good.
"""
import logging
import math
import signal
import time
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from clu import parameter_overview
from jax.experimental import multihost_utils

from ldm_jax import checkpoint, config_lib, parallel, storage
from ldm_jax.training import images as image_io
from ldm_jax.training.step import DataIterator, Evaluator, Task

log = logging.getLogger("ldm_jax")


class Diverged(FloatingPointError):
  """The loss or the state became non-finite, or the loss diverged; the message
  names the checkpoint to restart from."""


def all_finite(tree) -> jax.Array:
  """True when every floating-point leaf of `tree` is free of NaN and Inf."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves])) if leaves else jnp.array(True)


def state_finite(state: dict) -> jax.Array:
  """True when the leaves an update writes from gradients (`params`, and a
  discriminator's `disc_params`) are free of NaN and Inf. The rest follow them: the
  EMA averages finite parameters, frozen parts never change, and a non-finite
  gradient reaches the parameters through the optimizer in the same step (and the
  next step's loss)."""
  return all_finite({k: v for k, v in state.items() if k.endswith("params")})


_is_finite = jax.jit(state_finite)  # one program for the resume, save and eval checks


class _DivergenceGuard:
  """Running means of the loss and of |loss| over ~50 steps; a loss above the first
  by more than `factor` times the second is divergent. Scaled by |loss|, not by the
  loss, because a stage-1 NLL with a learned variance falls through zero."""

  DECAY = 0.98

  def __init__(self, factor: float, state: Optional[dict] = None):
    self.factor = factor
    self.mean = self.scale = None
    if state:
      self.mean, self.scale = state["loss_mean"], state["loss_scale"]

  def check(self, loss: Optional[float]) -> Optional[str]:
    """What is divergent about `loss` (None: nothing, and it joins the means)."""
    if loss is None or not self.factor:
      return None
    if self.mean is None:
      self.mean, self.scale = loss, abs(loss)
      return None
    if self.scale > 0 and loss - self.mean > self.factor * self.scale:
      return (f"loss {loss:.4g} exceeds its running mean {self.mean:.4g} by "
              f"{(loss - self.mean) / self.scale:.3g} x its running |loss| {self.scale:.4g} "
              f"(config.divergence_factor={self.factor:g})")
    self.mean = self.DECAY * self.mean + (1 - self.DECAY) * loss
    self.scale = self.DECAY * self.scale + (1 - self.DECAY) * abs(loss)
    return None

  def state(self) -> Optional[dict]:
    return None if self.mean is None else {"loss_mean": self.mean, "loss_scale": self.scale}


def _non_finite_checkpoint(ckpt, abstract, step: int) -> str:
  """The error for a restored `step` whose state is not finite, naming the last finite one."""
  for s in reversed([s for s in ckpt.all_steps() if s < step]):
    if bool(_is_finite(ckpt.restore(abstract, step=s)[0])):
      newer = [t for t in ckpt.all_steps() if t > s]
      return (f"the checkpoint of step {step} in {ckpt.directory} holds NaN or Inf; the last "
              f"finite one is step {s}: remove the step folder(s) {newer} to resume from it")
  return (f"the checkpoint of step {step} in {ckpt.directory} holds NaN or Inf and no earlier "
          "one is finite: remove the folder to start over")


class Preemption:
  """Turns SIGTERM into a flag the loop polls, so it can save and exit cleanly.

  The flag is the process's: the contexts nest (a job holds one around all its
  stages, each stage's loop its own inside), the outermost installs the handler
  and clears the flag, so a signal that arrives between two stages is not lost.
  """
  requested = False
  _depth = 0
  _old = None

  def __enter__(self):
    cls = type(self)
    if cls._depth == 0:
      cls.requested = False
      try:
        cls._old = signal.signal(signal.SIGTERM, cls._handle)
      except ValueError:  # not the main thread: no handler
        cls._old = None
    cls._depth += 1
    return self

  @classmethod
  def _handle(cls, signum, frame):
    del signum, frame
    cls.requested = True

  def agreed(self) -> bool:
    """True when any process was asked to stop (all processes must agree)."""
    if jax.process_count() == 1:
      return self.requested
    flags = multihost_utils.process_allgather(np.array([self.requested], np.int32))
    return bool(np.any(flags))

  def __exit__(self, *exc):
    cls = type(self)
    cls._depth -= 1
    if cls._depth == 0 and cls._old is not None:
      signal.signal(signal.SIGTERM, cls._old)
      cls._old = None


def _fmt_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"


def _memory_report(compiled) -> str:
  try:
    m = compiled.memory_analysis()
    total = (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes -
             m.alias_size_in_bytes)
    return (f"args {m.argument_size_in_bytes / 2**20:.1f} MiB, temp {m.temp_size_in_bytes / 2**20:.1f}"
            f" MiB, total {total / 2**20:.1f} MiB per device")
  except Exception:  # memory_analysis is not available on every backend
    return "n/a"


def run(task: Task, config, workdir: str, make_data: Callable[..., DataIterator], *,
        sample_batch: Optional[dict] = None, devices=None,
        initial_values: Optional[Callable] = None,
        initial_state: Optional[Callable] = None,
        evaluator: Optional[Evaluator] = None) -> dict:
  """Trains `task` for `config.total_steps` steps, resuming from `workdir`.

  Args:
    task: the stage (`ldm_jax.training.step.Task`).
    config: the stage's config (spine fields + the stage's own).
    workdir: where checkpoints, event files and sample grids go (local or URL).
    make_data: (data_state or None, per_process_batch) -> DataIterator.
    sample_batch: host-local batch for the periodic sample grids (None: none).
    devices: the devices of the mesh (default: all).
    initial_values: (state, shardings) -> state, applied to a fresh (not restored)
      state; how stage 2 puts the trained first stage into its state.
    initial_state: (abstract state, shardings) -> state: a fresh state made
      without a random init (nothing compiled for it), in place of
      `initial_values`; how a fine-tune starts from pretrained weights.
    evaluator: called every `evaluator.every` steps and after the last (None or
      every = 0: never); its scalars go to the log and to TensorBoard as eval/*.

  Returns:
    dict(state=final train state, step=..., logged=[(step, mean metrics)], compile_s=..., steps_per_s=...,
    preempted=bool, mesh=..., shardings=..., evals=[(step, evaluator scalars)]).
  """
  is_main = jax.process_index() == 0
  storage.check_writable(workdir)
  mesh = parallel.make_mesh(config, devices)
  rules = parallel.rules_of(config)
  per_process = parallel.check_batch(config.batch_size, mesh, config.grad_accum)
  init_rng, step_rng, sample_rng = jax.random.split(jax.random.key(config.seed), 3)
  ckpt = checkpoint.Checkpointer(storage.join(workdir, "checkpoints"), keep=config.keep_ckpts)
  cfg_dict = config_lib.to_dict(config)

  data_state = loop_state = None
  if ckpt.latest_step() is not None:
    abstract, shardings = parallel.abstract_state(task.init, init_rng, mesh, rules)
    state, data_state, start = ckpt.restore(abstract, cfg_dict)
    if not bool(_is_finite(state)):
      message = _non_finite_checkpoint(ckpt, abstract, start)
      ckpt.close()
      raise Diverged(message)
    loop_state = ckpt.loop_state(start)
    log.info("resumed from %s at step %d", ckpt.directory, start)
  elif initial_state is not None:
    abstract, shardings = parallel.abstract_state(task.init, init_rng, mesh, rules)
    state, start = initial_state(abstract, shardings), 0
  else:
    state, shardings = parallel.create_sharded(task.init, init_rng, mesh, rules)
    start = 0
    if initial_values is not None:
      state = initial_values(state, shardings)
  if start >= config.total_steps:
    ckpt.close()
    return dict(state=state, step=start, logged=[], compile_s=0.0, steps_per_s=float("nan"),
                preempted=False, mesh=mesh, shardings=shardings, evals=[])
  if is_main:
    log.info("mesh %s, %d processes, batch %d (%d per process)", dict(mesh.shape),
             jax.process_count(), config.batch_size, per_process)
    n_params = parameter_overview.count_parameters(state["params"])
    log.info("trainable parameters: %s (the table is at debug level)", f"{int(n_params):,}")
    log.debug("parameters:\n%s", parameter_overview.get_parameter_overview(
        state["params"], include_stats=False))
  it = make_data(data_state, per_process)

  batch_sh = parallel.batch_sharding(mesh)

  def update(state, batch, rng):
    state, metrics = task.update(state, batch, jax.random.fold_in(rng, state["step"]))
    return state, metrics

  update = jax.jit(update, in_shardings=(shardings, batch_sh, None),
                   out_shardings=(shardings, None), donate_argnums=0)
  batch = parallel.global_batch(task.prepare_batch(next(it)), mesh)
  t0 = time.time()
  with parallel.activate(mesh, rules):
    compiled = update.lower(state, batch, step_rng).compile()
  compile_s = time.time() - t0
  if is_main:
    log.info("compiled the update step in %.1f s; memory: %s", compile_s, _memory_report(compiled))

  sample_fn = sample_global = metrics_fn = None
  if sample_batch is not None:
    sample_fn = jax.jit(task.sample)
    sample_global = parallel.global_batch(task.prepare_batch(sample_batch), mesh)
    metrics_fn = jax.jit(task.sample_metrics)
  writer = storage.summary_writer(storage.join(workdir, "tensorboard")) if is_main else None

  def write_scalars(step, values):
    for k, v in values.items():
      writer.add_scalar(k, v, step)

  def save_samples(step):
    if sample_fn is None:
      return
    with parallel.activate(mesh, rules):
      images = sample_fn(state, sample_global, sample_rng)
      metrics = metrics_fn(sample_global, images)
    metrics = {f"sample/{k}": float(v) for k, v in jax.device_get(metrics).items()}
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True))
    if is_main:
      if metrics:
        log.info("step %d samples | %s", step, " ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        write_scalars(step, metrics)
      grid = image_io.grid(images)
      image_io.save_png(grid, storage.join(workdir, "samples", f"step_{step:07d}.png"))
      writer.add_image("samples", grid, step, dataformats="HWC")

  evals = []
  eval_every = evaluator.every if evaluator is not None else 0

  def evaluate(step) -> float:
    """Runs the evaluator on the state after `step`; returns the seconds it took."""
    t = time.time()
    scalars = evaluator(state, mesh)
    evals.append((step, scalars))
    if is_main:
      log.info("step %d eval | %s", step, " ".join(f"{k} {v:.4g}" for k, v in scalars.items()))
      write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
    return time.time() - t

  guard = _DivergenceGuard(config.divergence_factor, loop_state)

  def discard_from(first: int) -> str:
    """Removes the checkpoints of steps >= `first` (states found bad after they were
    saved); says where to restart."""
    gone = [s for s in ckpt.all_steps() if s >= first]
    for s in gone:
      ckpt.delete(s)
    latest = ckpt.latest_step()
    removed = f"removed the checkpoint of step {gone[0]}, the state that gave it; " if gone else ""
    if latest is None:
      return removed + f"no checkpoint in {ckpt.directory} holds a good state: restart from scratch"
    return removed + f"restart from step {latest}, the latest checkpoint in {ckpt.directory}"

  def check(metrics, step):
    """Step `step`'s metrics, from the state before it; raises Diverged naming the
    checkpoint to restart from."""
    m = {k: float(v) for k, v in jax.device_get(metrics).items()}
    bad = {k: v for k, v in m.items() if not math.isfinite(v)}
    problem = f"non-finite metrics {bad}" if bad else guard.check(m.get("loss"))
    if problem:
      raise Diverged(f"{problem} at step {step}; {discard_from(step - 1)}")
    return m

  def check_state(state, step):
    """Raises Diverged when the state after `step` is not finite."""
    if not bool(_is_finite(state)):
      raise Diverged(f"the update of step {step} made the state non-finite (NaN or Inf); "
                     f"{discard_from(step)}")

  step, history, pending, logged = start, [], None, []
  t_last, step_last = time.time(), start
  steps_per_s = float("nan")
  preempted = False
  try:
    with Preemption() as preemption:
      while step < config.total_steps:
        state, metrics = compiled(state, batch, step_rng)
        step += 1
        if pending is not None:  # check the previous step while this one runs
          history.append(check(*pending))
        pending = (metrics, step)
        is_log = step % config.log_every == 0 or step == config.total_steps
        is_ckpt = step % config.ckpt_every == 0
        if is_log or is_ckpt:
          history.append(check(*pending))
          pending = None
        if is_log:
          now = time.time()
          steps_per_s = (step - step_last) / max(now - t_last, 1e-9)
          t_last, step_last = now, step
          means = {k: float(np.mean([h[k] for h in history])) for k in history[-1]}
          logged.append((step, means))
          history = []
          stats = {f"data/{k}": float(v) for k, v in it.stats().items()}
          if is_main:
            log.info("step %d/%d | %s | %.2f steps/s | %.1f ex/s | ETA %s", step, config.total_steps,
                     " ".join(f"{k} {v:.4g}" for k, v in means.items()), steps_per_s,
                     steps_per_s * config.batch_size,
                     _fmt_eta((config.total_steps - step) / max(steps_per_s, 1e-9)))
            write_scalars(step, {**{f"train/{k}": v for k, v in means.items()}, **stats,
                                  "perf/steps_per_s": steps_per_s,
                                  "perf/examples_per_s": steps_per_s * config.batch_size})
        if config.sample_every and step % config.sample_every == 0:
          save_samples(step)
        stop = (is_log or is_ckpt) and preemption.agreed() if jax.process_count() > 1 else preemption.requested
        if is_ckpt or stop:
          if pending is not None:
            history.append(check(*pending))
            pending = None
          check_state(state, step)
          ckpt.save(step, state, it.get_state(), cfg_dict, loop_state=guard.state())
        if eval_every and step % eval_every == 0 and not stop:  # after the (async) save
          if pending is not None:  # a diverged state stops the run, not the metrics
            history.append(check(*pending))
            pending = None
          check_state(state, step)
          t_last += evaluate(step)  # steps/s counts training only
        if stop:
          log.warning("SIGTERM: saved step %d, exiting", step)
          preempted = True
          break
        if step < config.total_steps:
          batch = parallel.global_batch(task.prepare_batch(next(it)), mesh)
    if pending is not None:
      check(*pending)
    if not preempted:
      if ckpt.latest_step() != step:
        check_state(state, step)
        ckpt.save(step, state, it.get_state(), cfg_dict, force=True, loop_state=guard.state())
      if not (config.sample_every and step % config.sample_every == 0):  # not just written
        save_samples(step)
      if eval_every and step % eval_every:  # the final state, unless just measured
        evaluate(step)
  finally:  # a save in flight holds a good state: let it finish
    ckpt.close()
    if writer is not None:
      writer.close()
  return dict(state=state, step=step, logged=logged, compile_s=compile_s, steps_per_s=steps_per_s,
              preempted=preempted, mesh=mesh, shardings=shardings, evals=evals)
