"""python -m ldm_jax.data.make_shapes --out DIR --num N --resolution R

Writes the embedded shapes dataset as webdataset shards (key.png + key.txt +
key.json + key.seg.png, the semantic map that configs/layout.py conditions on),
the same format LAION data comes in, so the default run streams
through exactly the path real data takes.
"""
import argparse
import io
import json
import os
import shutil
import tarfile
import tempfile
import time

from PIL import Image

from ldm_jax.data import shapes
from ldm_jax.data.shards import add_member


def write_shards(out: str, num: int, resolution: int, *, seed: int = 0, split: str = "train",
                 shard_size: int = 1000, image_format: str = "png") -> str:
  """Writes shapes-00000.tar ... into `out`; returns the brace pattern of the shards."""
  os.makedirs(out, exist_ok=True)
  n_shards = max(1, -(-num // shard_size))
  ext = "jpg" if image_format == "jpeg" else "png"
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
    os.replace(tmp, path)
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


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--out", required=True, help="folder for the shards")
  ap.add_argument("--num", type=int, default=20000, help="examples")
  ap.add_argument("--resolution", type=int, default=64, help="pixels per side (32..256)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--split", default="train", choices=shapes.SPLITS)
  ap.add_argument("--shard-size", type=int, default=1000)
  ap.add_argument("--format", default="png", choices=("png", "jpeg"))
  a = ap.parse_args()
  if not 32 <= a.resolution <= 256:
    ap.error(f"--resolution {a.resolution} must be in 32..256")
  t = time.time()
  pattern = write_shards(a.out, a.num, a.resolution, seed=a.seed, split=a.split,
                         shard_size=a.shard_size, image_format=a.format)
  print(f"wrote {a.num} examples to {pattern} in {time.time() - t:.1f} s")


if __name__ == "__main__":
  main()
