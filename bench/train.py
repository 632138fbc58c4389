"""Training throughput: examples/s and model FLOP utilisation of the stage-2 step.

  python bench/train.py                       # tiny txt2img (batch 64) + SD-1.x UNet fwd+bwd (batch 1)
  python bench/train.py --skip_sd --steps 20  # tiny only, more timed steps
  python bench/train.py --devices 8           # 8 fake CPU devices (same cores, data-parallel mesh)
  python bench/train.py --compare_devices 1,2  # tiny step on 1 and on 2 CPU devices, and the ratio
  python bench/train.py --skip_tiny --dtype bfloat16 --sd_latent 64 --sd_batch 8 --sd_optimizer \
      --sd_variants default,cast_once,attention=xla,remat,batch=16   # on a GPU (bench/gpu.sh)

(a) tiny txt2img: the whole `LDMTask.update` (first-stage encode, tau(y), UNet
    forward + backward, AdamW, EMA), jitted with the shardings the training loop uses
    (`parallel.create_sharded`, batch over data x fsdp, state donated); then the same
    step on batches from the latent cache (`stage2.latent_cache`: no encoder), and the ratio.
(b) sd15: the Stable Diffusion 1.x UNet (860M parameters) at a 32x32 latent, forward +
    backward of the eps loss (with --sd_optimizer also AdamW and the EMA, as stage 2
    trains: on a CPU host the two moments would add 7 GB); one row per --sd_variants
    entry, each a set of knobs ('+'-joined) over the flags' settings.

MFU = the model FLOPs of one step x steps/s / the measured matmul peak
(`common.measure_matmul_peak`), per device. The FLOPs are analytic (`ldm_jax.flops`,
checked against torch's FlopCounterMode): (a) counts the frozen encoder's forward,
tau(y)'s forward and backward and the UNet's; (b) the UNet's. XLA's own count
(`cost_analysis()`, which on a GPU misses the work inside cuDNN calls) is printed beside.
"""
import argparse
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
                 help="sd15: the attention kernel (auto, explicit, xla, cudnn)")
  p.add_argument("--sd_preset", default="sd15", help="UNet preset of (b) (tiny: a smoke test)")
  p.add_argument("--sd_optimizer", action="store_true",
                 help="sd15: the step also runs AdamW and the EMA update (stage 2's step)")
  p.add_argument("--sd_variants", default="default",
                 help="sd15: comma list of rows, each 'default' or knobs joined by '+': "
                      "cast_once (bf16 kernels cast once per step), attention=K, remat, "
                      "batch=N, norm=flax (flax's GroupNorm + SiLU instead of the fused "
                      "layers.group_norm); speeds are against the first row")
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
              compile_s, t, peak, mesh.size, update_flops(task, c.batch_size, latent))


def update_flops(task, batch: int, latent: bool) -> float:
  """Analytic FLOPs of one `LDMTask.update` of `batch` examples: the frozen first
  stage's encoder forward (none from the latent cache), tau(y) forward (+ backward when
  trained jointly) and the UNet forward + backward."""
  from ldm_jax import flops
  hw, res = task.latent_hw, task.latent_hw * task.first.factor
  total = 0.0 if latent else flops.encoder(task.first.model, batch, res, res).forward()
  length = None
  if task.cond.context == "text":
    length = task.cond.tokenizer.max_length
    tau = flops.text_encoder(task.cond.text_model, batch, length)
    total += tau.train() if task.cond.text_trainable else tau.forward()
  return total + flops.unet(task.unet, batch, hw, hw, length,
                            context_grad=task.cond.context == "text" and task.cond.text_trainable
                            ).train()


