"""A diverged state never becomes the latest checkpoint: a non-finite state is not
saved, a checkpoint whose next loss diverges is removed, the guard's running means
survive a restart, and a resume refuses a non-finite checkpoint."""
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import checkpoint, parallel
from ldm_jax.training import loop
from tests import toy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(workdir, **kw):
  config = toy.toy_config(ckpt_every=1, **kw)
  return loop.run(toy.ToyTask(config), config, str(workdir), toy.make_data(config),
                  devices=jax.devices()[:1])


def _steps(workdir):
  ck = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"))
  steps = ck.all_steps()
  ck.close()
  return steps


def _params(out):
  return jax.tree.map(np.asarray, jax.device_get(out["state"]["params"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A 3-step run (checkpoints 1, 2, 3) and the parameters of the same run left alone to 5."""
  base = tmp_path_factory.mktemp("base")
  _train(base / "w", total_steps=3)
  return base / "w", _params(_train(base / "alone", total_steps=5))


def _copy(runs, tmp_path):
  """A workdir holding the 3-step run."""
  shutil.copytree(runs[0], tmp_path / "w")
  return tmp_path / "w"


@pytest.mark.parametrize("lr,match", [
    (10.0, "exceeds its running mean"),     # finite: the guard
    (1e9, "non-finite metrics"),          # the loss of a finite state overflows
    (1e39, "made the state non-finite"),  # the update overflows: never saved
])
def test_diverged_states_are_not_left_as_latest(tmp_path, runs, lr, match):
  wd = _copy(runs, tmp_path)
  with pytest.raises(loop.Diverged, match=match) as e:
    _train(wd, total_steps=8, lr=lr)
  # Step 4's state was saved before step 5 showed its loss; it is removed again.
  removed = lr < 1e39
  assert ("removed the checkpoint of step 4" in str(e.value)) == removed
  assert "restart from step 3" in str(e.value)
  assert _steps(wd) == [1, 2, 3]
  resumed = _train(wd, total_steps=5)  # from step 3, as if it never happened
  jax.tree.map(np.testing.assert_array_equal, _params(resumed), runs[1])


def test_running_means_survive_a_restart(tmp_path, runs):
  """Killed between saving a divergent state and seeing its loss: the resumed run
  compares that loss with the means saved beside it. divergence_factor=0 turns it off."""
  wd = _copy(runs, tmp_path)
  _train(wd, total_steps=4, lr=10.0)  # ends on a saved, unseen, divergent state
  shutil.copytree(wd, tmp_path / "off")
  with pytest.raises(loop.Diverged, match="at step 5; removed the checkpoint of step 4"):
    _train(wd, total_steps=6)
  assert _steps(wd) == [1, 2, 3]
  out = _train(tmp_path / "off", total_steps=6, divergence_factor=0.0)
  assert out["step"] == 6 and out["logged"][0][1]["loss"] > 100


def test_resume_refuses_a_non_finite_checkpoint(tmp_path, runs):
  wd = _copy(runs, tmp_path)
  config = toy.toy_config()
  task = toy.ToyTask(config)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  abstract, _ = parallel.abstract_state(task.init, jax.random.key(0), mesh, parallel.rules_of(config))
  ck = checkpoint.Checkpointer(str(wd / "checkpoints"))
  state, data, _ = ck.restore(abstract)
  for step in (4, 5):  # as an older version of the loop could leave them
    poisoned = dict(state, params=jax.tree.map(lambda x: x * np.nan, state["params"]))
    ck.save(step, poisoned, data, ck.saved_config())
  ck.close()
  with pytest.raises(loop.Diverged, match=r"step 5 .* NaN or Inf; the last finite one is step 3: "
                                          r"remove the step folder\(s\) \[4, 5\]"):
    _train(wd, total_steps=8)


def test_guard_follows_a_loss_through_zero():
  """A stage-1 NLL with a learned variance falls from + to - thousands; batch noise
  on it does not trip the guard, a jump does, and a tripping loss is not averaged in."""
  rng = np.random.default_rng(0)
  guard = loop._DivergenceGuard(10.0)
  for i in range(400):
    loss = 15000 * np.exp(-i / 50) - 8000 + 300 * rng.standard_normal()
    assert guard.check(float(loss)) is None, i
  mean = guard.mean
  assert "exceeds its running mean" in guard.check(mean + 11 * guard.scale)
  assert guard.mean == mean
  assert guard.check(mean + 9 * guard.scale) is None
  assert loop._DivergenceGuard(0.0).check(1e30) is None


def test_stage1_lr_1e39_saves_no_checkpoint(tmp_path):
  """The real entry point on a shrunk stage-1 config with ckpt_every=1: the first
  update overflows the weights and nothing is saved (it used to save step 1, and a
  resume started from it); one line says so, exit code 2. (Restarting from a kept
  checkpoint is the same loop code, tested on the toy task above.)"""
  wd = tmp_path / "run"
  out = subprocess.run(
      [sys.executable, "-m", "ldm_jax.train", "--config=configs/autoencoder_kl.py",
       f"--workdir={wd}", "--config.batch_size=8", "--config.stage1.model.ch=8",
       "--config.stage1.lr=1e39", "--config.total_steps=3", "--config.ckpt_every=1",
       "--config.log_every=1", "--config.num_samples=8", "--config.data.shapes.num=16",
       "--config.data.shapes.shard_size=16", f"--config.data.cache_dir={tmp_path}/cache"],
      cwd=ROOT, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
  last = out.stderr.strip().splitlines()[-1]
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
  assert last.startswith("ldm_jax.train: error: the update of step 1 made the state non-finite")
  assert "no checkpoint" in last and "restart from scratch" in last
  assert not os.listdir(wd / "autoencoder" / "checkpoints")
