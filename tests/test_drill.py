"""The kill -9 drill (bench/drill.py) on the toy task: killed with SIGKILL at random
points and resumed, a run ends bit-identical to the same run left alone."""
import os
import sys

import numpy as np

from bench import drill

# A toy run whose steps take ~50 ms (the data sleeps), so kills land inside steps
# and inside checkpoint writes (every 2 steps, async).
WORKER = """
import sys, time
from ldm_jax.console import setup_logging
setup_logging()
import jax
from ldm_jax.training import loop
from tests import toy
class Slow(toy.ArrayIterator):
  def __next__(self):
    time.sleep(0.05)
    return super().__next__()
c = toy.toy_config(total_steps=30, ckpt_every=2, log_every=1, keep_ckpts=2)
loop.run(toy.ToyTask(c), c, sys.argv[1], lambda st, n: Slow(c.batch_size, state=st),
         devices=jax.devices()[:1])
"""


def test_killed_and_resumed_run_is_bit_identical(tmp_path):
  env = dict(os.environ, PYTHONPATH=drill.ROOT)
  cmd = lambda name: [sys.executable, "-c", WORKER, str(tmp_path / name)]
  drill.run_once(cmd("alone"), env)
  landed = drill.killed_run(cmd("killed"), env, kills=3, rng=np.random.default_rng(0))
  assert len(landed) == 3, landed
  (sa, a), (sb, b) = (drill.final_state(str(tmp_path / n / "checkpoints")) for n in ("alone", "killed"))
  r = drill.compare(a, b)
  assert sa == sb == 30 and r["equal"] == r["leaves"] > 0, r
