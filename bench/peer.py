"""ldm_jax against PyTorch (diffusers / transformers) at the same architecture, on the CPU.

  python bench/peer.py                          # every row, 7 timed steps each
  python bench/peer.py --rows tiny,tiny2 --steps 11
  python bench/peer.py --rows sd --steps 3

Rows (float32, random weights; the parameter counts of the two sides are asserted equal):
  tiny   the UNet at diffusers' tiny SD shape (block channels 64/128/128, 2 res-blocks,
         cross-attention at the first two levels, context 16 x 128; 8,752,580 parameters):
         one training step (forward, backward, AdamW), batch 16, 8x8 latent, 1 JAX device
  tiny2  the same step on 2 CPU devices (the batch split over them, as `python -m
         ldm_jax.train` splits a CPU host), against the same PyTorch step
  sd     the SD-1.x UNet (859,520,964 parameters) forward, batch 1, 32x32 latent, 77 x 768 context
  vae    SD's VAE decoder (AutoencoderKL, 128/256/512/512): a 32x32x4 latent to 256 px, batch 1
  text   the CLIP ViT-L/14 text encoder (SD 1.x's tau): 77 tokens, batch 1

Each framework runs in its own process (the JAX device count is fixed when its backend
starts, and the two runtimes' thread pools stay apart); torch gets one intra-op thread
per core, JAX its default pool on the same cores (`--cores 1` pins both to one core). After warm-up the parent asks the two
processes for one step at a time, alternating (ABBA), so both see the same load: the
machine may be shared, and the ratios are what to read. Each cell is the median step.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (the bench folder is not a package)

ROWS = {
    "tiny": "tiny UNet (8.75M) train step, batch 16, 8x8, 1 device",
    "tiny2": "tiny UNet (8.75M) train step, batch 16, 8x8, 2 devices",
    "sd": "SD-1.x UNet (860M) forward, batch 1, 32x32",
    "vae": "SD VAE decode (49M) 32x32x4 -> 256 px, batch 1",
    "text": "CLIP ViT-L/14 text encoder (123M), 77 tokens, batch 1",
}
# diffusers' tiny SD UNet, as ldm_jax UNetModel kwargs and as UNet2DConditionModel kwargs.
TINY_JAX = dict(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 2, 2),
                num_res_blocks=2, attention_resolutions=(1, 2), num_heads=8,
                num_head_channels=-1, context_dim=128, norm_num_groups=32)
TINY_TORCH = dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(64, 128, 128),
                  layers_per_block=2,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=128, attention_head_dim=8)
TINY_BATCH, TINY_LATENT, TINY_TOKENS = 16, 8, 16
SD_LATENT, SD_TOKENS = 32, 77
VAE_LATENT = 32
# SD's VAE (diffusers' config of stable-diffusion-v1-5/vae).
VAE_TORCH = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                 block_out_channels=(128, 256, 512, 512), norm_num_groups=32, sample_size=256,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4)
LR = 1e-4
DONATE = True  # the train state is donated to the step (updated in place)
MESH = None  # the tiny rows' mesh axes (config.mesh); None: the default (data over every device)
CHAINS = 1  # the tiny rows' batch as this many independent gradient computations, summed


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {list(ROWS)}")
  p.add_argument("--steps", type=int, default=7, help="timed steps per framework and row")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
  p.add_argument("--cores", type=int, default=os.cpu_count(),
                 help="cores each worker may run on (the first N, by CPU affinity): torch's "
                      "intra-op threads, and the cores XLA sizes its thread pool by")
  p.add_argument("--torch_adamw", default="default", choices=("default", "foreach", "fused"),
                 help="torch.optim.AdamW implementation (default: as a diffusers training "
                      "script builds it)")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # 'jax' | 'torch'
  p.add_argument("--row", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


# -- the two sides ----------------------------------------------------------------------------
def _noise_schedule():
  """SD's scaled-linear alphas_cumprod (both sides use the same numbers)."""
  import numpy as np
  betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
  return np.cumprod(1 - betas).astype(np.float32)


