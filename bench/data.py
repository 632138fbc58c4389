"""Data throughput: images/s of decode + augment + batch from 256 px JPEG shards,
with 1 decoding worker and with all, beside what the stage-2 step consumes.

  python bench/data.py [--num 2000 --resolution 256 --batch 64 --batches 20]

The shards are written once (shapes set, JPEG) into --cache. The consumption rate
is the tiny txt2img update step's examples/s at the same batch (compiled here).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--num", type=int, default=2000, help="examples in the JPEG shards")
  p.add_argument("--resolution", type=int, default=256)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--batches", type=int, default=15, help="timed batches per setting")
  p.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax", "bench"))
  p.add_argument("--skip_step", action="store_true", help="do not time the stage-2 step")
  args = p.parse_args()

  from ldm_jax import data
  from ldm_jax.data import make_shapes
  out = os.path.join(args.cache, f"jpeg{args.resolution}-{args.num}")
  if not os.path.isdir(out):
    t = time.time()
    make_shapes.write_shards(out, args.num, args.resolution, shard_size=500, image_format="jpeg")
    print(f"wrote {args.num} JPEG examples in {time.time() - t:.1f} s")
  pattern = os.path.join(out, "shapes-{%05d..%05d}.tar" % (0, -(-args.num // 500) - 1))
  rows = []
  for workers in sorted({1, os.cpu_count() or 1}):
    c = data.default_config()
    c.source, c.shards, c.resolution, c.workers = "wds", pattern, args.resolution // 2, workers
    c.crop, c.flip = "random", True  # resize 256 -> 128 + random crop + flip: real augmentation work
    it = data.make_iterator(c, batch_size=args.batch)
    next(it)
    t = time.time()
    for _ in range(args.batches):
      next(it)
    rate = args.batches * args.batch / (time.time() - t)
    rows.append([f"{workers}", f"{args.resolution} px JPEG -> {c.resolution}", args.batch,
                 round(rate, 1)])
  if not args.skip_step:
    rows.append(["-", "stage-2 tiny step consumes", args.batch, round(step_rate(args.batch), 1)])
  common.print_table(["workers", "what", "batch", "images/s"], rows,
                     title=f"data pipeline ({os.cpu_count()} CPU cores)")


def step_rate(batch: int) -> float:
  """Examples/s of the tiny txt2img update step at `batch` (bench/train.py's (a))."""
  import train as bench_train
  args = bench_train.parse_args(["--skip_sd", "--batch", str(batch), "--data_batches", "0"])
  row, _ = bench_train.bench_tiny(args, peak=1.0)
  return row[5]  # batch / median step seconds


if __name__ == "__main__":
  main()