def sd_knobs(variant: str, args) -> dict:
  """The settings of one --sd_variants entry over the flags' settings."""
  knobs = dict(attention=args.sd_attention, cast_once=False, remat=False, batch=args.sd_batch,
               norm="fused")
  for k in ([] if variant == "default" else variant.split("+")):
    key, _, value = k.partition("=")
    if key not in knobs:
      raise SystemExit(f"--sd_variants: unknown knob {key!r} in {variant!r}; known: {list(knobs)}")
    knobs[key] = int(value) if key == "batch" else value if key in ("attention", "norm") else True
  return knobs


def sd_params(args):
  """(UNet kwargs, hash-filled parameters, shardings, mesh, rules) of the --sd_preset UNet."""
  import jax
  import jax.numpy as jnp
  from ldm_jax import config_lib, parallel
  from ldm_jax.models import unet as unet_lib
  kw = unet_lib.preset(args.sd_preset)
  kw["dtype"] = jnp.bfloat16 if args.dtype == "bfloat16" else None
  spine = config_lib.spine(batch_size=args.sd_batch)
  mesh, rules = parallel.make_mesh(spine), parallel.rules_of(spine)
  s = args.sd_latent
  z, t, ctx = jnp.zeros((1, s, s, 4)), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 77, kw["context_dim"]))
  init = lambda: unet_lib.UNetModel(**kw).init(jax.random.key(0), z, t, ctx)
  with parallel.activate(mesh, rules):
    shardings = parallel.state_shardings(jax.eval_shape(init), mesh, rules)
  t0 = time.perf_counter()
  params = common.hash_params(init, out_shardings=shardings)
  n = sum(x.size for x in jax.tree.leaves(params))
  print(f"{args.sd_preset}: {n / 1e6:.0f}M parameters initialised in {time.perf_counter() - t0:.0f} s",
        flush=True)
  return kw, params, shardings, mesh, rules


def bench_sd(args, peak, variant, built):
  """(b): one --sd_variants row; `built` is sd_params()."""
  import jax
  import jax.numpy as jnp
  import optax
  from ldm_jax import flops, parallel
  from ldm_jax.models import layers, unet as unet_lib
  from ldm_jax.training import ldm, step as step_lib

  kw, params, shardings, mesh, rules = built
  knobs = sd_knobs(variant, args)
  unet = unet_lib.UNetModel(**dict(kw, attention=knobs["attention"], remat=knobs["remat"]))
  b, s = knobs["batch"], args.sd_latent
  tx = optax.adamw(1e-5)

  def loss(p, z0, t, ctx, eps):
    if knobs["cast_once"] and unet.dtype is not None:
      p = step_lib.cast_kernels(p, unet.dtype)
    z_t = 0.9 * z0 + 0.4 * eps   # the schedule's arithmetic is negligible next to the UNet
    return jnp.mean(jnp.square(unet.apply(p, z_t, t, ctx) - eps))

  def train_step(state, z0, t, ctx, eps):
    value, grads = jax.value_and_grad(loss)(state["params"], z0, t, ctx, eps)
    if not args.sd_optimizer:
      return dict(state, params=grads), value  # gradients out: nothing is dead code
    updates, opt = tx.update(grads, state["opt"], state["params"])
    new = optax.apply_updates(state["params"], updates)
    ema = ldm.ema_update(state["ema"], new, 0.9999, state["step"])
    return dict(params=new, opt=opt, ema=ema, step=state["step"] + 1), value

  state = dict(params=params)
  if args.sd_optimizer:
    state.update(opt=jax.jit(tx.init)(params), ema=jax.tree.map(jnp.copy, params),
                 step=jnp.zeros((), jnp.int32))
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  batch_sh = parallel.batch_sharding(mesh) if b % parallel.data_parallel_size(mesh) == 0 \
      else parallel.replicated(mesh)
  r = jax.random.split(jax.random.key(1), 3)
  z0 = jax.device_put(jax.random.normal(r[0], (b, s, s, 4)), batch_sh)
  eps = jax.device_put(jax.random.normal(r[1], (b, s, s, 4)), batch_sh)
  tt = jax.device_put(jax.random.randint(r[2], (b,), 0, 1000), batch_sh)
  ctx = jax.device_put(jax.random.normal(r[2], (b, 77, kw["context_dim"])), batch_sh)
  fn = jax.jit(train_step, in_shardings=(state_sh,) + (batch_sh,) * 4,
               out_shardings=(state_sh, None), donate_argnums=0 if args.sd_optimizer else ())
  group_norm = layers.GroupNorm
  if knobs["norm"] == "flax":
    layers.GroupNorm = common.flax_group_norm
  try:
    with parallel.activate(mesh, rules):
      compiled, compile_s = common.compile_timed(fn, state, z0, tt, ctx, eps)
  finally:
    layers.GroupNorm = group_norm
  holder = [state]

  def run():
    out, value = compiled(holder[0], z0, tt, ctx, eps)
    if args.sd_optimizer:
      holder[0] = out
    return value
  # Compiled ahead of time, so the first call runs no compiler: one warm-up call only
  # where steps are cheap (a GPU); on a CPU an SD step takes ~25 s.
  warmup = 1 if jax.default_backend() != "cpu" else 0
  timing = common.time_calls(run, warmup=warmup, repeats=args.sd_steps)
  if args.sd_optimizer:
    built = (kw, holder[0]["params"], shardings, mesh, rules)  # donated: the next row needs them
  model_flops = flops.unet(unet, b, s, s, 77).train()
  what = ("fwd+bwd+AdamW+EMA" if args.sd_optimizer else "fwd+bwd") + f", {variant}"
  row = _row(f"{args.sd_preset} UNet {s}x{s} latent", what, b, compiled, compile_s, timing, peak,
             mesh.size, model_flops)
  return row, built


