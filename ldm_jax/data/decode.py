"""Bytes -> model inputs: image decoding in any PIL mode, resize / crop / flip,
captions, labels, and the LAION metadata filters. Every failure is a `Skip`
naming its kind, which the pipeline counts instead of crashing."""
import io
import json
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


def decode_image(data: bytes) -> Image.Image:
  if not data:
    raise Skip("corrupt_image", "zero-byte image")
  try:
    img = Image.open(io.BytesIO(data))
    img.load()
  except Exception as e:  # PIL raises many types for bad files
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
  so that no new (in-between) classes appear at their edges."""
  nw, nh, x0, y0, flipped = geometry
  if (nw, nh) != img.size:
    upscaled = nw > img.size[0]
    img = img.resize((nw, nh), Image.NEAREST if nearest else
                     (Image.BICUBIC if upscaled else Image.LANCZOS))
  a = np.asarray(img.crop((x0, y0, x0 + resolution, y0 + resolution)))
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


def read_json(data: Optional[bytes]) -> dict:
  if not data:
    return {}
  try:
    out = json.loads(data.decode("utf-8", errors="replace"))
    return out if isinstance(out, dict) else {}
  except json.JSONDecodeError:
    return {}


# np.load parses the .npy header with ast.literal_eval, which CPython 3.11 does not
# make safe across threads ("SystemError: AST constructor recursion depth
# mismatch" under the decoding pool); one lock makes it so, at microseconds a call.
_NPY_LOCK = threading.Lock()


def load_npy(data: bytes) -> np.ndarray:
  """float32 array of a .npy file's bytes."""
  with _NPY_LOCK:
    return np.load(io.BytesIO(data)).astype(np.float32)


def check_filters(meta: dict, size: tuple, cfg) -> None:
  """LAION-style metadata filters; raises Skip('filtered') when one fails."""
  w = meta.get("width") or meta.get("original_width") or size[0]
  h = meta.get("height") or meta.get("original_height") or size[1]
  if cfg.min_size and min(w, h) < cfg.min_size:
    raise Skip("filtered", f"size {w}x{h} < min_size {cfg.min_size}")
  aes = meta.get("aesthetic", meta.get("AESTHETIC_SCORE"))
  if cfg.min_aesthetic and (aes is None or aes < cfg.min_aesthetic):
    raise Skip("filtered", f"aesthetic {aes} < {cfg.min_aesthetic}")
  pu = meta.get("punsafe")
  if cfg.max_punsafe < 1.0 and pu is not None and pu > cfg.max_punsafe:
    raise Skip("filtered", f"punsafe {pu} > {cfg.max_punsafe}")
  pw = meta.get("pwatermark")
  if cfg.max_pwatermark < 1.0 and pw is not None and pw > cfg.max_pwatermark:
    raise Skip("filtered", f"pwatermark {pw} > {cfg.max_pwatermark}")


def decode_sample(sample: dict, cfg, rng: np.random.Generator, counts: dict) -> dict:
  """A grouped tar sample -> {image float32 [-1,1] HxWx3, caption str, label int}.

  Raises:
    Skip: with the counter it belongs to.
  """
  if cfg.source == "latents":
    if "npy" not in sample:
      raise Skip("no_latent", sample.get("__key__", "?"))
    latent = load_npy(sample["npy"])
    caption = read_text(sample.get("txt"), counts) or ""
    meta = read_json(sample.get("json"))
    out = {"latent": latent, "caption": caption, "label": int(meta.get(cfg.label_key, -1))}
    if "std.npy" in sample:  # the posterior's std: stage 2 draws z = latent + std * eps
      out["latent_std"] = load_npy(sample["std.npy"])
    return out
  ext = next((e for e in IMAGE_EXTS if e in sample), None)
  if ext is None:
    raise Skip("no_image", sample.get("__key__", "?"))
  meta = read_json(sample.get("json"))
  caption = read_text(sample.get("txt"), counts)
  if caption is None and cfg.caption_key:
    caption = meta.get(cfg.caption_key)
  if caption is None:
    if cfg.require_caption:
      raise Skip("no_caption", sample.get("__key__", "?"))
    caption = ""
  img = decode_image(sample[ext])
  check_filters(meta, img.size, cfg)
  geometry = crop_geometry(img.size, cfg.resolution, cfg.crop, cfg.flip, rng)
  a = apply_geometry(img, geometry, cfg.resolution)
  if min(img.size) < cfg.resolution:
    counts["upscaled"] = counts.get("upscaled", 0) + 1
  out = {}
  if cfg.layout_ext:  # a semantic / layout map beside the image, cropped the same way
    if cfg.layout_ext not in sample:
      raise Skip("no_layout", sample.get("__key__", "?"))
    layout = decode_image(sample[cfg.layout_ext])
    if layout.size != img.size:
      raise Skip("layout_size", f"{sample.get('__key__', '?')}: layout {layout.size} != image {img.size}")
    out["layout"] = apply_geometry(layout, geometry, cfg.resolution, nearest=True
                                   ).astype(np.float32) / 127.5 - 1.0
  label = meta.get(cfg.label_key, -1) if cfg.label_key else -1
  try:
    label = int(label)
  except (TypeError, ValueError):
    label = -1
  return {"image": a.astype(np.float32) / 127.5 - 1.0, "caption": str(caption), "label": label,
          **out}
