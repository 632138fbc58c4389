"""Bytes -> model inputs: image decoding in any PIL mode, resize / crop / flip,
captions, labels, and the LAION metadata filters. Every failure is a `Skip`
naming its kind, which the pipeline counts instead of crashing; metadata is
untrusted (a json number may be Infinity, a string, or too large for an int)."""
import io
import json
import math
import threading
from typing import Optional

import numpy as np
from PIL import Image

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class Skip(Exception):
  """A sample that is left out; `kind` is the counter it goes to."""

  def __init__(self, kind: str, detail: str = ""):
    super().__init__(f"{kind}: {detail}")
    self.kind = kind


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB: 16-bit and float scaled to 8 bit, alpha composited on white."""
  if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
    a = np.asarray(img, np.float32)
    hi = 65535.0 if img.mode.startswith("I;16") or a.max() > 255 else 255.0
    img = Image.fromarray(np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("RGBA", "LA", "PA"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    img = Image.alpha_composite(white, rgba)
  return img.convert("RGB")


def decode_image(data: bytes, max_side: int = 0, max_pixels: int = 0) -> Image.Image:
  """An RGB image of encoded bytes.

  Args:
    data: the file's bytes (any format PIL reads).
    max_side, max_pixels: caps checked on the header's size before the pixels are
      decoded (0 = no cap): a PNG of a few hundred bytes can hold a 1 x 200000 image.

  Raises:
    Skip: 'corrupt_image', or 'image_too_large' past a cap (or PIL's own bomb guard).
  """
  if not data:
    raise Skip("corrupt_image", "zero-byte image")
  try:
    img = Image.open(io.BytesIO(data))  # reads the header only
  except Image.DecompressionBombError as e:
    raise Skip("image_too_large", str(e)) from e
  except Exception as e:  # PIL raises many types for bad files
    raise Skip("corrupt_image", str(e)) from e
  w, h = img.size
  if (max_side and max(w, h) > max_side) or (max_pixels and w * h > max_pixels):
    raise Skip("image_too_large", f"{w}x{h} past max_image_side={max_side} / "
               f"max_image_pixels={max_pixels}")
  try:
    img.load()
  except Exception as e:
    raise Skip("corrupt_image", str(e)) from e
  return to_rgb(img)


def crop_geometry(size: tuple, resolution: int, crop: str, flip: bool,
                  rng: np.random.Generator) -> tuple:
  """(resized w, h, crop x0, y0, flipped) for an image of `size`: drawn once per
  sample so that an image and its layout map get the same crop and flip."""
  w, h = size
  s = resolution / min(w, h)
  nw, nh = max(resolution, round(w * s)), max(resolution, round(h * s))
  if crop == "random":
    x0, y0 = int(rng.integers(0, nw - resolution + 1)), int(rng.integers(0, nh - resolution + 1))
  else:
    x0, y0 = (nw - resolution) // 2, (nh - resolution) // 2
  return nw, nh, x0, y0, bool(flip and rng.random() < 0.5)


def apply_geometry(img: Image.Image, geometry: tuple, resolution: int,
                   nearest: bool = False) -> np.ndarray:
  """Resizes, crops and flips `img` as `geometry` says. Label maps use `nearest`
  so that no new (in-between) classes appear at their edges.

  Only the crop is resampled: resizing the whole image first costs the resized
  size, which for a 1 x 3000 image at 256 is 256 x 768000 pixels. Filters go
  through PIL's resize `box` (they still reach the pixels around it); `nearest`
  takes the source pixel under each output pixel's centre, in integers (PIL's
  nearest steps in 16.16 fixed point).
  """
  nw, nh, x0, y0, flipped = geometry
  w, h = img.size
  if (nw, nh) == (w, h):
    a = np.asarray(img.crop((x0, y0, x0 + resolution, y0 + resolution)))
  elif nearest:
    cols = ((2 * np.arange(x0, x0 + resolution) + 1) * w) // (2 * nw)
    rows = ((2 * np.arange(y0, y0 + resolution) + 1) * h) // (2 * nh)
    a = np.asarray(img)[rows][:, cols]
  else:
    sx, sy = w / nw, h / nh
    a = np.asarray(img.resize(
        (resolution, resolution), Image.BICUBIC if nw > w else Image.LANCZOS,
        box=(x0 * sx, y0 * sy, (x0 + resolution) * sx, (y0 + resolution) * sy)))
  return a[:, ::-1] if flipped else a


def resize_crop(img: Image.Image, resolution: int, crop: str, flip: bool,
                rng: np.random.Generator) -> tuple[np.ndarray, bool]:
  """Shorter side -> resolution (antialiased), then a centre or random square crop.

  Returns:
    (uint8 HxWx3, whether the image had to be upscaled).
  """
  geometry = crop_geometry(img.size, resolution, crop, flip, rng)
  return apply_geometry(img, geometry, resolution), min(img.size) < resolution


def read_text(data: Optional[bytes], counts: dict) -> Optional[str]:
  if data is None:
    return None
  try:
    return data.decode("utf-8").strip()
  except UnicodeDecodeError:
    counts["caption_not_utf8"] = counts.get("caption_not_utf8", 0) + 1
    return data.decode("utf-8", errors="replace").strip()


def read_json(data: Optional[bytes], counts: dict) -> dict:
  """The json object of a sample's .json ({} when absent; counted as 'bad_json'
  when it is not an object, and the sample goes on without metadata)."""
  if not data:
    return {}
  try:
    out = json.loads(data.decode("utf-8", errors="replace"))
  except (json.JSONDecodeError, RecursionError):
    out = None
  if not isinstance(out, dict):
    counts["bad_json"] = counts.get("bad_json", 0) + 1
    return {}
  return out


def _meta_number(meta: dict, *keys: str):
  """The first of `keys` present in `meta`, as a finite number; None when none is.

  Raises:
    Skip('bad_metadata'): for a string, bool, list ... or a non-finite number.
  """
  for k in keys:
    v = meta.get(k)
    if v is None:
      continue
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
      raise Skip("bad_metadata", f"json {k}={str(v)[:50]!r}")
    return v
  return None


def read_label(meta: dict, key: str, num_classes: int = 0) -> int:
  """The class label in json field `key` (an integer in [-1, 2**31), or its
  decimal text); -1 when `key` is '' or the field is absent.

  Args:
    num_classes: > 0 for class-conditional data: the label must be in [0, num_classes).

  Raises:
    Skip('bad_label'): a present label that is not such an integer (3.5, Infinity,
      1e30, 'cat'), which would crash or silently mislabel a batch, or that is
      outside [0, num_classes); Skip('no_label'): no label with num_classes > 0.
  """
  v = meta.get(key) if key else None
  if v is None:
    if num_classes:
      raise Skip("no_label", f"no json {key!r} and data.num_classes={num_classes}")
    return -1
  if isinstance(v, str):
    try:
      v = int(v)
    except ValueError:
      pass
  if (isinstance(v, bool) or not isinstance(v, (int, float))
      or (isinstance(v, float) and not v.is_integer()) or not -1 <= v < 2 ** 31):
    raise Skip("bad_label", f"json {key}={str(v)[:50]!r}")
  if num_classes and not 0 <= v < num_classes:
    raise Skip("bad_label", f"json {key}={int(v)} outside [0, data.num_classes={num_classes})")
  return int(v)


# np.load parses the .npy header with ast.literal_eval, which CPython 3.11 does not
# make safe across threads ("SystemError: AST constructor recursion depth
# mismatch" under the decoding pool); one lock makes it so. Each distinct header is
# parsed once: a latent cache's members share one, and parsing was most of a
# member's decoding time.
_NPY_LOCK = threading.Lock()
_NPY_HEADERS: dict = {}  # header bytes -> (dtype, shape, fortran_order)
_NPY_MAGIC = b"\x93NUMPY"


def _npy_spec(data: bytes) -> tuple:
  """(header end, (dtype, shape, fortran_order)) of a version 1 or 2 .npy file."""
  if data[:6] != _NPY_MAGIC or data[6:7] not in (b"\x01", b"\x02"):
    raise ValueError("not a version 1 or 2 .npy file")
  start, width = (10, 2) if data[6] == 1 else (12, 4)
  end = start + int.from_bytes(data[8:8 + width], "little")
  spec = _NPY_HEADERS.get(data[:end])
  if spec is None:
    with _NPY_LOCK:
      f = io.BytesIO(data)
      np.lib.format.read_magic(f)
      read = (np.lib.format.read_array_header_1_0 if data[6] == 1
              else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read(f)
      if dtype.hasobject:  # would need unpickling
        raise ValueError(".npy of an object dtype: not read (it would unpickle)")
      spec = (dtype, shape, fortran)
      if len(_NPY_HEADERS) < 4096:
        _NPY_HEADERS[data[:end]] = spec
  return end, spec


def load_npy(data: bytes) -> np.ndarray:
  """float32 array of a .npy file's bytes (never an object array: no unpickling)."""
  end, (dtype, shape, fortran) = _npy_spec(data)
  a = np.frombuffer(data, dtype, count=math.prod(shape), offset=end)
  a = a.reshape(shape[::-1]).T if fortran else a.reshape(shape)
  return a.astype(np.float32)


