"""Sampling speed of the tiny txt2img model (random weights: speed does not depend on them).

  python bench/sample.py                           # defaults: 20 steps, batches 1, 8, 32
  python bench/sample.py --steps 50 --batches 1,8,32,64 --samplers ddim
  python bench/sample.py --devices 8               # 8 fake CPU devices (same cores)

Two tables:
1. The lax.scan loop's cost per step: `LDMTask.sample` (DDIM, classifier-free guidance,
   so the UNet runs on 2B inside) for 50 and for 10 steps; (t50 - t10) / 40 is the time
   of one step with the fixed costs (tau(y), first-stage decode) cancelled. Beside it
   one jitted UNet forward at batch 2B: the difference is the loop's overhead per step
   (guidance arithmetic, the sampler update, the scan itself). The compile time of the
   whole jitted sampler for 10 and 50 steps should be about the same: the UNet is
   traced once inside the scan.
2. Images/s end to end (tau(y), the sampler loop, the first-stage decode) per sampler
   and batch size.
"""
import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench folder is not a package)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--steps", type=int, default=20, help="sampling steps for the images/s table")
  p.add_argument("--batches", default="1,8,32", help="batch sizes for the images/s table")
  p.add_argument("--samplers", default="ddim,dpmpp_2m,plms", help="samplers for the images/s table")
  p.add_argument("--guidance", type=float, default=5.0, help="classifier-free guidance scale")
  p.add_argument("--overhead_batch", type=int, default=8,
                 help="batch B of the loop-overhead table (the UNet runs on 2B); 0 = skip")
  p.add_argument("--repeats", type=int, default=3, help="timed calls (after 1 warm-up)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--devices", type=int, default=1,
                 help="fake CPU devices (sets --xla_force_host_platform_device_count)")
  return p.parse_args(argv)


def build(dtype: str):
  """(task, state, mesh, rules) of the tiny txt2img model with random weights."""
  import jax
  from ldm_jax import config_lib, parallel
  from ldm_jax.training.ldm import LDMTask
  config = common.txt2img_config("tiny")
  c = config_lib.for_stage(config, "stage2")
  c.dtype = dtype
  task = LDMTask(c)
  mesh = parallel.make_mesh(c)
  rules = parallel.rules_of(c)
  state, _ = parallel.create_sharded(task.init, jax.random.key(c.seed), mesh, rules)
  return task, state, mesh, rules


def prompts_batch(task, n: int, mesh) -> dict:
  """Tokens of n fixed prompts as global arrays (replicated when n does not split)."""
  import jax
  from ldm_jax import parallel
  host = task.prepare_batch(task.cond.fixed_batch(n))
  if n % parallel.data_parallel_size(mesh) == 0:
    return parallel.global_batch(host, mesh)
  return jax.device_put(host, parallel.replicated(mesh))


def sampler_fn(task, *, steps: int, sampler: str, guidance: float):
  """The whole sampler, jitted as the training loop's sample grids jit it."""
  import jax
  return jax.jit(functools.partial(task.sample, steps=steps, sampler=sampler, guidance=guidance))


def loop_overhead(args, task, state, mesh, rules):
  import jax
  import jax.numpy as jnp
  from ldm_jax import parallel
  b = args.overhead_batch
  batch = prompts_batch(task, b, mesh)
  rng = jax.random.key(1)
  compiled, compile_s = {}, {}
  with parallel.activate(mesh, rules):
    for n in (10, 50):
      fn = sampler_fn(task, steps=n, sampler="ddim", guidance=args.guidance)
      compiled[n], compile_s[n] = common.compile_timed(fn, state, batch, rng)
    t = {n: common.time_calls(lambda n=n: compiled[n](state, batch, rng), warmup=1,
                              repeats=args.repeats).median for n in (10, 50)}
    # One UNet forward at the batch the guided sampler feeds it (2B).
    n2 = 2 * b
    unet_params = state["ema"]["unet"]
    z = jnp.zeros((n2, task.latent_hw, task.latent_hw, task.unet.in_channels))
    ts = jnp.full((n2,), 500, jnp.int32)
    ctx = jnp.zeros((n2, task.cond.tokenizer.max_length, task.cond.text_model.width))
    fwd, fwd_compile = common.compile_timed(
        lambda p, z, t, c: task.unet.apply(p, z, t, c), unet_params, z, ts, ctx)
    t_fwd = common.time_calls(lambda: fwd(unet_params, z, ts, ctx), warmup=2,
                              repeats=5 * args.repeats).median
  per_step = (t[50] - t[10]) / 40
  fixed = t[10] - 10 * per_step
  return ["ddim + guidance", b, n2, per_step * 1e3, t_fwd * 1e3, (per_step - t_fwd) * 1e3,
          (per_step - t_fwd) / per_step, fixed * 1e3, compile_s[10], compile_s[50], fwd_compile]


def throughput(args, task, state, mesh, rules):
  import jax
  from ldm_jax import parallel
  rows = []
  rng = jax.random.key(2)
  for sampler in args.samplers.split(","):
    for b in (int(x) for x in args.batches.split(",")):
      batch = prompts_batch(task, b, mesh)
      with parallel.activate(mesh, rules):
        compiled, compile_s = common.compile_timed(
            sampler_fn(task, steps=args.steps, sampler=sampler, guidance=args.guidance),
            state, batch, rng)
        t = common.time_calls(lambda: compiled(state, batch, rng), warmup=1,
                              repeats=args.repeats)
      calls = args.steps + 1 if sampler == "plms" else args.steps  # PLMS: one extra warm-up call
      rows.append([sampler, b, args.steps, calls, compile_s, t.median, b / t.median,
                   t.median / calls * 1e3])
      print(f"  {sampler} batch {b}: {b / t.median:.1f} images/s", flush=True)
  return rows


def main(argv=None):
  args = parse_args(argv)
  common.force_host_devices(args.devices)
  print(common.machine_line())
  task, state, mesh, rules = build(args.dtype)
  res = task.latent_hw * task.first.factor
  print(f"tiny txt2img: {res}x{res} px, {task.latent_hw}x{task.latent_hw}x"
        f"{task.first.z_channels} latents, guidance {args.guidance}, {args.dtype}")
  if args.overhead_batch:
    row = loop_overhead(args, task, state, mesh, rules)
    common.print_table(
        ["sampler", "B", "UNet batch", "scan ms/step", "UNet fwd ms", "overhead ms/step",
         "overhead share", "fixed ms", "compile 10 steps s", "compile 50 steps s",
         "compile UNet s"], [row],
        title="Loop overhead: per step of the scan = (t(50 steps) - t(10 steps)) / 40")
  rows = throughput(args, task, state, mesh, rules)
  common.print_table(
      ["sampler", "batch", "steps", "UNet calls", "compile s", "s/batch", "images/s",
       "ms/UNet call"], rows,
      title=f"End to end (tau(y) + {args.steps}-step sampler with guidance + first-stage decode)")


if __name__ == "__main__":
  main()
