"""The attention kernels side by side: XLA's, the explicit heads-major form and cuDNN's.

  python bench/attention.py                  # SD-1.x / SD-2.x attention shapes, bf16
  python bench/attention.py --batch 1 --dtype float32

For each shape (batch, query tokens, key tokens, heads x head size) it times
`multi_head_attention` forward + backward with `implementation=K` for K = xla,
explicit, cudnn and auto, and prints the largest difference of the output and of
dq from a float32 XLA reference, scaled by that reference's largest value. cuDNN
runs only on a GPU (bf16/fp16); elsewhere its rows say why it did not run, and
auto is the explicit form.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

# (name, query tokens, key tokens, heads, head size): SD 1.x at a 64x64 latent (512 px)
# has 320-channel self-attention with 8 heads of 40 and cross-attention on 77 CLIP
# tokens; SD 2.x at 96x96 (768 px) 5 heads of 64.
SHAPES = (("sd15 self 64x64", 4096, 4096, 8, 40),
          ("sd15 cross 64x64", 4096, 77, 8, 40),
          ("sd15 self 32x32 (640 ch)", 1024, 1024, 8, 80),
          ("sd15 self 16x16 (1280 ch)", 256, 256, 8, 160),
          ("sd2 self 96x96", 9216, 9216, 5, 64))


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=2)
  p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
  p.add_argument("--repeats", type=int, default=10)
  p.add_argument("--shapes", default="", help="comma list of shape names to keep (default all)")
  return p.parse_args(argv)


def main(argv=None):
  args = parse_args(argv)
  import jax
  import jax.numpy as jnp
  from ldm_jax.models import attention

  print(common.machine_line())
  dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  rows, notes = [], []
  for name, n, m, heads, d in SHAPES:
    if args.shapes and name not in args.shapes.split(","):
      continue
    kq, kk, kv, kg = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(kq, (args.batch, n, heads * d))
    k = jax.random.normal(kk, (args.batch, m, heads * d))
    v = jax.random.normal(kv, (args.batch, m, heads * d))
    g = jax.random.normal(kg, (args.batch, n, heads * d))

    def fwd_bwd(q, k, v, dt, impl):
      o, vjp = jax.vjp(lambda q: attention.multi_head_attention(
          q, k, v, heads, dtype=dt, implementation=impl), q)
      return o, vjp(g.astype(o.dtype))[0]

    ref_o, ref_dq = jax.jit(lambda q, k, v: fwd_bwd(q, k, v, jnp.float32, "xla"))(q, k, v)
    scale_o, scale_dq = float(jnp.abs(ref_o).max()), float(jnp.abs(ref_dq).max())
    base = None
    for impl in ("xla", "explicit", "cudnn", "auto"):
      try:
        compiled, compile_s = common.compile_timed(
            jax.jit(lambda q, k, v: fwd_bwd(q, k, v, dtype, impl)), q, k, v)
        o, dq = compiled(q, k, v)
      except Exception as e:  # cuDNN off a GPU, or shapes it refuses
        notes.append(f"{name}, {impl}: did not run ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
        continue
      t = common.time_calls(lambda: compiled(q, k, v), warmup=1, repeats=args.repeats)
      base = base or t.median
      err_o = float(jnp.abs(o.astype(jnp.float32) - ref_o).max()) / scale_o
      err_dq = float(jnp.abs(dq.astype(jnp.float32) - ref_dq).max()) / scale_dq
      rows.append([name, f"{heads}x{d}", impl, compile_s, t.median * 1e3, base / t.median,
                   err_o, err_dq])
  common.print_table(["shape", "heads", "kernel", "compile s", "fwd+bwd ms", "speed vs xla",
                      "max |o - ref| / max|ref|", "max |dq - ref| / max|ref|"],
                     rows, title=f"attention forward + backward, batch {args.batch}, {args.dtype}")
  for line in notes:
    print(line)


if __name__ == "__main__":
  main()
