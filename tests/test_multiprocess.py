"""A real 2-process job (2 CPU devices each) ends where a 1-process 4-device run does."""
import os
import subprocess
import sys

import jax
import numpy as np

from ldm_jax.training import loop
from tests import ports, toy


def test_two_processes_match_one(tmp_path):
  port = ports.free_port()
  worker = os.path.join(os.path.dirname(__file__), "two_process_worker.py")
  out = tmp_path / "params.npz"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(tmp_path / "job"),
                             str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)

  config = toy.toy_config(mesh=[("data", 4), ("fsdp", 1), ("tensor", 1)])
  ref = loop.run(toy.ToyTask(config), config, str(tmp_path / "single"), toy.make_data(config),
                 devices=jax.devices()[:4])
  got = np.load(out)
  np.testing.assert_allclose(got["losses"], [m["loss"] for _, m in ref["logged"]], rtol=2e-5)
  flat = jax.tree_util.tree_flatten_with_path(ref["state"]["params"])[0]
  for k, v in flat:
    np.testing.assert_allclose(got[jax.tree_util.keystr(k)], np.asarray(v), rtol=1e-4, atol=1e-6)