def _tiny_batch():
  import numpy as np
  rng = np.random.default_rng(0)
  b, s = TINY_BATCH, TINY_LATENT
  return dict(z0=rng.standard_normal((b, s, s, 4), np.float32),
              eps=rng.standard_normal((b, s, s, 4), np.float32),
              t=rng.integers(0, 1000, b).astype(np.int32),
              ctx=rng.standard_normal((b, TINY_TOKENS, 128), np.float32))


def jax_side(row: str, return_compiled: bool = False, model_kw=None):
  """Builds the ldm_jax side of `row`; `model_kw` updates the model's keyword arguments
  (e.g. attention='xla').

  Returns:
    (parameter count, step callable), and the compiled executable if `return_compiled`.
  """
  if row == "tiny2":
    common.force_host_devices(2)
  import jax
  import jax.numpy as jnp
  import numpy as np
  import optax
  from ldm_jax import config_lib, parallel
  from ldm_jax.models import autoencoder, text, unet

  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  if row in ("tiny", "tiny2"):
    model = unet.UNetModel(**TINY_JAX, **(model_kw or {}))
    batch = _tiny_batch()
    spine = config_lib.spine(batch_size=TINY_BATCH)
    if MESH:
      spine.mesh = MESH
    mesh, rules = parallel.make_mesh(spine), parallel.rules_of(spine)
    tx = optax.adamw(LR)
    init = lambda r: (lambda p: dict(params=p, opt=tx.init(p)))(
        model.init(r, batch["z0"][:1], batch["t"][:1], batch["ctx"][:1]))
    state, shardings = parallel.create_sharded(init, jax.random.key(0), mesh, rules)
    batch = parallel.global_batch(batch, mesh)
    abar = jnp.asarray(_noise_schedule())

    def loss_fn(params, b):
      a = abar[b["t"]][:, None, None, None]
      z_t = jnp.sqrt(a) * b["z0"] + jnp.sqrt(1 - a) * b["eps"]
      return jnp.mean(jnp.square(model.apply(params, z_t, b["t"], b["ctx"]) - b["eps"]))

    def update(state, b):
      parts = [jax.tree.map(lambda x: x[i::CHAINS], b) for i in range(CHAINS)]
      losses, grads = zip(*(jax.value_and_grad(loss_fn)(state["params"], p) for p in parts))
      loss, grads = sum(losses) / CHAINS, jax.tree.map(lambda *g: sum(g) / CHAINS, *grads)
      updates, opt = tx.update(grads, state["opt"], state["params"])
      return dict(params=jax.tree.map(jnp.add, state["params"], updates), opt=opt), loss

    update = jax.jit(update, in_shardings=(shardings, parallel.batch_sharding(mesh)),
                     out_shardings=(shardings, None), donate_argnums=0 if DONATE else ())
    with parallel.activate(mesh, rules):
      compiled = update.lower(state, batch).compile()
    holder = [state]

    def step():
      holder[0], loss = compiled(holder[0], batch)
      return loss
    out = count(state["params"]), step, compiled

  elif row == "sd":
    model = unet.UNetModel(**{**unet.preset("sd15"), **(model_kw or {})})
    rng = np.random.default_rng(0)
    z = jnp.asarray(rng.standard_normal((1, SD_LATENT, SD_LATENT, 4), np.float32))
    t = jnp.array([500], jnp.int32)
    ctx = jnp.asarray(rng.standard_normal((1, SD_TOKENS, 768), np.float32))
    params = common.hash_params(lambda: model.init(jax.random.key(0), z, t, ctx))
    compiled = jax.jit(model.apply).lower(params, z, t, ctx).compile()
    out = count(params), lambda: compiled(params, z, t, ctx), compiled

  elif row == "vae":
    model = autoencoder.AutoencoderKL(**autoencoder.preset("kl", 8), **(model_kw or {}))
    z = jnp.asarray(np.random.default_rng(0).standard_normal(
        (1, VAE_LATENT, VAE_LATENT, 4), np.float32))
    init = lambda: model.init(jax.random.key(0), z, method="decode")
    params = common.hash_params(init)
    compiled = jax.jit(lambda p, z: model.apply(p, z, method="decode")).lower(params, z).compile()
    out = count(params), lambda: compiled(params, z), compiled

  elif row == "text":
    model = text.CLIPTextTransformer(**text.clip_preset("sd15"), **(model_kw or {}))
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 49408, (1, 77)), jnp.int32)
    params = common.hash_params(lambda: model.init(jax.random.key(0), ids))
    compiled = jax.jit(model.apply).lower(params, ids).compile()
    out = count(params), lambda: compiled(params, ids), compiled
  else:
    raise ValueError(f"unknown row {row!r}")
  return out if return_compiled else out[:2]


