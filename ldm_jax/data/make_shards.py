"""python -m ldm_jax.data.make_shards --images DIR [--captions captions.jsonl] --out DIR --shard_size N

A folder of images and their captions -> webdataset shards in the layout
img2dataset writes, which is what the reader (`config.data.source = 'wds'`) takes:
`{out}/00000.tar`, `00001.tar`, ... each holding, per image, `KEY.jpg` (or `.png`,
`.webp`), `KEY.txt` (the caption) and `KEY.json` (key, url, caption, status, width,
height, original_width, original_height, and any other fields of the caption
line), with KEY the image's index in sorted path order as `%09d`.

Captions come from a jsonl file, one object a line naming the image relative to
DIR ({"file_name": "cats/001.jpg", "text": "a cat"}; "caption" works for "text",
the same file as Hugging Face's imagefolder `metadata.jsonl`), or else from a
sidecar text file beside each image (`cats/001.txt`). Images are walked in
sorted order and written byte for byte (JPEG, PNG and WebP; other formats PIL
reads become PNG), so the same folder gives the same shards. Images that do not
decode are skipped and counted. DIR and OUT are local folders or fsspec URLs
(gs://bucket/shards).
"""
import argparse
import io
import json
import posixpath
import sys
import tarfile
from typing import Optional

import fsspec
from PIL import Image
from tqdm import tqdm

from ldm_jax.data import decode
from ldm_jax.data.shards import add_member

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
_KEEP = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}  # PIL format -> stored as is