def check_filters(meta: dict, size: tuple, cfg) -> None:
  """LAION-style metadata filters; only the fields of the filters that are on are read.

  Raises:
    Skip: 'filtered' when a filter fails, 'bad_metadata' when a field it reads is
      not a finite number.
  """
  if cfg.min_size or cfg.max_aspect_ratio:
    w = _meta_number(meta, "width", "original_width") or size[0]
    h = _meta_number(meta, "height", "original_height") or size[1]
    if cfg.min_size and min(w, h) < cfg.min_size:
      raise Skip("filtered", f"size {w}x{h} < min_size {cfg.min_size}")
    if cfg.max_aspect_ratio and max(w, h) > cfg.max_aspect_ratio * min(w, h):
      raise Skip("filtered", f"size {w}x{h}: aspect ratio > {cfg.max_aspect_ratio}")
  if cfg.min_aesthetic:
    aes = _meta_number(meta, "aesthetic", "AESTHETIC_SCORE")
    if aes is None or aes < cfg.min_aesthetic:
      raise Skip("filtered", f"aesthetic {aes} < {cfg.min_aesthetic}")
  if cfg.max_punsafe < 1.0:
    pu = _meta_number(meta, "punsafe")
    if pu is not None and pu > cfg.max_punsafe:
      raise Skip("filtered", f"punsafe {pu} > {cfg.max_punsafe}")
  if cfg.max_pwatermark < 1.0:
    pw = _meta_number(meta, "pwatermark")
    if pw is not None and pw > cfg.max_pwatermark:
      raise Skip("filtered", f"pwatermark {pw} > {cfg.max_pwatermark}")


