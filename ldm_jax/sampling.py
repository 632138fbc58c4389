"""Sampling from a stage-2 checkpoint: load, validate the request, build the
sharded batch, run the jitted sampler, write PNGs + JSON + a grid.

Everything a request can get wrong is checked before anything is compiled.
"""
import dataclasses
import functools
import logging
import math
import os
from typing import Callable, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from ldm_jax import parallel, storage
from ldm_jax.training import images as image_io

log = logging.getLogger("ldm_jax")


@dataclasses.dataclass
class Request:
  prompts: list = dataclasses.field(default_factory=list)
  negative: list = dataclasses.field(default_factory=list)
  labels: list = dataclasses.field(default_factory=list)
  num: int = 4
  steps: Optional[int] = None             # None: the config's stage2.sample.steps
  timestep_spacing: Optional[str] = None  # None: the config's (see ldm.timestep_spacing)
  guidance: Optional[float] = None
  guidance_rescale: float = 0.0
  guidance_interval: Optional[tuple] = None  # (lo, hi) in t / T; None: the config's
  sampler: str = "ddim"
  eta: float = 0.0
  seed: int = 0
  height: Optional[int] = None
  width: Optional[int] = None
  init_image: Optional[str] = None
  strength: float = 0.8
  mask: Optional[str] = None  # white (>= 0.5) = repaint, black = keep
  lowres: Optional[str] = None
  layout: Optional[str] = None
  ema: bool = True


def check_request(req: Request) -> None:
  """Raises ValueError naming the flag of a request no model can serve (what depends
  on the model is checked by `build_batch`)."""
  def need(cond, flag, value, msg):
    if not cond:
      raise ValueError(f"--{flag}={value}: {msg}")

  need(req.num >= 1, "num", req.num, "must be at least 1")
  need(req.steps is None or req.steps >= 1, "steps", req.steps, "must be at least 1")
  need(0.0 <= req.strength <= 1.0, "strength", req.strength, "must be in [0, 1]")
  need(req.eta >= 0.0, "eta", req.eta, "must be >= 0")
  need(0.0 <= req.guidance_rescale <= 1.0, "guidance_rescale", req.guidance_rescale,
       "must be in [0, 1]")
  gi = req.guidance_interval
  need(gi is None or (len(gi) == 2 and 0.0 <= float(gi[0]) <= float(gi[1]) <= 1.0),
       "guidance_interval", gi, "expected lo,hi with 0 <= lo <= hi <= 1 (fractions of T)")
  for flag in ("height", "width"):
    value = getattr(req, flag)
    need(value is None or value >= 1, flag, value, "must be at least 1")


def read_prompts(prompts, prompts_file) -> list:
  out = list(prompts)
  if prompts_file:
    if not os.path.isfile(prompts_file):
      raise ValueError(f"--prompts_file '{prompts_file}' not found")
    with open(prompts_file, encoding="utf-8") as f:
      out += [line.strip() for line in f if line.strip()]
  return out


def load(ckpt_dir: str, step: Optional[int] = None, devices=None):
  """(task, state, mesh, config) of a stage-2 checkpoint, restored onto all devices."""
  from ldm_jax.evaluation.restore import restore
  from ldm_jax.training.ldm import LDMTask
  return restore(ckpt_dir, LDMTask, stage="ldm", what="ldm/checkpoints folder of a text-to-image / LDM run",
                 step=step, devices=devices)


def _read_image(path: str, hw: tuple, mode: str, what: str) -> np.ndarray:
  if not os.path.isfile(path):
    raise ValueError(f"{what} '{path}' not found")
  img = Image.open(path)
  if mode == "RGB" and img.mode not in ("RGB", "RGBA"):
    raise ValueError(f"{what} '{path}' has mode {img.mode}; expected an RGB image")
  img = img.convert(mode)
  if img.size != (hw[1], hw[0]):
    raise ValueError(f"{what} '{path}' is {img.size[0]}x{img.size[1]}; expected "
                     f"{hw[1]}x{hw[0]} (--width x --height)")
  a = np.asarray(img, np.float32) / 255.0
  return a[..., None] if a.ndim == 2 else a


