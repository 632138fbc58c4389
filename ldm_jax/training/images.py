"""Image grids and PNG files for sample and reconstruction outputs."""
import io
import math

import numpy as np
from PIL import Image

from ldm_jax import storage


def to_uint8(images: np.ndarray) -> np.ndarray:
  """[-1, 1] floats -> uint8."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1) * 127.5), 0, 255).astype(np.uint8)


def grid(images: np.ndarray, cols: int | None = None, pad: int = 2) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> one uint8 image of the N tiled in rows."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  cols = cols or math.ceil(math.sqrt(n))
  rows = math.ceil(n / cols)
  out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, k = divmod(i, cols)
    out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
  return out


def save_png(image: np.ndarray, path: str) -> None:
  """Writes a uint8 HxWxC (or [-1, 1] float) image to `path` (local or URL)."""
  if image.dtype != np.uint8:
    image = to_uint8(image)
  buf = io.BytesIO()
  Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
  storage.write_bytes(path, buf.getvalue())
