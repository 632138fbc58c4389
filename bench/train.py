"""Training throughput: examples/s and model FLOP utilisation of the stage-2 step.

  python bench/train.py                       # tiny txt2img (batch 64) + SD-1.x UNet fwd+bwd (batch 1)
  python bench/train.py --skip_sd --steps 20  # tiny only, more timed steps
  python bench/train.py --devices 8           # 8 fake CPU devices (same cores, data-parallel mesh)
  python bench/train.py --compare_devices 1,2  # tiny step on 1 and on 2 CPU devices, and the ratio

(a) tiny txt2img: the whole `LDMTask.update` (first-stage encode, tau(y), UNet
    forward + backward, AdamW, EMA), jitted with the shardings the training loop uses
    (`parallel.create_sharded`, batch over data x fsdp, state donated); then the same
    step on batches from the latent cache (`stage2.latent_cache`: no encoder), and the ratio.
(b) sd15: the Stable Diffusion 1.x UNet (860M parameters) at a 32x32 latent, forward +
    backward of the eps loss only (no optimizer: two AdamW moments would add 7 GB).

MFU = XLA's FLOPs of one step (`compiled.cost_analysis()`) x steps/s / the measured
matmul peak (`common.measure_matmul_peak`), both per device.
"""
import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench folder is not a package)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=64, help="tiny: global batch")
  p.add_argument("--steps", type=int, default=5, help="tiny: timed steps (after 1 warm-up)")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                 help="compute dtype of both models and of the matmul peak")
  p.add_argument("--skip_tiny", action="store_true", help="skip (a), the tiny txt2img step")
  p.add_argument("--skip_sd", action="store_true", help="skip (b), the SD-1.x UNet")
  p.add_argument("--sd_batch", type=int, default=1, help="sd15: batch")
  p.add_argument("--sd_latent", type=int, default=32, help="sd15: latent side (64 = 512 px)")
  p.add_argument("--sd_steps", type=int, default=2, help="sd15: timed steps (no warm-up: compiled ahead of time)")
  p.add_argument("--sd_attention", default="auto",
                 help="sd15: comma list of attention kernels (auto, xla, cudnn); one row each, "
                      "timed against the first; with xla listed, every row's MFU uses its FLOPs")
  p.add_argument("--peak_n", type=int, default=2048, help="side of the peak-matmul operands")
  p.add_argument("--data_batches", type=int, default=5,
                 help="batches read to time the data pipeline (0 = skip)")
  p.add_argument("--devices", type=int, default=1,
                 help="fake CPU devices (sets --xla_force_host_platform_device_count)")
  p.add_argument("--compare_devices", default="",
                 help="comma list of CPU device counts: times (a) in one fresh process per "
                      "count, one after the other, and prints each against the first")
  p.add_argument("--json_out", default="", help=argparse.SUPPRESS)  # --compare_devices' children
  return p.parse_args(argv)


def compare_devices(args):
  """(a) on 1, 2, ... CPU devices, each in its own process (the count is fixed when the
  backend starts); XLA's CPU runtime spreads one device's small ops poorly over
  cores, so one device per core is the layout `ldm_jax.train` picks."""
  import json
  import subprocess
  import tempfile
  counts = [int(n) for n in args.compare_devices.split(",")]
  rows = []
  for n in counts:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
      subprocess.run([sys.executable, os.path.abspath(__file__), "--skip_sd", "--devices", str(n),
                      "--batch", str(args.batch), "--steps", str(args.steps), "--dtype", args.dtype,
                      "--data_batches", "0", "--json_out", f.name], check=True,
                     stdout=subprocess.DEVNULL)
      r = json.load(open(f.name))
    rows.append([n, r["compile_s"], r["step_s"], args.batch / r["step_s"]])
  base = rows[0][2]
  print(common.machine_line())
  common.print_table(["CPU devices", "compile s", "step s", "examples/s", f"speed vs {counts[0]}"],
                     [r + [base / r[2]] for r in rows],
                     title=f"tiny txt2img update, batch {args.batch}, by CPU device count")