def read_caption(sample: dict, meta: dict, cfg, counts: dict) -> str:
  """The sample's caption: its .txt, else the json field `cfg.caption_key`.

  Raises:
    Skip: with `cfg.require_caption`, 'no_caption' when there is none and
      'empty_caption' when it is only whitespace; 'bad_caption' for a json caption
      that is not a string.
  """
  caption = read_text(sample.get("txt"), counts)
  if not caption and cfg.caption_key and meta.get(cfg.caption_key) is not None:
    caption = meta[cfg.caption_key]
    if not isinstance(caption, str):
      raise Skip("bad_caption", f"json {cfg.caption_key}={str(caption)[:50]!r}")
    caption = caption.strip()
  if not caption:
    if cfg.require_caption:
      raise Skip("no_caption" if caption is None else "empty_caption",
                 sample.get("__key__", "?"))
    caption = ""
  if cfg.min_caption_words and len(caption.split()) < cfg.min_caption_words:
    raise Skip("filtered", f"caption {caption[:50]!r} has fewer than {cfg.min_caption_words} words")
  return caption


def decode_sample(sample: dict, cfg, rng: np.random.Generator, counts: dict) -> dict:
  """A grouped tar sample -> {image float32 [-1,1] HxWx3, caption str, label int}.

  Raises:
    Skip: with the counter it belongs to.
  """
  if cfg.source == "latents":
    if "npy" not in sample:
      raise Skip("no_latent", sample.get("__key__", "?"))
    latent = load_npy(sample["npy"])
    if latent.ndim != 3:
      raise Skip("bad_latent", f"{sample.get('__key__', '?')}: shape {latent.shape}")
    caption = read_text(sample.get("txt"), counts) or ""
    meta = read_json(sample.get("json"), counts)
    out = {"latent": latent, "caption": caption, "label": read_label(meta, cfg.label_key, cfg.num_classes)}
    if "std.npy" in sample:  # the posterior's std: stage 2 draws z = latent + std * eps
      out["latent_std"] = load_npy(sample["std.npy"])
    return out
  ext = next((e for e in IMAGE_EXTS if e in sample), None)
  if ext is None:
    raise Skip("no_image", sample.get("__key__", "?"))
  meta = read_json(sample.get("json"), counts)
  caption = read_caption(sample, meta, cfg, counts)
  label = read_label(meta, cfg.label_key, cfg.num_classes)
  img = decode_image(sample[ext], cfg.max_image_side, cfg.max_image_pixels)
  check_filters(meta, img.size, cfg)
  geometry = crop_geometry(img.size, cfg.resolution, cfg.crop, cfg.flip, rng)
  a = apply_geometry(img, geometry, cfg.resolution)
  if min(img.size) < cfg.resolution:
    counts["upscaled"] = counts.get("upscaled", 0) + 1
  out = {}
  if cfg.layout_ext:  # a semantic / layout map beside the image, cropped the same way
    if cfg.layout_ext not in sample:
      raise Skip("no_layout", sample.get("__key__", "?"))
    layout = decode_image(sample[cfg.layout_ext], cfg.max_image_side, cfg.max_image_pixels)
    if layout.size != img.size:
      raise Skip("layout_size", f"{sample.get('__key__', '?')}: layout {layout.size} != image {img.size}")
    out["layout"] = apply_geometry(layout, geometry, cfg.resolution, nearest=True
                                   ).astype(np.float32) / 127.5 - 1.0
  return {"image": a.astype(np.float32) / 127.5 - 1.0, "caption": caption, "label": label,
          **out}
