"""Procedural captioned shapes: render, caption, parse and classify.

An embedded text-to-image dataset that needs no download. Each image is one shape
(kind, colour, size) in one cell of a 3x3 grid on a background of another colour,
captioned from its attributes, e.g. "a small red circle at the top left on a blue
background". A model can only get colour, kind and position right by reading the
caption, which makes the set a cheap prompt-following benchmark:

* `sample_attrs(seed, index, split)` draws attributes deterministically;
* `render(attrs, resolution)` draws the ground truth for any caption;
* `caption(attrs)` / `parse_caption(text)` map attributes to text and back;
* `classify_image(img)` recovers the attributes from pixels (for an evaluator that
  scores generated samples per attribute);
* `split_of(attrs)` divides attribute combinations into 'train' and 'heldout' so
  evaluation prompts can be combinations never seen in training.

Shapes are drawn at a multiple of the target resolution and downsampled with a box
filter, so edges are antialiased and the same at every resolution (32..256 px).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

VERSION = 3  # bump when rendering changes: cached shards are keyed by it

KINDS = ("circle", "square", "triangle", "star", "cross")
COLOURS = {  # name -> RGB; far apart so that the nearest palette entry is unambiguous
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "purple": (140, 50, 190),
    "orange": (245, 140, 30),
    "black": (25, 25, 25),
}
COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
POSITIONS = ("top left", "top", "top right", "left", "centre", "right",
             "bottom left", "bottom", "bottom right")  # row-major 3x3 grid cells
SPLITS = ("train", "heldout", "all")
ATTRIBUTES = ("colour", "kind", "position", "size", "background")  # what a caption names
HELDOUT_PERCENT = 10  # share of (kind, colour, position, background) combinations held out

# Half-extent of a shape as a fraction of the image side; a grid cell has half-extent 1/6.
_HALF = {"small": 0.12, "large": 0.19}
_JITTER = 0.012  # max centre offset (fraction of the side): positions are not pixel-exact
_COLOUR_JITTER = 12  # max per-channel colour offset, so colour is a class, not one value


@dataclasses.dataclass(frozen=True)
class Attrs:
  """Attributes of one shapes image. `dx`, `dy` are the centre jitter (fraction of side)."""
  kind: str
  colour: str
  size: str
  position: str
  background: str
  dx: float = 0.0
  dy: float = 0.0

  def __post_init__(self):
    for field, vocab in (("kind", KINDS), ("colour", COLOUR_NAMES), ("size", SIZES),
                         ("position", POSITIONS), ("background", COLOUR_NAMES)):
      if getattr(self, field) not in vocab:
        raise ValueError(f"shapes Attrs.{field}={getattr(self, field)!r} not in {vocab}")
    if self.colour == self.background:
      raise ValueError(f"shapes Attrs: colour and background are both {self.colour!r}")

  @property
  def label(self) -> int:
    """Class label: the kind index (0..len(KINDS)-1)."""
    return KINDS.index(self.kind)

  @property
  def kind_colour_label(self) -> int:
    """Finer class label: kind x colour."""
    return KINDS.index(self.kind) * len(COLOUR_NAMES) + COLOUR_NAMES.index(self.colour)

  def to_json(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(label=self.label, kind_colour_label=self.kind_colour_label, split=split_of(self))
    return d


def split_of(attrs: Attrs) -> str:
  """'heldout' for a fixed ~10% of (kind, colour, position, background) combinations.

  Size is left out of the hash, so every held-out combination differs from all
  training ones in the composition of the other four attributes.
  """
  key = f"{attrs.kind}|{attrs.colour}|{attrs.position}|{attrs.background}".encode()
  h = int.from_bytes(hashlib.sha1(key).digest()[:4], "little")
  return "heldout" if h % 100 < HELDOUT_PERCENT else "train"


def sample_attrs(seed: int, index: int, split: str = "train") -> Attrs:
  """Draws the attributes of example `index` of the set with seed `seed`.

  Args:
    seed: dataset seed.
    index: example index (any non-negative int).
    split: 'train', 'heldout' or 'all' (combinations of either split).

  Returns:
    Attrs, a pure function of (seed, index, split).
  """
  if split not in SPLITS:
    raise ValueError(f"shapes split={split!r} not in {SPLITS}")
  rng = np.random.default_rng([seed, index, SPLITS.index(split)])
  while True:  # rejection sampling: ~1.1 draws for train, ~10 for heldout
    colour, background = rng.choice(len(COLOUR_NAMES), size=2, replace=False)
    attrs = Attrs(kind=KINDS[rng.integers(len(KINDS))], colour=COLOUR_NAMES[colour],
                  size=SIZES[rng.integers(len(SIZES))],
                  position=POSITIONS[rng.integers(len(POSITIONS))],
                  background=COLOUR_NAMES[background],
                  dx=float(rng.uniform(-_JITTER, _JITTER)),
                  dy=float(rng.uniform(-_JITTER, _JITTER)))
    if split == "all" or split_of(attrs) == split:
      return attrs


def caption(attrs: Attrs) -> str:
  """'a small red circle at the top left on a blue background'."""
  where = "in the centre" if attrs.position == "centre" else f"at the {attrs.position}"
  return f"a {attrs.size} {attrs.colour} {attrs.kind} {where} on a {attrs.background} background"


_CAPTION_RE = re.compile(r"^an? (\w+) (\w+) (\w+) (?:at|in) the ([a-z ]+?) on an? (\w+) background$")


def parse_caption(text: str) -> Attrs:
  """Inverse of `caption` (jitter is not in the text, so dx = dy = 0).

  Raises:
    ValueError: naming the caption when it is not a shapes caption.
  """
  m = _CAPTION_RE.match(text.strip().lower())
  if not m:
    raise ValueError(f"not a shapes caption: {text!r}")
  size, colour, kind, position, background = m.groups()
  return Attrs(kind=kind, colour=colour, size=size, position=position, background=background)


def _polygon(kind: str) -> list[tuple[float, float]]:
  """Unit-size outline (half-extent 1, y down) of the polygonal kinds."""
  if kind == "square":
    return [(-0.85, -0.85), (0.85, -0.85), (0.85, 0.85), (-0.85, 0.85)]
  if kind == "triangle":
    return [(0.0, -1.0), (1.0, 0.8), (-1.0, 0.8)]
  if kind == "star":
    ang = np.pi / 5 * np.arange(10) - np.pi / 2
    rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return list(zip(rad * np.cos(ang), rad * np.sin(ang) + 0.1))
  if kind == "cross":
    a = 0.32
    return [(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a),
            (-1, a), (-1, -a), (-a, -a)]
  raise ValueError(kind)


def _mask(kind: str, half: float, cx: float, cy: float, resolution: int) -> np.ndarray:
  """Antialiased coverage in [0, 1] (H, W) of one shape; all lengths in pixels."""
  ss = max(2, 512 // resolution)  # supersampling factor
  img = Image.new("L", (resolution * ss, resolution * ss), 0)
  draw = ImageDraw.Draw(img)
  h, x0, y0 = half * ss, cx * ss, cy * ss
  if kind == "circle":
    draw.ellipse([x0 - h, y0 - h, x0 + h, y0 + h], fill=255)
  else:
    draw.polygon([(x0 + h * px, y0 + h * py) for px, py in _polygon(kind)], fill=255)
  img = img.resize((resolution, resolution), Image.Resampling.BOX)
  return np.asarray(img, np.float32) / 255.0


def _cell_centre(position: str) -> tuple[float, float]:
  row, col = divmod(POSITIONS.index(position), 3)
  return (col + 0.5) / 3, (row + 0.5) / 3


def _jittered_rgb(name: str, seed_parts) -> np.ndarray:
  rng = np.random.default_rng(seed_parts)
  rgb = np.asarray(COLOURS[name], np.float32) + rng.integers(-_COLOUR_JITTER, _COLOUR_JITTER + 1, 3)
  return np.clip(rgb, 0, 255)


def render(attrs: Attrs, resolution: int, *, colour_seed: int | None = None) -> np.ndarray:
  """Draws `attrs` as an RGB uint8 image (resolution, resolution, 3).

  Args:
    attrs: what to draw.
    resolution: side in pixels, 32..256 (other sizes work, smaller ones lose detail).
    colour_seed: when given, colours get a small deterministic jitter (the dataset
      uses it); None draws the exact palette colours (ground truth for an evaluator).
  """
  fx, fy = _cell_centre(attrs.position)
  cx, cy = (fx + attrs.dx) * resolution, (fy + attrs.dy) * resolution
  alpha = _mask(attrs.kind, _HALF[attrs.size] * resolution, cx, cy, resolution)[..., None]
  if colour_seed is None:
    fg, bg = (np.asarray(COLOURS[c], np.float32) for c in (attrs.colour, attrs.background))
  else:
    fg, bg = _jittered_rgb(attrs.colour, [colour_seed, 0]), _jittered_rgb(attrs.background, [colour_seed, 1])
  img = alpha * fg + (1.0 - alpha) * bg
  return np.clip(np.round(img), 0, 255).astype(np.uint8)


# Semantic-map colours of the layout task: one per kind, background black.
LAYOUT_COLOURS = {"circle": (255, 0, 0), "square": (0, 255, 0), "triangle": (0, 0, 255),
                  "star": (255, 255, 0), "cross": (0, 255, 255)}


def layout_map(attrs: Attrs, resolution: int) -> np.ndarray:
  """The semantic map of `attrs` (uint8 HxWx3): the shape's region (coverage >= 1/2)
  in its kind's LAYOUT_COLOURS entry on black; colours are left to the model."""
  fx, fy = _cell_centre(attrs.position)
  cx, cy = (fx + attrs.dx) * resolution, (fy + attrs.dy) * resolution
  inside = _mask(attrs.kind, _HALF[attrs.size] * resolution, cx, cy, resolution) >= 0.5
  out = np.zeros((resolution, resolution, 3), np.uint8)
  out[inside] = LAYOUT_COLOURS[attrs.kind]
  return out


