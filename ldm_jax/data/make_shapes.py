"""python -m ldm_jax.data.make_shapes --out DIR --num N --resolution R

Writes the embedded shapes dataset as webdataset shards (key.png + key.txt +
key.json + key.seg.png, the semantic map that configs/layout.py conditions on),
the same format LAION data comes in, so the default run streams
through exactly the path real data takes.
"""
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

from absl import app, flags
from PIL import Image
from tqdm import tqdm

from ldm_jax import cli
from ldm_jax.data import shapes
from ldm_jax.data.shards import add_member

FLAGS = flags.FLAGS


def write_shards(out: str, num: int, resolution: int, *, seed: int = 0, split: str = "train",
                 shard_size: int = 1000, image_format: str = "png") -> str:
  """Writes shapes-00000.tar ... into `out`; returns the brace pattern of the shards."""
  os.makedirs(out, exist_ok=True)
  n_shards = max(1, -(-num // shard_size))
  ext = "jpg" if image_format == "jpeg" else "png"
  bar = tqdm(total=num, desc="shapes", unit="img")
  for s in range(n_shards):
    path = os.path.join(out, f"shapes-{s:05d}.tar")
    tmp = path + ".tmp"
    with tarfile.open(tmp, "w") as tar:
      for i in range(s * shard_size, min(num, (s + 1) * shard_size)):
        img, cap, meta = shapes.example(seed, i, resolution, split)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG" if ext == "jpg" else "PNG",
                                  **({"quality": 95} if ext == "jpg" else {}))
        key = f"{i:08d}"
        meta = dict(meta, width=resolution, height=resolution)
        add_member(tar, f"{key}.{ext}", buf.getvalue())
        add_member(tar, f"{key}.txt", cap.encode())
        add_member(tar, f"{key}.json", json.dumps(meta).encode())
        seg = io.BytesIO()  # the layout / semantic map (configs/layout.py)
        Image.fromarray(shapes.layout_map(shapes.sample_attrs(seed, i, split), resolution)
                        ).save(seg, format="PNG")
        add_member(tar, f"{key}.seg.png", seg.getvalue())
        bar.update()
    os.replace(tmp, path)
  bar.close()
  return os.path.join(out, "shapes-{%05d..%05d}.tar" % (0, n_shards - 1))


def ensure_shapes_shards(cache_dir: str, num: int, resolution: int, seed: int = 0,
                         split: str = "train", shard_size: int = 1000) -> str:
  """The shard pattern of the shapes set with these arguments, written on first use.

  Written into a temporary folder and renamed when complete, so an interrupted
  write is never read and concurrent processes do not collide.
  """
  name = f"shapes-v{shapes.VERSION}-r{resolution}-n{num}-s{seed}-{split}-k{shard_size}"
  final = os.path.join(cache_dir, name)
  n_shards = max(1, -(-num // shard_size))
  pattern = os.path.join(final, "shapes-{%05d..%05d}.tar" % (0, n_shards - 1))
  if os.path.isdir(final):
    return pattern
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=name + ".tmp", dir=cache_dir)
  write_shards(tmp, num, resolution, seed=seed, split=split, shard_size=shard_size)
  try:
    os.rename(tmp, final)
  except OSError:  # another process finished first
    shutil.rmtree(tmp, ignore_errors=True)
  return pattern


def _define_flags():
  """The command line's flags, defined only when this module is the program: training
  imports it too, beside entry points with flags of the same names (--num, --out)."""
  flags.DEFINE_string("out", None, "Folder for the shards.")
  flags.DEFINE_integer("num", 20000, "Examples.")
  flags.DEFINE_integer("resolution", 64, "Pixels per side (32..256).")
  flags.DEFINE_integer("seed", 0, "Seed of the examples.")
  flags.DEFINE_enum("split", "train", shapes.SPLITS, "Which attribute combinations.")
  flags.DEFINE_integer("shard_size", 1000, "Examples per shard.")
  flags.DEFINE_alias("shard-size", "shard_size")
  flags.DEFINE_enum("format", "png", ["png", "jpeg"], "Image format in the shards.")


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError("--out is required: the folder for the shards")
  if not 32 <= FLAGS.resolution <= 256:
    raise app.UsageError(f"--resolution={FLAGS.resolution}: must be in 32..256")
  for name in ("num", "shard_size"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value}: must be at least 1")
  t = time.time()
  pattern = write_shards(FLAGS.out, FLAGS.num, FLAGS.resolution, seed=FLAGS.seed, split=FLAGS.split,
                         shard_size=FLAGS.shard_size, image_format=FLAGS.format)
  print(f"wrote {FLAGS.num} examples to {pattern} in {time.time() - t:.1f} s")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
