"""Test setup, before jax is imported anywhere: 8 CPU devices, XLA's backend
optimisations off and its older (LLVM IR) fusion emitters -- tests run a few steps
of many models, so compiling, not running, is what they spend their time on (the
first halves it; the second compiles the tiny update step in 0.8x the time and runs
it at 0.76x the speed, bench/levers.py's `legacy_emitters`)."""
import logging
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_cpu_use_fusion_emitters=false").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the run, shared by its workers (they inherit
# the variable) and the processes the tests start: many tests compile the same
# programs. The process that made it removes it at the end.
_OWN_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _OWN_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="ldm_jax_xla_")

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)

# The longest files first, so that with `-n 2 --dist loadfile` the workers start on
# them and the short files fill in at the end, instead of one long file running
# alone last.
LONGEST_FIRST = ("test_learning.py", "test_pretrained_export.py", "test_ldm.py",
                 "test_entrypoints.py", "test_preemption.py", "test_periodic_eval.py",
                 "test_latent_cache.py", "test_tasks.py", "test_sampling.py", "test_evaluate.py")


@pytest.fixture(autouse=True)
def _ldm_jax_logger_propagates():
  """Entry points run in-process (some from module-scoped fixtures) set up console
  logging: their own handler, no propagation to the root. Each test starts with that
  undone, so that its caplog, which listens at the root, sees ldm_jax's records."""
  log = logging.getLogger("ldm_jax")
  log.handlers.clear()
  log.setLevel(logging.NOTSET)
  log.propagate = True
  yield


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # xdist would put the most tests first
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