def bench_tiny(args, peak, latent=False):
  """(a); `latent`: batches from the latent cache (stage2.latent_cache), no encoder."""
  import jax
  import numpy as np
  from ldm_jax import config_lib, parallel
  from ldm_jax.training.ldm import LDMTask

  config = common.txt2img_config("tiny")
  c = config_lib.for_stage(config, "stage2")
  c.batch_size = args.batch
  c.dtype = args.dtype
  task = LDMTask(c)
  mesh = parallel.make_mesh(c)
  rules = parallel.rules_of(c)
  per_process = parallel.check_batch(c.batch_size, mesh, c.grad_accum)
  init_rng, step_rng = jax.random.split(jax.random.key(c.seed))
  state, shardings = parallel.create_sharded(task.init, init_rng, mesh, rules)
  host = common.shapes_batch(per_process, c.data.resolution)
  if latent:  # the cache's float16 latents in place of the images
    z = task.first.encode(state["frozen"]["first_stage"], host.pop("image"), None)
    host["latent"] = np.asarray(z, np.float16)
  batch = parallel.global_batch(task.prepare_batch(host), mesh)

  # As ldm_jax/training/loop.py: the rng folded with the step, state donated.
  def update(state, batch, rng):
    return task.update(state, batch, jax.random.fold_in(rng, state["step"]))

  update = jax.jit(update, in_shardings=(shardings, parallel.batch_sharding(mesh), None),
                   out_shardings=(shardings, None), donate_argnums=0)
  with parallel.activate(mesh, rules):
    compiled, compile_s = common.compile_timed(update, state, batch, step_rng)
  holder = [state]

  def step():
    holder[0], metrics = compiled(holder[0], batch, step_rng)
    return holder[0], metrics

  t = common.time_calls(step, warmup=1, repeats=args.steps)
  n_params = sum(x.size for x in jax.tree.leaves(holder[0]["params"]))
  what = "update, latent cache" if latent else "update"
  return _row(f"tiny txt2img ({n_params / 1e6:.1f}M)", what, c.batch_size, compiled,
              compile_s, t, peak, mesh.size)


def bench_sd(args, peak, impl="auto"):
  import jax
  import jax.numpy as jnp
  from ldm_jax import config_lib, parallel
  from ldm_jax.models import unet as unet_lib

  kw = unet_lib.preset("sd15")
  kw["dtype"] = jnp.bfloat16 if args.dtype == "bfloat16" else None
  kw["attention"] = impl
  unet = unet_lib.UNetModel(**kw)
  spine = config_lib.spine(batch_size=args.sd_batch)
  mesh = parallel.make_mesh(spine)
  rules = parallel.rules_of(spine)
  b, s = args.sd_batch, args.sd_latent
  z = jnp.zeros((b, s, s, 4))
  t = jnp.zeros((b,), jnp.int32)
  ctx = jnp.zeros((b, 77, kw["context_dim"]))

  # Values do not change the speed, so no real init: flax's (threefry, truncated
  # normal over 860M values) took ~100 s on 2 CPU cores, XLA's RngBitGenerator
  # ~60 s; a multiplicative hash of the index, scaled as LeCun-uniform, ~25 s (mostly
  # writing 3.4 GB).
  t0 = time.perf_counter()
  init = lambda r: unet.init(r, z, t, ctx)
  with parallel.activate(mesh, rules):
    abstract = jax.eval_shape(init, jax.random.key(0))
    shardings = parallel.state_shardings(abstract, mesh, rules)
  abstract = parallel.unbox(abstract)

  def fill():
    def leaf(i, a):
      fan_in = math.prod(a.shape[:-1]) if len(a.shape) > 1 else 1
      h = (jax.lax.iota(jnp.uint32, math.prod(a.shape)) + jnp.uint32(7919 * i)) * \
          jnp.uint32(2654435761)                                    # Knuth's hash, mod 2^32
      u = (h >> 8).astype(jnp.float32) * 2.0 ** -23 - 1.0           # in [-1, 1)
      return (u * math.sqrt(3.0 / fan_in)).reshape(a.shape).astype(a.dtype)
    leaves, treedef = jax.tree.flatten(abstract)
    return jax.tree.unflatten(treedef, [leaf(i, a) for i, a in enumerate(leaves)])

  params = jax.jit(fill, out_shardings=shardings)()
  jax.block_until_ready(params)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"sd15: {n_params / 1e6:.0f}M parameters initialised in {time.perf_counter() - t0:.0f} s",
        flush=True)

  def loss(p, z0, t, ctx, eps):
    z_t = 0.9 * z0 + 0.4 * eps   # the schedule's arithmetic is negligible next to the UNet
    return jnp.mean(jnp.square(unet.apply(p, z_t, t, ctx) - eps))

  batch_sh = parallel.batch_sharding(mesh) if b % parallel.data_parallel_size(mesh) == 0 \
      else parallel.replicated(mesh)
  fwd_bwd = jax.jit(jax.value_and_grad(loss),
                    in_shardings=(shardings,) + (batch_sh,) * 4, out_shardings=(None, shardings))
  r = jax.random.split(jax.random.key(1), 3)
  z0 = jax.device_put(jax.random.normal(r[0], z.shape), batch_sh)
  eps = jax.device_put(jax.random.normal(r[1], z.shape), batch_sh)
  tt = jax.device_put(jax.random.randint(r[2], (b,), 0, 1000), batch_sh)
  ctx = jax.device_put(jax.random.normal(r[2], ctx.shape), batch_sh)
  with parallel.activate(mesh, rules):
    compiled, compile_s = common.compile_timed(fwd_bwd, params, z0, tt, ctx, eps)
  # Compiled ahead of time, so the first call runs no compiler: no warm-up call,
  # which at ~25 s a step on 2 cores is what keeps the default run short.
  timing = common.time_calls(lambda: compiled(params, z0, tt, ctx, eps), warmup=0,
                             repeats=args.sd_steps)
  return _row(f"sd15 UNet ({n_params / 1e6:.0f}M) {s}x{s} latent", f"fwd+bwd, attention {impl}", b, compiled,
              compile_s, timing, peak, mesh.size)