def torch_side(row: str, threads: int, adamw: str):
  """Builds the PyTorch side of `row`; returns (parameter count, step callable)."""
  import torch
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  count = lambda m: sum(p.numel() for p in m.parameters())
  nchw = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).contiguous()
  if row in ("tiny", "tiny2"):
    import diffusers
    model = diffusers.UNet2DConditionModel(**TINY_TORCH).train()
    kw = {} if adamw == "default" else {adamw: True}
    opt = torch.optim.AdamW(model.parameters(), lr=LR, **kw)
    b = _tiny_batch()
    z0, eps, ctx = nchw(b["z0"]), nchw(b["eps"]), torch.from_numpy(b["ctx"])
    t = torch.from_numpy(b["t"]).long()
    a = torch.from_numpy(_noise_schedule())[t][:, None, None, None]

    def step():
      z_t = a.sqrt() * z0 + (1 - a).sqrt() * eps
      loss = torch.nn.functional.mse_loss(model(z_t, t, encoder_hidden_states=ctx).sample, eps)
      opt.zero_grad(set_to_none=True)
      loss.backward()
      opt.step()
      return loss.item()
    return count(model), step

  if row == "sd":
    import diffusers
    model = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768,
                                           attention_head_dim=8).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, SD_LATENT, SD_LATENT, generator=g)
    ctx = torch.randn(1, SD_TOKENS, 768, generator=g)
    t = torch.tensor([500])

    def step():
      with torch.inference_mode():
        return model(z, t, encoder_hidden_states=ctx).sample
    return count(model), step

  if row == "vae":
    import diffusers
    model = diffusers.AutoencoderKL(**VAE_TORCH).eval()
    del model.encoder, model.quant_conv  # decode only; the count is the decoder's
    z = torch.randn(1, 4, VAE_LATENT, VAE_LATENT, generator=torch.Generator().manual_seed(0))

    def step():
      with torch.inference_mode():
        return model.decode(z).sample
    return count(model), step

  if row == "text":
    import transformers
    cfg = transformers.CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                      num_hidden_layers=12, num_attention_heads=12,
                                      max_position_embeddings=77, hidden_act="quick_gelu")
    model = transformers.CLIPTextModel(cfg).eval()
    ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(0))

    def step():
      with torch.inference_mode():
        return model(ids).last_hidden_state
    return count(model), step
  raise ValueError(f"unknown row {row!r}")


# -- the process protocol -------------------------------------------------------------------
_TAG = "@@peer "


def serve(build, block=lambda x: x):
  """The worker's side: `build()` -> (parameter count, step); then one timed step per
  'step' line on stdin until 'quit', each answered with its seconds on stdout."""
  t0 = time.perf_counter()
  n, step = build()
  print(_TAG + json.dumps(dict(params=n, build_s=time.perf_counter() - t0)), flush=True)
  for line in sys.stdin:
    if line.strip() == "quit":
      return
    t0 = time.perf_counter()
    block(step())
    print(_TAG + json.dumps(dict(t=time.perf_counter() - t0)), flush=True)