def read_captions(url: str) -> dict:
  """{image path relative to the images folder: its jsonl line} of a captions file.

  Raises:
    ValueError: naming the file and line of a line that is not a json object with
      a string 'file_name'.
  """
  out = {}
  with fsspec.open(url, "rt", encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        row = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{url}:{n}: not json ({e})") from e
      if not isinstance(row, dict) or not isinstance(row.get("file_name"), str):
        raise ValueError(f"{url}:{n}: needs an object with a 'file_name' string")
      out[posixpath.normpath(row["file_name"])] = row
  return out


def encode(data: bytes) -> Optional[tuple]:
  """(extension, bytes to store, (width, height)) of an image file, or None when it
  does not decode. JPEG / PNG / WebP bytes are kept; other formats become PNG."""
  try:
    img = Image.open(io.BytesIO(data))
    fmt = img.format
    img.load()
  except Exception:  # PIL raises many types for bad files, DecompressionBombError too
    return None
  if fmt in _KEEP:
    return _KEEP[fmt], data, img.size
  buf = io.BytesIO()
  decode.to_rgb(img).save(buf, format="PNG")
  return "png", buf.getvalue(), img.size


class _ShardWriter:
  """Samples into `{out}/00000.tar`, ...; each shard is written under a temporary
  name and renamed when complete, so a reader never sees half a shard."""

  def __init__(self, out: str, shard_size: int):
    self.fs, self.root = fsspec.core.url_to_fs(out)
    self.fs.makedirs(self.root, exist_ok=True)
    self.out, self.shard_size = out.rstrip("/"), shard_size
    self.shards, self.in_shard, self._file, self._tar = 0, 0, None, None

  def _path(self, i: int) -> str:
    return posixpath.join(self.root, f"{i:05d}.tar")

  def add(self, members: list) -> None:
    if self._tar is None:
      self._file = self.fs.open(self._path(self.shards) + ".tmp", "wb")
      self._tar = tarfile.open(fileobj=self._file, mode="w|")
    for name, data in members:
      add_member(self._tar, name, data)
    self.in_shard += 1
    if self.in_shard == self.shard_size:
      self._close()

  def _close(self) -> None:
    self._tar.close()
    self._file.close()
    self.fs.mv(self._path(self.shards) + ".tmp", self._path(self.shards))
    self._tar, self._file, self.shards, self.in_shard = None, None, self.shards + 1, 0

  def close(self) -> str:
    """Finishes the last shard; returns the brace pattern of all ('' if none)."""
    if self._tar is not None:
      self._close()
    return f"{self.out}/{{00000..{self.shards - 1:05d}}}.tar" if self.shards else ""


def write_shards(images: str, out: str, *, captions: Optional[str] = None,
                 shard_size: int = 1000, progress: bool = True) -> tuple[str, dict]:
  """Writes the images under `images` as shards into `out` (see the module docstring).

  Args:
    images: a folder (local or fsspec URL), walked recursively.
    out: the folder for the shards (local or fsspec URL).
    captions: a jsonl file of {"file_name", "text" | "caption", ...}; None to read
      a sidecar .txt beside each image.
    shard_size: samples per shard.
    progress: show a tqdm progress bar.

  Returns:
    (the shards' brace pattern for `config.data.shards`, counts: written, and the
    images skipped as unreadable; no_caption for images written without one;
    missing_image for caption lines naming no image found).
  """
  if shard_size < 1:
    raise ValueError(f"shard_size must be >= 1, got {shard_size}")
  fs, root = fsspec.core.url_to_fs(images)
  if not fs.isdir(root):
    raise ValueError(f"--images {images}: not a folder")
  found = sorted(posixpath.relpath(p, root) for p in fs.find(root))
  paths = [p for p in found if p.lower().endswith(IMAGE_SUFFIXES)]
  if not paths:
    raise ValueError(f"--images {images}: no image files ({', '.join(IMAGE_SUFFIXES)})")
  lines = read_captions(captions) if captions else {}
  texts = set(found) if not captions else set()
  counts = {"written": 0, "unreadable": 0, "no_caption": 0,
            "missing_image": len(set(lines) - set(paths))}
  writer = _ShardWriter(out, shard_size)
  for index, rel in enumerate(tqdm(paths, desc="images", unit="img", disable=not progress)):
    stored = encode(fs.cat_file(posixpath.join(root, rel)))
    if stored is None:
      counts["unreadable"] += 1
      continue
    ext, data, (w, h) = stored
    row = dict(lines.get(rel, {}))
    caption = row.pop("text", None) if "text" in row else row.pop("caption", None)
    row.pop("file_name", None)
    sidecar = posixpath.splitext(rel)[0] + ".txt"
    if not captions and sidecar in texts:
      caption = fs.cat_file(posixpath.join(root, sidecar)).decode("utf-8", "replace").strip()
    if not isinstance(caption, str) or not caption.strip():
      counts["no_caption"] += 1
      caption = None
    key = f"{index:09d}"
    meta = dict(row, key=key, url=rel, caption=caption, status="success", error_message=None,
                width=w, height=h, original_width=w, original_height=h)
    members = [(f"{key}.{ext}", data)]
    if caption is not None:
      members.append((f"{key}.txt", caption.encode("utf-8")))
    members.append((f"{key}.json", json.dumps(meta).encode("utf-8")))
    writer.add(members)
    counts["written"] += 1
  return writer.close(), counts


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--images", required=True, help="folder of images (walked recursively)")
  ap.add_argument("--captions", help="jsonl of {\"file_name\", \"text\"}; default: sidecar .txt")
  ap.add_argument("--out", required=True, help="folder for the shards (local or fsspec URL)")
  ap.add_argument("--shard_size", "--shard-size", type=int, default=1000, help="samples per shard")
  ap.add_argument("--no_progress", action="store_true", help="no progress bar")
  a = ap.parse_args(argv)
  try:
    pattern, counts = write_shards(a.images, a.out, captions=a.captions,
                                   shard_size=a.shard_size, progress=not a.no_progress)
  except (ValueError, FileNotFoundError) as e:
    print(f"make_shards: {e}", file=sys.stderr)
    return 2
  print(f"wrote {counts['written']} samples to {pattern or a.out} "
        f"({', '.join(f'{k} {v}' for k, v in counts.items() if k != 'written')})")
  return 0


if __name__ == "__main__":
  sys.exit(main())
