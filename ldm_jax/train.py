"""python -m ldm_jax.train --config=configs/txt2img.py[:arg] --workdir=DIR [--config.x=y]

Parses flags and calls `train_and_evaluate`; multi-host jobs pass --multihost
(Cloud TPU finds its peers itself; elsewhere give the coordinator by flags or the
LDM_COORDINATOR / LDM_NUM_PROCESSES / LDM_PROCESS_ID environment variables).
`--print_config` prints every field of the config with its value and comment.

Exit status: 0 when every stage finished; 75 (EX_TEMPFAIL, `run.EXIT_PREEMPTED`)
when SIGTERM stopped the job after saving: run the same command again to resume.
"""
import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

from ldm_jax import cli

config_flags.DEFINE_config_file("config", None, "A configs/*.py file, e.g. configs/txt2img.py:size=tiny",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints, logs and samples go (local path or gs://).")
flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() before anything else.")
flags.DEFINE_string("coordinator_address", os.environ.get("LDM_COORDINATOR"), "host:port of process 0.")
flags.DEFINE_integer("num_processes", int(os.environ.get("LDM_NUM_PROCESSES", "0")) or None,
                     "Processes in the job.")
flags.DEFINE_integer("process_id", int(os.environ["LDM_PROCESS_ID"]) if "LDM_PROCESS_ID" in os.environ
                     else None, "This process's index.")
flags.DEFINE_integer("cpu_devices", None,
                     "XLA devices on a CPU host (default: one per core, as many as every stage's "
                     "mesh and batch accept; 1 = a single device). Ignored when XLA_FLAGS sets "
                     "the host device count or the job is --multihost.")
flags.DEFINE_bool("print_config", False, "Print every field of the config (after overrides) with "
                  "its value and comment, then exit without training.")
FLAGS = flags.FLAGS


def _init_distributed():
  import jax
  kw = {}
  if FLAGS.coordinator_address:
    kw = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
              process_id=FLAGS.process_id)
  jax.distributed.initialize(**kw)


def _split_cpu(config) -> int | None:
  """Sets jax_num_cpu_devices before any backend starts (GPU/TPU hosts are unaffected:
  their devices are the accelerators). Returns the count set, or None."""
  import jax
  if FLAGS.multihost or "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    return None
  if FLAGS.cpu_devices is not None:
    if FLAGS.cpu_devices < 1:
      raise app.UsageError(f"--cpu_devices={FLAGS.cpu_devices}: must be at least 1")
    n = FLAGS.cpu_devices
  else:
    from ldm_jax import config_lib, parallel
    from ldm_jax.training.run import STAGE_CONFIG
    stages = [config_lib.for_stage(config, STAGE_CONFIG[s]) for s in config.stages
              if s in STAGE_CONFIG]
    n = parallel.cpu_device_count(stages, os.cpu_count() or 1)
  jax.config.update("jax_num_cpu_devices", n)
  return n


def main(argv):
  del argv
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/txt2img.py")
  if FLAGS.print_config:  # before anything starts a backend
    from ldm_jax import config_docs
    print(config_docs.describe(FLAGS.config, FLAGS["config"].config_filename))
    return
  from ldm_jax import config_lib
  config_lib.validate(FLAGS.config)  # every stage's settings, before devices or data
  workdir = FLAGS.workdir or os.path.join("runs", os.path.splitext(
      os.path.basename(FLAGS["config"].config_filename))[0])
  if FLAGS.multihost:
    _init_distributed()
  n_cpu = _split_cpu(FLAGS.config)  # before anything starts a backend
  from ldm_jax.console import setup_logging
  setup_logging()
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  log = logging.getLogger("ldm_jax")
  from ldm_jax import storage
  log.info("workdir: %s", storage.display(workdir))
  if n_cpu is not None and jax.default_backend() == "cpu":
    log.info("CPU host: %d device(s) on %d cores, the batch split over them (--cpu_devices)",
             n_cpu, os.cpu_count() or 1)
  from ldm_jax.training import run
  try:
    explicit = config_flags.get_override_values(FLAGS["config"])
    run.train_and_evaluate(FLAGS.config, workdir, explicit=tuple(explicit))
  except run.Preempted as e:
    log.warning("%s", e)
    sys.exit(run.EXIT_PREEMPTED)


if __name__ == "__main__":
  from ldm_jax.config_lib import resolve_config_argv
  cli.run(main, argv=resolve_config_argv(sys.argv))