def worker(args):
  if args.cores < os.cpu_count():  # before either runtime sizes its thread pool
    os.sched_setaffinity(0, range(args.cores))
  if args.worker == "jax":
    import jax
    serve(lambda: jax_side(args.row), jax.block_until_ready)
  else:
    serve(lambda: torch_side(args.row, args.cores, args.torch_adamw))


class Worker:
  """A child process that builds a step, then times one step per request ('step')."""

  def __init__(self, name: str, argv: list, env: dict = None):
    self.name = name
    self.p = subprocess.Popen([sys.executable] + argv, stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})

  def read(self) -> dict:
    for line in self.p.stdout:
      if line.startswith(_TAG):
        return json.loads(line[len(_TAG):])
    raise RuntimeError(f"the {self.name} worker exited (code {self.p.wait()})")

  def step(self) -> float:
    self.p.stdin.write("step\n")
    self.p.stdin.flush()
    return self.read()["t"]

  def close(self):
    if self.p.poll() is None:
      self.p.stdin.write("quit\n")
      self.p.stdin.close()
      self.p.wait()


def interleave(workers, warmup: int, steps: int) -> dict:
  """{worker name: [seconds of each timed step]}, the workers asked in turn, the order
  reversed every round (ABBA...), so drift in the machine's load hits all alike."""
  for _ in range(warmup):
    for w in workers:
      w.step()
  times = {w.name: [] for w in workers}
  for i in range(steps):
    for w in (workers if i % 2 == 0 else workers[::-1]):
      times[w.name].append(w.step())
  return times


def compare(args, row):
  """Both sides of `row`, timed interleaved; returns the table row."""
  workers, info = [], {}
  try:
    for side in ("jax", "torch"):  # built one after the other: building is not timed
      workers.append(Worker(side, [os.path.abspath(__file__), "--worker", side, "--row", row,
                                   "--cores", str(args.cores), "--torch_adamw", args.torch_adamw]))
      info[side] = workers[-1].read()
    if info["jax"]["params"] != info["torch"]["params"]:
      raise AssertionError(f"{row}: ldm_jax has {info['jax']['params']:,} parameters, "
                           f"PyTorch {info['torch']['params']:,}")
    times = interleave(workers, args.warmup, args.steps)
  finally:
    for w in workers:
      w.close()
  tj, tt = statistics.median(times["jax"]), statistics.median(times["torch"])
  pairs = sorted(b / a for a, b in zip(times["jax"], times["torch"]))
  print(f"  {row}: ldm_jax {tj:.4g} s, torch {tt:.4g} s, {tt / tj:.2f}x "
        f"(pairs {pairs[0]:.2f}-{pairs[-1]:.2f}; build jax {info['jax']['build_s']:.0f} s, "
        f"torch {info['torch']['build_s']:.0f} s)", flush=True)
  return [ROWS[row], f"{info['jax']['params']:,}", tj, tt, tt / tj, statistics.median(pairs)]


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  import diffusers
  import torch
  import transformers
  rows = args.rows.split(",")
  for r in rows:
    if r not in ROWS:
      raise SystemExit(f"--rows: unknown row {r!r}; choose from {list(ROWS)}")
  print(common.machine_line())
  print(f"torch {torch.__version__} ({args.cores} threads, AdamW {args.torch_adamw}), "
        f"diffusers {diffusers.__version__}, transformers {transformers.__version__}; "
        f"{args.warmup} warm-up + {args.steps} timed steps, interleaved", flush=True)
  out = [compare(args, r) for r in rows]
  common.print_table(["work", "parameters", "ldm_jax s", "PyTorch s", "ldm_jax speed",
                      "median of paired ratios"], out,
                     title="ldm_jax vs PyTorch (diffusers / transformers), float32, median step")


if __name__ == "__main__":
  main()
