"""The one Orbax CheckpointManager wrapper: train state + data-iterator states + config.

A checkpoint step holds three items:
  state  -- the sharded train state (restored onto whatever mesh the caller's
            abstract state names, so a job can come back on another slice);
  data   -- every process's data-iterator state (a JSON list, index = process),
            and the training loop's own small state (its running loss statistics);
  config -- the run's config as JSON, checked against the resuming config.
Orbax writes a step into a temporary directory and renames it when complete, so
`latest_step()` never names a step whose save was interrupted.
"""
import json
import logging

import flax
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from ldm_jax import storage

# Fields that may change between a run and its resumption without changing
# what the checkpoint holds.
_RUNTIME_FIELDS = ("total_steps", "log_every", "ckpt_every", "keep_ckpts", "sample_every",
                   "num_samples", "mesh", "dcn_mesh", "sharding_rules", "batch_size",
                   "grad_accum", "remat", "data", "eval", "lr", "warmup_steps",
                   "divergence_factor")


# Orbax splits the writing of a replicated array over its replicas with one
# jitted slice per (shape, replica): on a model's ~1000 small arrays that costs
# far more compiling than it saves writing (24 s of a 25 s save of the tiny
# txt2img state on 8 devices). Arrays under 4 MiB per replica are written whole
# by one replica; big ones (a pod's real weights) are still split.
_MIN_REPLICA_SLICE_BYTES = 4 << 20

def _register_array_handler():
  from absl import logging as absl_logging
  verbosity = absl_logging.get_verbosity()
  absl_logging.set_verbosity(absl_logging.ERROR)  # the override is meant: no warning
  try:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(
            min_slice_bytes_for_replica_parallel=_MIN_REPLICA_SLICE_BYTES), override=True)
  finally:
    absl_logging.set_verbosity(verbosity)


_register_array_handler()


def _allgather_json(obj) -> list:
  """Every process's JSON-able `obj`, in process order, on every process."""
  if jax.process_count() == 1:
    return [obj]
  data = json.dumps(obj).encode()
  n = int(np.max(multihost_utils.process_allgather(np.array([len(data)], np.int32))))
  buf = np.zeros((n,), np.uint8)
  buf[:len(data)] = np.frombuffer(data, np.uint8)
  gathered = multihost_utils.process_allgather(np.concatenate([[len(data)], buf]).astype(np.int32))
  gathered = np.asarray(gathered).reshape(jax.process_count(), -1)
  return [json.loads(bytes(row[1:1 + row[0]].astype(np.uint8)).decode()) for row in gathered]


def config_differences(saved: dict, current: dict) -> list[str]:
  """Dotted names of fields that differ and would change what the state holds.

  Not compared: runtime fields, the sampler's settings (a `sample` section), and a
  field the checkpoint predates (absent there) that the config leaves off (0, False,
  empty), as each option is added.
  """
  flat_s = flax.traverse_util.flatten_dict(saved, sep=".")
  flat_c = flax.traverse_util.flatten_dict(current, sep=".")
  diffs = []
  for key in sorted(set(flat_s) | set(flat_c)):
    parts = key.split(".")
    if parts[0] in _RUNTIME_FIELDS or parts[-1] in _RUNTIME_FIELDS or "sample" in parts[:-1]:
      continue
    if parts[0] not in current:  # a section this stage does not use (stage 1: stage2)
      continue
    if key not in flat_s and not flat_c[key]:
      continue
    a, b = flat_s.get(key, "<absent>"), flat_c.get(key, "<absent>")
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
      diffs.append(f"{key}: checkpoint {a!r} vs config {b!r}")
  return diffs


class Checkpointer:
  """Async, keep-the-last-K checkpoints of one training stage under `directory`."""

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = storage.orbax_path(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=("state", "data", "config"))

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def _step(self, step: int | None) -> int:
    """`step`, or the latest for None; a ValueError naming the saved steps when it is absent."""
    if step is None:
      return self._mngr.latest_step()
    if step not in self._mngr.all_steps():
      raise ValueError(f"no checkpoint of step {step} in {self.directory}; saved steps: "
                       f"{self.all_steps()}")
    return step

  def save(self, step: int, state, data_state, config_dict: dict, *, force: bool = False,
           loop_state: dict | None = None) -> None:
    """Starts an async save. `data_state` is this process's iterator state;
    `loop_state` the training loop's (JSON, the same on every process)."""
    data_states = _allgather_json(data_state)
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"processes": data_states, "loop": loop_state}),
        config=ocp.args.JsonSave(config_dict)), force=force)

  def delete(self, step: int) -> None:
    """Removes `step` (after any save in flight), e.g. a state found diverged after it was saved."""
    self._mngr.wait_until_finished()
    self._mngr.delete(step)

  def loop_state(self, step: int | None = None) -> dict | None:
    """The `loop_state` saved with `step` (default: the latest); None when none was."""
    step = self._step(step)
    data = self._mngr.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
    return (data or {}).get("loop")

  def restore(self, abstract_state, config_dict: dict | None = None, step: int | None = None):
    """Restores `step` (default: latest) onto the shardings in `abstract_state`.

    Returns:
      (state, data_state of this process or None, step).
    Raises:
      ValueError naming the config fields that differ when the checkpoint does
      not fit the current config, or the saved steps when `step` is not one.
    """
    step = self._step(step)
    meta = self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    saved_config = meta.config
    if config_dict is not None and saved_config is not None:
      diffs = config_differences(saved_config, config_dict)
      if diffs:
        raise ValueError(f"the checkpoint in {self.directory} (step {step}) came from an "
                         "incompatible config: " + "; ".join(diffs[:10]))
    try:
      out = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"the checkpoint in {self.directory} (step {step}) does not fit the "
                       f"model of the current config: {e}") from e
    procs = (out.data or {}).get("processes", [])
    data_state = None
    if len(procs) == jax.process_count():
      data_state = procs[jax.process_index()]
    elif procs:
      logging.warning("checkpoint has data states of %d processes, this job has %d: the data "
                      "stream restarts at a fresh position", len(procs), jax.process_count())
    return out.state, data_state, step

  def saved_config(self, step: int | None = None) -> dict:
    step = self._step(step)
    return self._mngr.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