def example(seed: int, index: int, resolution: int, split: str = "train"):
  """(image uint8 HxWx3, caption, json dict) of dataset example `index`."""
  attrs = sample_attrs(seed, index, split)
  img = render(attrs, resolution, colour_seed=(seed * 1_000_003 + index) & 0x7FFFFFFF)
  return img, caption(attrs), attrs.to_json()


def _nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
  names = [n for n in COLOUR_NAMES if n != exclude]
  dist = [np.sum((np.asarray(COLOURS[n], np.float32) - rgb) ** 2) for n in names]
  return names[int(np.argmin(dist))]


@functools.lru_cache(maxsize=64)
def _centroid_offset(kind: str, size: str, resolution: int) -> tuple[float, float]:
  """Coverage centroid minus geometric centre (pixels) of a shape: nonzero for triangle, star."""
  c = resolution / 2
  m = _mask(kind, _HALF[size] * resolution, c, c, resolution)
  ys, xs = np.mgrid[:resolution, :resolution] + 0.5  # pixel centres in PIL coordinates
  return float((m * xs).sum() / m.sum() - c), float((m * ys).sum() / m.sum() - c)


def classify_image(img: np.ndarray) -> Attrs:
  """Recovers the attributes of a shapes image from its pixels.

  Background = median border colour; the shape's coverage is each pixel's distance
  from the background relative to the farthest pixel; colour = nearest palette
  entry to the median of well-covered pixels; position = grid cell of the coverage
  centroid; kind and size = best IoU against centroid-aligned templates.

  Args:
    img: (H, W, 3) uint8 in [0, 255] or float in [-1, 1]; square.

  Returns:
    Attrs (dx, dy = measured centroid offset from the cell centre).
  """
  img = np.asarray(img)
  if img.dtype != np.uint8:
    img = (np.clip(img, -1.0, 1.0) + 1.0) * 127.5
  img = img.astype(np.float32)
  res = img.shape[0]
  border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
  bg = np.median(border, axis=0)
  background = _nearest_colour(bg)
  dist = np.sqrt(((img - bg) ** 2).sum(-1))
  core = dist >= 0.8 * dist.max()
  fg = np.median(img[core], axis=0)
  colour = _nearest_colour(fg, exclude=background)
  alpha = np.clip(dist / max(float(np.sqrt(((fg - bg) ** 2).sum())), 1e-3), 0, 1)
  alpha = np.where(alpha > 0.1, alpha, 0.0)  # drop noise far from the shape
  ys, xs = np.mgrid[:res, :res]
  total = max(alpha.sum(), 1e-6)
  cy, cx = (alpha * ys).sum() / total, (alpha * xs).sum() / total
  col, row = (min(int((v + 0.5) / res * 3), 2) for v in (cx, cy))
  position = POSITIONS[row * 3 + col]
  # Draw each (kind, size) template with its centroid on the measured one; best IoU wins.
  best, kind, size = -1.0, KINDS[0], SIZES[0]
  for k in KINDS:
    for s in SIZES:
      ox, oy = _centroid_offset(k, s, res)
      t = _mask(k, _HALF[s] * res, cx + 0.5 - ox, cy + 0.5 - oy, res)
      iou = np.minimum(t, alpha).sum() / max(np.maximum(t, alpha).sum(), 1e-6)
      if iou > best:
        best, kind, size = iou, k, s
  fx, fy = _cell_centre(position)
  return Attrs(kind=kind, colour=colour, size=size, position=position, background=background,
               dx=float((cx + 0.5) / res - fx), dy=float((cy + 0.5) / res - fy))
