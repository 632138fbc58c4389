"""The kill -9 drill: a short training run, killed with SIGKILL at random points and
resumed each time, must end bit-identical to the same run left alone.

  python bench/drill.py [--kills 3] [--steps 40] [--ckpt_every 4] [--seed 0]
                        [--workdir DIR] [-- more --config.x=y overrides]

Each run is the real entry point, `python -m ldm_jax.train`, on configs/autoencoder_kl.py
shrunk (batch 8, 8 base channels, 64 images in 4 shards). A kill lands a random
fraction of a step after a random logged step, so kills fall inside steps, inside the
async checkpoint writes and between them. The runs share one persistent compilation
cache, so the program compiles once. The final states are compared leaf by leaf.
Exit status 1 when any leaf differs.
"""
import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_STEP = re.compile(r"step (\d+)/(\d+)")


def run_once(cmd: list, env: dict, rng=None) -> tuple:
  """Runs `cmd` (a training command that logs 'step N/M' on stdout) to its end or,
  given `rng`, kills it with SIGKILL at a random step before the last, a random
  fraction of a step after that step's line.

  Returns:
    (the step logged last, whether it was killed, the output).
  """
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  target = last = None
  t_last, step_s, lines = None, 0.5, []
  for line in proc.stdout:
    lines.append(line)
    m = _STEP.search(line)
    if m is None:
      continue
    last, total = int(m.group(1)), int(m.group(2))
    now = time.time()
    if t_last is not None:
      step_s = now - t_last
    t_last = now
    if rng is not None and target is None and last < total:
      target = int(rng.integers(last, total))
    if target is not None and last >= target:
      time.sleep(rng.uniform(0, step_s))
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return last, True, "".join(lines)
  proc.wait()
  if proc.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{''.join(lines)[-3000:]}")
  return last, False, "".join(lines)


def killed_run(cmd: list, env: dict, kills: int, rng) -> list:
  """Runs `cmd` again after each of `kills` random SIGKILLs, then to its end; returns
  the step logged last before each kill (a run that ends before its kill counts none)."""
  landed = []
  while len(landed) < kills:
    last, was_killed, _ = run_once(cmd, env, rng)
    if not was_killed:
      return landed
    landed.append(last)
  run_once(cmd, env)
  return landed


def final_state(ckpt_dir: str) -> tuple:
  """(step, {leaf path: numpy array}) of the latest checkpoint in `ckpt_dir`, read as
  host arrays whatever devices wrote it."""
  import jax
  import orbax.checkpoint as ocp
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.ERROR)  # read-only: no notes on absent metadata
  step = max(int(d) for d in os.listdir(ckpt_dir) if d.isdigit())
  path = os.path.join(ckpt_dir, str(step), "state")
  ck = ocp.StandardCheckpointer()
  tree = ck.metadata(path).item_metadata
  is_array = lambda x: hasattr(x, "shape")
  target = jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), tree, is_leaf=is_array)
  state = ck.restore(path, target)
  ck.close()
  return step, {jax.tree_util.keystr(k): np.asarray(v)
                for k, v in jax.tree_util.tree_flatten_with_path(state)[0]}


def compare(a: dict, b: dict) -> dict:
  """Leaves of two states: count, how many are bit-identical, the largest |a - b|."""
  assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
  equal = sum(np.array_equal(a[k], b[k]) for k in a)
  diff = max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64))))
             if a[k].size else 0.0 for k in a)
  return dict(leaves=len(a), equal=equal, max_abs_diff=diff)


def train_command(workdir: str, args) -> list:
  return [sys.executable, "-m", "ldm_jax.train", "--config=configs/autoencoder_kl.py",
          f"--workdir={workdir}", "--config.batch_size=8", "--config.stage1.model.ch=8",
          f"--config.total_steps={args.steps}", f"--config.ckpt_every={args.ckpt_every}",
          "--config.log_every=1", "--config.sample_every=0", "--config.num_samples=8",
          "--config.data.shapes.num=64", "--config.data.shapes.shard_size=16",
          f"--config.data.cache_dir={os.path.join(args.workdir, 'data')}"] + args.overrides


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--kills", type=int, default=3, help="SIGKILLs, each followed by a resume")
  p.add_argument("--steps", type=int, default=40, help="steps of the run")
  p.add_argument("--ckpt_every", type=int, default=4)
  p.add_argument("--seed", type=int, default=0, help="seed of the kill points")
  p.add_argument("--workdir", default=None, help="default: a temporary folder")
  p.add_argument("overrides", nargs="*", help="more train flags, after --")
  args = p.parse_args()
  args.workdir = args.workdir or tempfile.mkdtemp(prefix="ldm_drill_")
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
             JAX_COMPILATION_CACHE_DIR=os.path.join(args.workdir, "jit"))
  t0 = time.time()
  alone = os.path.join(args.workdir, "alone")
  run_once(train_command(alone, args), env)
  t1 = time.time()
  killed = os.path.join(args.workdir, "killed")
  landed = killed_run(train_command(killed, args), env, args.kills, np.random.default_rng(args.seed))
  t2 = time.time()
  (sa, a), (sb, b) = (final_state(os.path.join(w, "autoencoder", "checkpoints"))
                      for w in (alone, killed))
  r = compare(a, b)
  print(f"workdir {args.workdir}; uninterrupted run {t1 - t0:.0f} s; killed after steps "
        f"{landed} and resumed {len(landed)} times, {t2 - t1:.0f} s in all")
  print("| final step (alone / killed) | leaves | bit-identical | max abs diff |\n|---|---|---|---|")
  print(f"| {sa} / {sb} | {r['leaves']} | {r['equal']} | {r['max_abs_diff']:.3g} |")
  sys.exit(0 if sa == sb and r["equal"] == r["leaves"] else 1)


if __name__ == "__main__":
  main()
