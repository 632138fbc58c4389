"""The CLIP score (Hessel et al. 2021, as torchmetrics' `CLIPScore` computes it):
100 * max(cos(E_img(x), E_txt(c)), 0) per image and its caption, averaged.

Images are prepared as CLIP's own preprocessing does: uint8 pixels, the shorter
side resized to the model's input size with PIL bicubic, a centre crop, then
(x / 255 - mean) / std with OpenAI's constants (or the folder's
preprocessor_config.json). Captions go through the folder's CLIP tokenizer,
truncated to 77 tokens. Batches are sharded over every device.
"""
import json
import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from PIL import Image

from ldm_jax import parallel
from ldm_jax.evaluation import store

ENV = "LDM_CLIP"
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's normalisation
STD = (0.26862954, 0.26130258, 0.27577711)


def clip_score(image_embeds, text_embeds) -> np.ndarray:
  """(N,) 100 * max(cos, 0) of paired rows of (N, D) image and text embeddings."""
  i = np.asarray(image_embeds, np.float64)
  t = np.asarray(text_embeds, np.float64)
  cos = np.sum(i * t, -1) / (np.linalg.norm(i, axis=-1) * np.linalg.norm(t, axis=-1))
  return 100 * np.maximum(cos, 0)


def preprocess(images: np.ndarray, size: int, mean=MEAN, std=STD) -> np.ndarray:
  """uint8 (N, H, W, 3) -> float32 (N, size, size, 3) as CLIP's preprocessing."""
  out = []
  for img in np.asarray(images, np.uint8):
    h, w = img.shape[:2]
    s = size / min(h, w)
    nh, nw = max(size, int(h * s)), max(size, int(w * s))
    pil = Image.fromarray(img).resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    out.append(np.asarray(pil.crop((left, top, left + size, top + size)), np.float32) / 255)
  return ((np.stack(out) - np.float32(mean)) / np.float32(std)).astype(np.float32)


def clip_folder(path: Optional[str] = None) -> str:
  """The CLIP folder: `path`, else $LDM_CLIP; raises FileNotFoundError saying
  which file to put where."""
  from ldm_jax.models import clip as clip_lib
  path = path or os.environ.get(ENV)
  hub = clip_lib.HUB_NAMES["ViT-L/14"]
  how = (f"give --clip=FOLDER or set {ENV}=FOLDER, a transformers CLIPModel folder with its "
         f"tokenizer, e.g. `huggingface-cli download {hub} --local-dir FOLDER`")
  if not path:
    raise FileNotFoundError(f"the CLIP score needs a CLIP model: {how}")
  lacking = clip_lib.missing_files(path)
  if lacking:
    raise FileNotFoundError(f"CLIP: {os.path.join(path, lacking[0])} not found; {how}")
  return path


class ClipScorer:
  """CLIP scores of images and their captions with the model in `folder`."""

  def __init__(self, folder: str, mesh):
    from ldm_jax.models import clip as clip_lib
    from ldm_jax.models.text import CLIPTokenizerFromFolder
    folder = clip_folder(folder)
    self.model, params = clip_lib.load_clip(folder)
    self.mesh = mesh
    self.params = jax.device_put(params, parallel.replicated(mesh))
    self.tokenizer = CLIPTokenizerFromFolder(folder, self.model.text["max_length"])
    self.size, self.mean, self.std = self.model.vision["image_size"], MEAN, STD
    pre = os.path.join(folder, "preprocessor_config.json")
    if os.path.isfile(pre):
      with open(pre) as f:
        p = json.load(f)
      self.mean, self.std = tuple(p.get("image_mean", MEAN)), tuple(p.get("image_std", STD))
    self.fingerprint = store.fingerprint(params)

    def embed(params, pixels, ids):
      apply = lambda m, x, t: (m.image_embeds(x), m.text_embeds(t))
      return self.model.apply({"params": params}, pixels, ids, method=apply)
    self._embed = jax.jit(embed)

  def __call__(self, images: np.ndarray, captions: Sequence[str]) -> np.ndarray:
    """Scores of this process's uint8 images and captions (the same count on every
    process, a multiple of its share of the devices); returns all processes' (N,)."""
    local = dict(pixels=preprocess(images, self.size, self.mean, self.std),
                 ids=self.tokenizer(list(captions)))
    batch = parallel.global_batch(local, self.mesh)
    with parallel.activate(self.mesh, parallel.DEFAULT_RULES):
      img, txt = self._embed(self.params, batch["pixels"], batch["ids"])
    img, txt = multihost_utils.process_allgather((img, txt), tiled=True)
    return clip_score(img, txt).astype(np.float32)