def _row(name, what, batch, compiled, compile_s, timing, peak, n_devices):
  flops = common.flops_of(compiled)  # per device for an SPMD program
  row = [name, what, batch, compile_s, timing.median, batch / timing.median]
  return row + _rates(flops, timing.median, peak, n_devices), (name, common.memory_of(compiled))


def _rates(flops, step_s, peak, n_devices):
  """[GFLOP/step/dev, achieved TFLOP/s, peak TFLOP/s, MFU] of a step of `flops` per device."""
  achieved = flops / step_s
  return [flops / 1e9, achieved * n_devices / 1e12, peak * n_devices / 1e12, achieved / peak]


def bench_data(args, batch_size):
  """Examples/s of `ldm_jax.data.make_iterator` (host side only), if it exists."""
  from ldm_jax import data as data_lib
  if not args.data_batches:
    return None
  config = common.txt2img_config("tiny")
  it = data_lib.make_iterator(config.data, batch_size=batch_size, process_index=0,
                              process_count=1, seed=0)
  t = common.time_calls(lambda: next(it), warmup=1, repeats=args.data_batches)
  return batch_size / t.median


def main(argv=None):
  args = parse_args(argv)
  if args.compare_devices:
    return compare_devices(args)
  common.force_host_devices(args.devices)
  import jax
  import jax.numpy as jnp
  print(common.machine_line())
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  peak = common.measure_matmul_peak(dtype, args.peak_n)
  print(f"measured matmul peak ({args.dtype}, n={args.peak_n}, one device): "
        f"{peak / 1e9:.1f} GFLOP/s")
  results, ratio = [], None
  if not args.skip_tiny:
    results.append(bench_tiny(args, peak))
    if args.json_out:
      import json
      with open(args.json_out, "w") as f:
        json.dump({"compile_s": results[-1][0][3], "step_s": results[-1][0][4]}, f)
    else:
      results.append(bench_tiny(args, peak, latent=True))
      ratio = results[-2][0][4] / results[-1][0][4]
  sd_steps = []  # (attention kernel, step seconds)
  if not args.skip_sd:
    sd_rows = []
    for impl in args.sd_attention.split(","):
      sd_rows.append(bench_sd(args, peak, impl))
      sd_steps.append((impl, sd_rows[-1][0][4]))
    # XLA counts no FLOPs inside a cuDNN attention kernel: the xla row's count is the
    # model's, so every row's MFU uses it (without an xla row a cuDNN row undercounts).
    xla_flops = [r[6] for (r, _), (impl, _) in zip(sd_rows, sd_steps) if impl == "xla"]
    for r, _ in sd_rows:
      if xla_flops:
        r[6:] = _rates(xla_flops[0] * 1e9, r[4], peak, jax.device_count())
    results += sd_rows
  common.print_table(
      ["config", "step", "batch", "compile s", "step s", "examples/s", "GFLOP/step/dev",
       "achieved TFLOP/s", "peak TFLOP/s", "MFU"],
      [r for r, _ in results], title=f"Stage-2 training step ({args.dtype}, {args.devices} device(s))")
  common.print_table(
      ["config", "args MiB", "out MiB", "temp MiB", "alias MiB", "total MiB"],
      [[n, m.get("args", float("nan")), m.get("out", float("nan")), m.get("temp", float("nan")),
        m.get("alias", float("nan")), m.get("total", float("nan"))] for _, (n, m) in results],
      title="memory_analysis() of the compiled step, per device")
  if ratio is not None:
    print(f"\ntiny step from the latent cache: {ratio:.2f}x the step that encodes images")
  for impl, step_s in sd_steps[1:]:
    print(f"sd15 step with attention {impl}: {sd_steps[0][1] / step_s:.2f}x the speed "
          f"of attention {sd_steps[0][0]}")
  rate = bench_data(args, args.batch)
  if rate is None:
    print("\ndata pipeline: skipped (ldm_jax.data.make_iterator not present, or --data_batches 0)")
  else:
    print(f"\ndata pipeline (make_iterator, shapes, batch {args.batch}): {rate:.0f} examples/s")


if __name__ == "__main__":
  main()