def _row(name, what, batch, compiled, compile_s, timing, peak, n_devices, model_flops):
  """A table row; `model_flops`: the analytic FLOPs of one step (all devices)."""
  per_dev = model_flops / n_devices
  achieved = per_dev / timing.median
  row = [name, what, batch, compile_s, timing.median, batch / timing.median, per_dev / 1e9,
         common.flops_of(compiled) / 1e9, achieved * n_devices / 1e12, peak * n_devices / 1e12,
         achieved / peak]
  return row, (f"{name}, {what}", common.memory_of(compiled))


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
  sd_steps = []  # (variant, seconds per example)
  if not args.skip_sd:
    built = sd_params(args)
    for variant in args.sd_variants.split(","):
      row, built = bench_sd(args, peak, variant, built)
      results.append(row)
      sd_steps.append((variant, row[0][4] / row[0][2]))  # seconds per example
  common.print_table(
      ["config", "step", "batch", "compile s", "step s", "examples/s", "GFLOP/step/dev",
       "XLA GFLOP/step/dev", "achieved TFLOP/s", "peak TFLOP/s", "MFU"],
      [r for r, _ in results], title=f"Stage-2 training step ({args.dtype}, {args.devices} device(s))")
  common.print_table(
      ["config", "args MiB", "out MiB", "temp MiB", "alias MiB", "total MiB"],
      [[n, m.get("args", float("nan")), m.get("out", float("nan")), m.get("temp", float("nan")),
        m.get("alias", float("nan")), m.get("total", float("nan"))] for _, (n, m) in results],
      title="memory_analysis() of the compiled step, per device")
  if ratio is not None:
    print(f"\ntiny step from the latent cache: {ratio:.2f}x the step that encodes images")
  for variant, per_example in sd_steps[1:]:
    print(f"{args.sd_preset} step {variant}: {sd_steps[0][1] / per_example:.2f}x the examples/s "
          f"of {sd_steps[0][0]}")
  rate = bench_data(args, args.batch)
  if rate is None:
    print("\ndata pipeline: skipped (ldm_jax.data.make_iterator not present, or --data_batches 0)")
  else:
    print(f"\ndata pipeline (make_iterator, shapes, batch {args.batch}): {rate:.0f} examples/s")


if __name__ == "__main__":
  main()
