"""Data throughput: images/s of decode + augment + batch from 256 px JPEG shards,
with 1 decoding worker and with all, beside what the stage-2 step consumes; and
samples/s of reading a latent cache's shards with the shard reader and with Python's
tarfile, and of decoding their samples (`decode.load_npy` against `np.load`).

  python bench/data.py [--num 2000 --resolution 256 --batch 64 --batches 20]

The shards are written once (shapes set, JPEG) into --cache. The consumption rate
is the tiny txt2img update step's examples/s at the same batch (compiled here).
The latent shards (--latents samples of 8x8x3 float16 latents + std + caption +
json, as the tiny default's cache) are written to a temporary folder.
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
  p.add_argument("--latents", type=int, default=10000, help="samples in the latent shards (0 = skip)")
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
  if args.latents:
    tar_reading(args.latents)


def tar_reading(n: int) -> None:
  """Samples/s of grouping a latent cache's tar members by key: `shards.iter_samples`
  (its own header parser) against the same loop over Python's tarfile."""
  import glob
  import tempfile
  import numpy as np
  from ldm_jax.data import latents, shards

  def with_tarfile(url):
    with open(url, "rb") as f:
      yield from shards.group(shards.tarfile_files(f), url)

  with tempfile.TemporaryDirectory() as tmp:
    w = latents.LatentShardWriter(tmp, shard_size=1000)
    z = np.random.default_rng(0).standard_normal((8, 8, 3)).astype(np.float32)
    for i in range(n):
      w.add(z, f"a small red star at the top left on a blue background {i}", label=i % 5,
            std=0.01 * z, meta={"key": f"{i:09d}"})
    w.close()
    urls = sorted(glob.glob(os.path.join(tmp, "*.tar")))
    rows, rates = [], {}
    for name, read in [("tarfile", with_tarfile), ("shards.iter_samples", shards.iter_samples)]:
      best = float("inf")
      for _ in range(3):
        t = time.perf_counter()
        count = sum(1 for url in urls for _ in read(url))
        best = min(best, time.perf_counter() - t)
      assert count == n, (name, count)
      rates[name] = n / best
      rows.append([name, n, round(rates[name]), round(rates[name] / rates["tarfile"], 2)])
    common.print_table(["reader", "samples", "samples/s", "x tarfile"], rows,
                       title="latent-cache shards, 4 members a sample (one thread)")
    decoding([s for url in urls for s in shards.iter_samples(url)])


def decoding(samples: list) -> None:
  """Samples/s of `decode.decode_sample` on latent-cache samples (latent + std + caption
  + json): its `load_npy`, which parses a header once, against np.load on every array."""
  import io
  import threading
  import numpy as np
  from ldm_jax import data
  from ldm_jax.data import decode

  cfg = data.default_config()
  cfg.source = "latents"
  lock, fast = threading.Lock(), decode.load_npy

  def np_load(raw):  # np.load under the pool's lock, as the reader did before load_npy
    with lock:
      return np.load(io.BytesIO(raw)).astype(np.float32)

  rows, rates = [], {}
  for name, load in [("np.load", np_load), ("decode.load_npy", fast)]:
    decode.load_npy = load
    try:
      best = float("inf")
      for _ in range(3):
        t = time.perf_counter()
        for i, s in enumerate(samples):
          decode.decode_sample(s, cfg, np.random.default_rng(i), {})
        best = min(best, time.perf_counter() - t)
    finally:
      decode.load_npy = fast
    rates[name] = len(samples) / best
    rows.append([name, len(samples), round(rates[name]), round(rates[name] / rates["np.load"], 2)])
  common.print_table(["arrays read by", "samples", "samples/s", "x np.load"], rows,
                     title="latent-cache samples decoded (one thread)")


def step_rate(batch: int) -> float:
  """Examples/s of the tiny txt2img update step at `batch` (bench/train.py's (a))."""
  import train as bench_train
  args = bench_train.parse_args(["--skip_sd", "--batch", str(batch), "--data_batches", "0"])
  row, _ = bench_train.bench_tiny(args, peak=1.0)
  return row[5]  # batch / median step seconds


if __name__ == "__main__":
  main()
