"""One change at a time against ldm_jax's default, on a bench/peer.py row, on the CPU.

  python bench/levers.py                         # every lever on the tiny UNet train step
  python bench/levers.py --levers xla_conv,devices_2 --steps 11
  python bench/levers.py --row sd --levers xla_conv,attention_xla --steps 3
  python bench/levers.py --row tiny2 --levers fsdp_2    # against the 2-device step

The default (the library as it is) runs in one worker process for the whole run; each
lever runs in a second process beside it (XLA flags and the device count are fixed
when a process starts its backend), and the two are timed one step at a time in
turn (ABBA), so both see the same load on a shared machine. Each line: the default's
median step, the lever's, and speed = default / lever (> 1: the lever is faster).
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import peer  # noqa: E402

# name -> (what it changes, kwargs: row, XLA flags, in-process setup, model kwargs)
LEVERS = {
    "xla_conv": ("convolutions: XLA's convolution at every size (no im2col matmuls)",
                 dict(setup="xla_conv")),
    "im2col_4096": ("convolutions: im2col matmuls up to 4096 GEMM rows (the default: 256)",
                    dict(setup="im2col_4096")),
    "attention_xla": ("attention: jax.nn.dot_product_attention's XLA kernel",
                      dict(model_kw={"attention": "xla"})),
    "devices_2": ("2 CPU devices, the batch split over them (python -m ldm_jax.train's split)",
                  dict(row="tiny2")),
    "fsdp_2": ("2 CPU devices as an fsdp axis: weights, gradients and AdamW's update split over them",
               dict(row="tiny2", setup="fsdp_2")),
    "chains_2": ("the batch as two independent half-batch gradient computations, summed "
                 "(XLA's runtime may run them side by side)", dict(setup="chains_2")),
    "groupnorm_flax": ("GroupNorm: flax's nn.GroupNorm, SiLU after it, both differentiated by JAX",
                       dict(setup="groupnorm_flax")),
    "no_donate": ("train state not donated (no in-place update)", dict(setup="no_donate")),
    "precision_highest": ("jax_default_matmul_precision=highest", dict(setup="precision_highest")),
    "onednn": ("XLA flag --xla_cpu_use_onednn=true", dict(flags="--xla_cpu_use_onednn=true")),
    "xnn_graph": ("XLA flag --xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY",
                  dict(flags="--xla_cpu_experimental_xnn_graph_fusion_mode="
                             "XNN_GRAPH_FUSION_MODE_GREEDY")),
    "ynn_conv": ("XLA flag --xla_cpu_experimental_ynn_fusion_type=+individual_convolution",
                 dict(flags="--xla_cpu_experimental_ynn_fusion_type=+individual_convolution")),
    "fast_math": ("XLA flag --xla_cpu_enable_fast_math=true",
                  dict(flags="--xla_cpu_enable_fast_math=true")),
    "multi_output_fusion": ("XLA flag --xla_cpu_use_multi_output_fusion=true",
                            dict(flags="--xla_cpu_use_multi_output_fusion=true")),
    "concurrency_scheduler": ("XLA flag --xla_cpu_enable_concurrency_optimized_scheduler=true",
                              dict(flags="--xla_cpu_enable_concurrency_optimized_scheduler=true")),
    "legacy_emitters": ("XLA flag --xla_cpu_use_fusion_emitters=false (LLVM IR fusion emitters)",
                        dict(flags="--xla_cpu_use_fusion_emitters=false")),
    "single_thread_eigen": ("XLA flag --xla_cpu_multi_thread_eigen=false",
                            dict(flags="--xla_cpu_multi_thread_eigen=false")),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--row", default="tiny", choices=("tiny", "tiny2", "sd", "vae", "text"))
  p.add_argument("--levers", default=",".join(LEVERS), help=f"comma list of {list(LEVERS)}")
  p.add_argument("--steps", type=int, default=9, help="timed steps of each side per lever")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # 'default' or a lever
  return p.parse_args(argv)


def _setup(name: str):
  """In-process changes of a lever, applied before anything is traced."""
  import jax
  if name == "xla_conv":
    from ldm_jax.models import layers
    layers.conv2d = jax.lax.conv_general_dilated
  elif name == "im2col_4096":
    from ldm_jax.models import layers
    layers.IM2COL_MAX_ROWS = 4096
  elif name == "groupnorm_flax":
    from ldm_jax.models import layers
    layers.GroupNorm = common.flax_group_norm
  elif name == "fsdp_2":
    peer.MESH = (("data", 1), ("fsdp", 2), ("tensor", 1))
  elif name == "chains_2":
    peer.CHAINS = 2
  elif name == "no_donate":
    peer.DONATE = False
  elif name == "precision_highest":
    jax.config.update("jax_default_matmul_precision", "highest")


def worker(args):
  import jax
  lever = LEVERS.get(args.worker, ("", {}))[1]
  row = lever.get("row", args.row)
  _setup(lever.get("setup", ""))
  peer.serve(lambda: peer.jax_side(row, model_kw=lever.get("model_kw")), jax.block_until_ready)


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    return worker(args)
  names = args.levers.split(",")
  for n in names:
    if n not in LEVERS:
      raise SystemExit(f"--levers: unknown lever {n!r}; choose from {list(LEVERS)}")
  print(common.machine_line())
  print(f"row: {peer.ROWS[args.row]}; {args.warmup} warm-up + {args.steps} timed steps per "
        "lever, interleaved with the default", flush=True)
  spawn = lambda name, flags="": peer.Worker(
      name, [os.path.abspath(__file__), "--worker", name, "--row", args.row],
      env={"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()})
  base = spawn("default")
  base.read()
  rows = []
  try:
    for n in names:
      what, kw = LEVERS[n]
      lever = spawn(n, kw.get("flags", ""))
      try:
        lever.read()
        times = peer.interleave([base, lever], args.warmup, args.steps)
      except RuntimeError as e:  # e.g. a flag this XLA does not know
        print(f"  {n}: did not run ({e})", flush=True)
        continue
      finally:
        lever.close()
      tb, tl = statistics.median(times["default"]), statistics.median(times[n])
      pairs = statistics.median(b / a for a, b in zip(times[n], times["default"]))
      print(f"  {n}: default {tb:.4g} s, lever {tl:.4g} s, speed {tb / tl:.2f}x", flush=True)
      rows.append([n, what, tb, tl, tb / tl, pairs])
  finally:
    base.close()
  common.print_table(["lever", "change", "default s", "lever s", "speed", "median of paired ratios"],
                     rows, title=f"One change at a time: {peer.ROWS[args.row]} (median step)")


if __name__ == "__main__":
  main()
