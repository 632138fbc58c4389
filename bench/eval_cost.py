"""What periodic evaluation (`config.stage2.eval`) costs beside the stage-2 update step
of the tiny txt2img default (random weights: the cost does not depend on them).

  python bench/eval_cost.py                                  # prompts, the default without weights
  python bench/eval_cost.py --metrics prompts,fid --inception_weights pt_inception.pth

Times, interleaved so that a busy machine slows both alike: the update step (batch
64 from the latent cache, as the default trains), the first evaluation (which also
compiles the sampler, loads the judges and, for fid, makes the held-out reference),
and later evaluations, each of a new step (so nothing stored is reused). Prints one
Markdown row, and what an `every` costs over the default's stage 2 in update steps.
"""
import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench folder is not a package)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--metrics", default="prompts", help="config.stage2.eval.metrics")
  p.add_argument("--inception_weights", default="", help="config.stage2.eval.inception_weights")
  p.add_argument("--repeats", type=int, default=2, help="(steps, evaluation) pairs timed")
  p.add_argument("--steps", type=int, default=20, help="update steps timed per pair")
  args = p.parse_args()
  import jax
  import numpy as np
  jax.config.update("jax_threefry_partitionable", True)
  from ldm_jax import config_lib, parallel
  from ldm_jax.data import shapes
  from ldm_jax.evaluation import periodic
  from ldm_jax.training.ldm import LDMTask

  out_dir = tempfile.mkdtemp(prefix="eval_cost_")
  c = common.txt2img_config("tiny").unlock()
  c.data.cache_dir = os.path.join(out_dir, "cache")
  c.stage2.eval.update(every=1, metrics=args.metrics, inception_weights=args.inception_weights)
  c = c.lock()
  periodic.check_config(c)
  c2 = config_lib.for_stage(c, "stage2")
  task, mesh, rules = LDMTask(c2), parallel.make_mesh(c2), parallel.rules_of(c2)
  state, sh = parallel.create_sharded(task.init, jax.random.key(0), mesh, rules)
  rng = np.random.default_rng(0)
  n, side = c2.batch_size, task.latent_hw
  host = {"latent": rng.standard_normal((n, side, side, task.unet.in_channels)).astype(np.float32),
          "caption": np.array([shapes.example(0, i, side)[1] for i in range(n)], object)}
  batch = parallel.global_batch(task.prepare_batch(host), mesh)
  update = jax.jit(task.update, in_shardings=(sh, parallel.batch_sharding(mesh), None),
                   out_shardings=(sh, None), donate_argnums=0)
  with parallel.activate(mesh, rules):
    update = update.lower(state, batch, jax.random.key(0)).compile()
  evaluate = periodic.Evaluator(task, c2, os.path.join(out_dir, "eval"))

  def steps(k):
    nonlocal state
    t = time.time()
    for i in range(k):
      state, _ = update(state, batch, jax.random.key(i))
    jax.block_until_ready(state)
    return (time.time() - t) / k

  def timed_eval():
    nonlocal state
    state = dict(state, step=jax.device_put(state["step"] + 1, sh["step"]))  # a new folder
    t = time.time()
    evaluate(state, mesh)
    return time.time() - t

  steps(3)
  first = timed_eval()
  pairs = [(steps(args.steps), timed_eval()) for _ in range(args.repeats)]
  step_s = float(np.median([s for s, _ in pairs]))
  eval_s = float(np.median([e for _, e in pairs]))
  print("| metrics | num | update step s | first evaluation s | later evaluation s |")
  print("|---|---|---|---|---|")
  print(f"| {args.metrics} | {c2.stage2.eval.num} | {step_s:.3f} | {first:.1f} | {eval_s:.1f} |")
  total = c2.total_steps
  for every in (250, 500, 1250, total):
    k = -(-total // every)
    cost = first + (k - 1) * eval_s
    print(f"every={every}: {k} evaluation(s), {cost / step_s:.0f} update steps, "
          f"{100 * cost / (total * step_s):.1f}% of stage 2's {total} steps")


if __name__ == "__main__":
  main()