def build_batch(task, config, req: Request) -> tuple[dict, list]:
  """The host batch for every image and the list of per-image metadata; raises
  ValueError on requests the model cannot serve."""
  from ldm_jax.diffusion import samplers
  from ldm_jax.training.ldm import timestep_spacing
  c2 = config.stage2
  cond = task.cond
  T = task.schedule.T
  steps = c2.sample.steps if req.steps is None else req.steps
  if not 1 <= steps <= T:
    raise ValueError(f"--steps={steps} must be in [1, {T}] (the model's training timesteps)")
  spacing = req.timestep_spacing or timestep_spacing(c2)
  if spacing not in samplers.SPACINGS:
    raise ValueError(f"--timestep_spacing={spacing!r} is not one of {samplers.SPACINGS}")
  offset = c2.sample.get("steps_offset", 0)
  samplers.timesteps(T, steps, spacing, offset)  # a grid outside [0, T) fails here
  res = config.data.resolution
  h, w = req.height or res, req.width or res
  unit = task.first.factor * 2 ** (len(c2.unet.channel_mult) - 1)
  if h % unit or w % unit:
    raise ValueError(f"--height/--width {h}x{w} must be multiples of {unit} "
                     "(first-stage factor x UNet downsampling)")
  guidance = c2.sample.guidance if req.guidance is None else req.guidance
  if guidance != 1.0 and req.guidance is not None and not cond.guidable:
    raise ValueError("--guidance needs a conditional model; this one is unconditional")
  if cond.context == "text":
    if not req.prompts:
      raise ValueError("this is a text-to-image model: give --prompt or --prompts_file")
    rows = [dict(prompt=p) for p in req.prompts for _ in range(req.num)]
  elif req.prompts:
    raise ValueError("this model takes no text prompt (its conditioning is "
                     f"context='{cond.context}', classes={cond.classes}, concat='{cond.concat}')")
  elif cond.classes:
    labels = req.labels or list(range(min(cond.classes, 4)))
    bad = [l for l in labels if not 0 <= l < cond.classes]
    if bad:
      raise ValueError(f"--label {bad} outside [0, {cond.classes})")
    rows = [dict(label=l) for l in labels for _ in range(req.num)]
  else:
    rows = [dict() for _ in range(req.num)]
  n = len(rows)
  host = {"index": np.arange(n, dtype=np.int32)}  # the batch's size, for unconditional models
  if cond.context == "text":
    host["caption"] = np.array([r["prompt"] for r in rows], object)
    if req.negative:
      if len(req.negative) not in (1, len(req.prompts)):
        raise ValueError("give one --negative_prompt, or one per --prompt")
      neg = [req.negative[0] if len(req.negative) == 1 else req.negative[i // req.num]
             for i in range(n)]
      for r, ng in zip(rows, neg):
        r["negative_prompt"] = ng
  if cond.classes:
    host["label"] = np.array([r["label"] for r in rows], np.int32)
  if cond.concat == "layout":
    if not req.layout:
      raise ValueError("this is a layout-to-image model: give --layout (a semantic map image)")
    lay = _read_image(req.layout, (h, w), "RGB", "--layout") * 2 - 1
    host["layout"] = np.repeat(lay[None], n, 0)
    host["image"] = np.zeros_like(host["layout"])  # only its shape is used
  batch = task.prepare_batch(host)
  if req.negative and cond.context == "text":
    batch["negative"] = cond.tokenizer([r["negative_prompt"] for r in rows])
  if req.init_image:
    img = _read_image(req.init_image, (h, w), "RGB", "--init_image") * 2 - 1
    batch["init_image"] = np.repeat(img[None], n, 0)
    if cond.concat == "inpaint":
      batch["image"] = batch["init_image"]
  if req.mask:
    if not req.init_image:
      raise ValueError("--mask needs --init_image")
    m = _read_image(req.mask, (h, w), "L", "--mask")
    batch["mask"] = np.repeat((m >= 0.5).astype(np.float32)[None], n, 0)  # 1 = repaint
  if cond.concat == "inpaint" and "mask" not in batch:
    raise ValueError("this is an inpainting model: give --init_image and --mask")
  if cond.concat == "lowres":
    if not req.lowres:
      raise ValueError("this is a super-resolution model: give --lowres")
    f = cond.lowres_factor
    low = _read_image(req.lowres, (h // f, w // f), "RGB", "--lowres")
    up = np.asarray(Image.fromarray((low * 255).astype(np.uint8)).resize((w, h), Image.BICUBIC),
                    np.float32) / 127.5 - 1
    batch["image"] = np.repeat(up[None], n, 0)
  settings = dict(steps=steps, timestep_spacing=spacing,
                  steps_offset=offset if spacing == "leading" else 0, guidance=guidance, guidance_rescale=req.guidance_rescale,
                  guidance_interval=tuple(map(float, req.guidance_interval or
                                              c2.sample.get("guidance_interval", (0.0, 1.0)))),
                  sampler=req.sampler, eta=req.eta, seed=req.seed, height=h, width=w,
                  init_image=req.init_image, strength=req.strength, mask=req.mask,
                  lowres=req.lowres, layout=req.layout, ema=req.ema)
  return batch, [dict(r, index=i, **settings) for i, r in enumerate(rows)]


@functools.lru_cache(maxsize=16)
def _sampler(task, kw: tuple):
  """One jitted sampler per task and settings: batch after batch reuses its compile."""
  return jax.jit(lambda s, b, r: task.sample(s, b, r, **dict(kw)))


def generate(task, state, mesh, config, batch: dict, *, seed: int = 0, **kw) -> np.ndarray:
  """Images (N, H, W, 3) in [-1, 1] for a host batch of N rows (the same on every
  process), sharded over all devices and hosts; kw go to `LDMTask.sample`."""
  n = len(next(iter(batch.values())))
  dp = parallel.data_parallel_size(mesh)
  total = -(-n // dp) * dp
  pad = lambda a: np.concatenate([a, np.repeat(a[-1:], total - n, 0)]) if total > n else a
  batch = {k: pad(np.asarray(v)) for k, v in batch.items()}
  per = total // jax.process_count()
  lo = jax.process_index() * per
  gbatch = parallel.global_batch({k: v[lo:lo + per] for k, v in batch.items()}, mesh)
  fn = _sampler(task, tuple(sorted(kw.items())))
  with parallel.activate(mesh, parallel.rules_of(config)):
    images = fn(state, gbatch, jax.random.key(seed))
  return np.asarray(multihost_utils.process_allgather(images, tiled=True))[:n]


def sample_request(task, state, mesh, config, req: Request) -> tuple[np.ndarray, list]:
  """Samples every image `req` asks for.

  Returns:
    (images (N, H, W, 3) in [-1, 1], one dict of settings per image).
  Raises:
    ValueError: a request the model cannot serve (before anything compiles).
  """
  check_request(req)
  batch, meta = build_batch(task, config, req)
  images = generate(task, state, mesh, config, batch, seed=req.seed, steps=meta[0]["steps"],
                    spacing=meta[0]["timestep_spacing"], guidance=meta[0]["guidance"],
                    sampler=req.sampler, eta=req.eta,
                    use_ema=req.ema, height=meta[0]["height"], width=meta[0]["width"],
                    strength=req.strength, rescale=req.guidance_rescale,
                    interval=meta[0]["guidance_interval"])
  return images, meta


def grid_columns(n: int, num: int) -> int:
  """Columns of a near-square grid of n images: one row per prompt (its `num`
  images) when that is as wide as tall to twice as wide, else ceil(sqrt(n))."""
  rows = n // num
  if n % num == 0 and rows <= num <= 2 * rows:
    return num
  return math.ceil(math.sqrt(n))


def run(ckpt_dir: str, req: Request, out: str, *, step: Optional[int] = None, devices=None,
        loader: Optional[Callable[[], tuple]] = None) -> list:
  """Samples `req` from the checkpoint into `out`; returns the written paths (grid last).

  `loader` returns (task, state, mesh, config) in place of the checkpoint (e.g.
  pretrained Stable Diffusion weights, `ldm_jax.pretrained.stage2.for_sampling`);
  `ckpt_dir` then only names the source in each image's JSON.
  """
  check_request(req)
  storage.check_writable(out)
  task, state, mesh, config = loader() if loader else load(ckpt_dir, step, devices)
  images, meta = sample_request(task, state, mesh, config, req)
  n = len(meta)
  paths = []
  if jax.process_index() == 0:
    for m, img in zip(meta, images):
      base = storage.join(out, f"{m['index']:05d}")
      image_io.save_png(img, base + ".png")
      storage.write_json(base + ".json", dict(m, checkpoint=storage.display(ckpt_dir)), indent=1)
      paths.append(base + ".png")
    grid_path = storage.join(out, "grid.png")
    image_io.save_png(image_io.grid(images, cols=grid_columns(n, req.num)), grid_path)
    paths.append(grid_path)
  return paths
