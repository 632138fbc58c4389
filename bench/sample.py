"""Sampling speed of the tiny txt2img model (random weights: speed does not depend on them).

  python bench/sample.py                           # defaults: 20 steps, batches 1, 8, 32
  python bench/sample.py --steps 50 --batches 1,8,32,64 --samplers ddim
  python bench/sample.py --devices 8               # 8 fake CPU devices (same cores)

Two tables:
1. The lax.scan loop's cost per step: `LDMTask.sample` (DDIM, classifier-free guidance,
   so the UNet runs on 2B inside) for 50 and for 10 steps; (t50 - t10) / 40 is the time
   of one step with the fixed costs (tau(y), first-stage decode) cancelled (each t the
   best of at least 7 calls). Beside it
   one jitted UNet forward at batch 2B: the difference is the loop's overhead per step
   (guidance arithmetic, the sampler update, the scan itself). The compile time of the
   whole jitted sampler for 10 and 50 steps should be about the same: the UNet is
   traced once inside the scan.
2. Images/s end to end (tau(y), the sampler loop, the first-stage decode) per sampler
   and batch size.

  python bench/sample.py --sd --dtype bfloat16      # SD-1.x 512x512, 50 DDIM steps (a GPU)

`--sd` instead times Stable Diffusion 1.x text-to-image at batch 1 as its pipeline runs
it: the CLIP ViT-L/14 text encoder on the prompt and the empty prompt, 50 DDIM steps of
the SD-1.x UNet with classifier-free guidance 7.5 (both halves in one batch of 2), the
VAE decoder at 512x512, all one jitted function, hash-filled weights (the speed does
not depend on them). `--sd_preset tiny --sd_resolution 64` is its smoke test.
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
  p.add_argument("--sd", action="store_true", help="time SD-1.x text-to-image instead (see above)")
  p.add_argument("--sd_preset", default="sd15", help="--sd: 'sd15' or 'tiny' (smoke test)")
  p.add_argument("--sd_resolution", type=int, default=512, help="--sd: image side in pixels")
  p.add_argument("--sd_steps", type=int, default=50, help="--sd: DDIM steps")
  p.add_argument("--sd_attention", default="auto", help="--sd: the UNet's attention kernel")
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
  n2 = 2 * b
  unet_params = state["ema"]["unet"]
  z = jnp.zeros((n2, task.latent_hw, task.latent_hw, task.unet.in_channels))
  ts = jnp.full((n2,), 500, jnp.int32)
  ctx = jnp.zeros((n2, task.cond.tokenizer.max_length, task.cond.text_model.width))

  def bare_scan(n):
    """n UNet calls at batch 2B in a lax.scan, nothing else: the loop without the sampler."""
    def run(p, z, c):
      def body(z, t):
        return task.unet.apply(p, z, jnp.full((n2,), t, jnp.int32), c), None
      return jax.lax.scan(body, z, jnp.arange(n, 0, -1) * 20)[0]
    return run

  calls, compile_s = {}, {}
  with parallel.activate(mesh, rules):
    for n in (10, 50):
      c, compile_s[n] = common.compile_timed(
          sampler_fn(task, steps=n, sampler="ddim", guidance=args.guidance), state, batch, rng)
      calls[("sampler", n)] = lambda c=c: c(state, batch, rng)
      c, _ = common.compile_timed(bare_scan(n), unet_params, z, ctx)
      calls[("bare", n)] = lambda c=c: c(unet_params, z, ctx)
    fwd, fwd_compile = common.compile_timed(
        lambda p, z, t, c: task.unet.apply(p, z, t, c), unet_params, z, ts, ctx)
    calls[("fwd", 1)] = lambda: fwd(unet_params, z, ts, ctx)
    # Rounds of one call each, interleaved, and the best of each over the rounds: on a
    # CPU whose speed drifts, separate blocks of calls differ by more than the overhead.
    for call in calls.values():
      jax.block_until_ready(call())
    best = {k: float("inf") for k in calls}
    for _ in range(max(args.repeats, 25)):
      for k, call in calls.items():
        best[k] = min(best[k], common.time_calls(call, warmup=0, repeats=1).best)
  per_step = (best[("sampler", 50)] - best[("sampler", 10)]) / 40
  bare = (best[("bare", 50)] - best[("bare", 10)]) / 40
  t_fwd = best[("fwd", 1)]
  fixed = best[("sampler", 10)] - 10 * per_step
  return ["ddim + guidance", b, n2, per_step * 1e3, bare * 1e3, t_fwd * 1e3,
          (per_step - bare) / per_step, (per_step - t_fwd) / per_step, fixed * 1e3,
          compile_s[10], compile_s[50], fwd_compile]


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


def sd_latency(args):
  """Seconds of one SD-1.x text-to-image call at batch 1 (see the module docstring)."""
  import jax
  import jax.numpy as jnp
  from ldm_jax.diffusion import samplers
  from ldm_jax.diffusion.schedule import make_schedule
  from ldm_jax.models import autoencoder, text, unet
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else None
  tiny = args.sd_preset == "tiny"
  clip = text.CLIPTextTransformer(**text.clip_preset(args.sd_preset), dtype=dtype)
  net = unet.UNetModel(**dict(unet.preset(args.sd_preset), attention=args.sd_attention),
                       dtype=dtype)
  vae = autoencoder.AutoencoderKL(**autoencoder.preset("kl", 8, "tiny" if tiny else "ref"),
                                  attention=args.sd_attention, dtype=dtype)
  s = args.sd_resolution // 8
  ids = jnp.ones((1, 77), jnp.int32)
  z = jnp.zeros((1, s, s, 4))
  ctx = jnp.zeros((1, 77, clip.width))
  params = dict(
      clip=common.hash_params(lambda: clip.init(jax.random.key(0), ids)),
      unet=common.hash_params(lambda: net.init(jax.random.key(0), z, jnp.zeros((1,)), ctx)),
      vae=common.hash_params(lambda: vae.init(jax.random.key(0), z, method="decode")))
  schedule = make_schedule("linear", 1000, 0.00085, 0.012)

  def txt2img(params, ids, empty, rng):
    cond, uncond = ({"context": clip.apply(params["clip"], i)} for i in (ids, empty))
    apply = lambda z_t, t, c: net.apply(params["unet"], z_t, t, c["context"])
    model_fn = samplers.cfg_model_fn(apply, cond, uncond, 7.5)
    z0 = samplers.sample(model_fn, (1, s, s, 4), rng, schedule, sampler="ddim",
                         steps=args.sd_steps, prediction_type="eps")
    return vae.apply(params["vae"], z0 / 0.18215, method="decode")

  empty = jnp.zeros((1, 77), jnp.int32)
  compiled, compile_s = common.compile_timed(txt2img, params, ids, empty, jax.random.key(0))
  t = common.time_calls(lambda: compiled(params, ids, empty, jax.random.key(0)), warmup=1,
                        repeats=args.repeats)
  common.print_table(
      ["pipeline", "resolution", "DDIM steps", "dtype", "attention", "compile s", "latency s",
       "best s", "UNet steps/s"],
      [[f"{args.sd_preset} txt2img, guidance 7.5, batch 1", args.sd_resolution, args.sd_steps,
        args.dtype, args.sd_attention, compile_s, t.median, t.best, args.sd_steps / t.median]],
      title="Text-to-image latency: CLIP text, DDIM with guidance (UNet batch 2), VAE decode")


def main(argv=None):
  args = parse_args(argv)
  common.force_host_devices(args.devices)
  print(common.machine_line())
  if args.sd:
    return sd_latency(args)
  task, state, mesh, rules = build(args.dtype)
  res = task.latent_hw * task.first.factor
  print(f"tiny txt2img: {res}x{res} px, {task.latent_hw}x{task.latent_hw}x"
        f"{task.first.z_channels} latents, guidance {args.guidance}, {args.dtype}")
  if args.overhead_batch:
    row = loop_overhead(args, task, state, mesh, rules)
    common.print_table(
        ["sampler", "B", "UNet batch", "sampler ms/step", "bare scan ms/step", "UNet fwd ms",
         "share over bare scan", "share over fwd", "fixed ms", "compile 10 steps s",
         "compile 50 steps s", "compile UNet s"], [row],
        title="Loop overhead: per step of the scan = (t(50 steps) - t(10 steps)) / 40")
  rows = throughput(args, task, state, mesh, rules)
  common.print_table(
      ["sampler", "batch", "steps", "UNet calls", "compile s", "s/batch", "images/s",
       "ms/UNet call"], rows,
      title=f"End to end (tau(y) + {args.steps}-step sampler with guidance + first-stage decode)")


if __name__ == "__main__":
  main()
