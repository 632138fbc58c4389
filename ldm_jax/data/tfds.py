"""TFDS datasets (celeb_a_hq, lsun/church_outdoor, imagenet2012, ...) as the same
batch dict as webdataset data. Needs the optional extra: pip install -e ".[tfds]".

Random access through `tfds.data_source`; each epoch the indices are permuted by
(seed, epoch) and divided across processes; the state is (epoch, position).
"""
import concurrent.futures
import io

import numpy as np
from PIL import Image

from ldm_jax.data import decode


class TFDSIterator:

  def __init__(self, cfg, *, batch_size: int, process_index: int = 0, process_count: int = 1,
               seed: int = 0, source=None):
    if source is None:
      try:
        import tensorflow_datasets as tfds
      except ImportError as e:
        raise ValueError("config.data.source='tfds' needs the tfds extra: "
                         'pip install -e ".[tfds]"') from e
      t = cfg.tfds
      if not t.name:
        raise ValueError("config.data.tfds.name is empty")
      source = tfds.data_source(t.name, split=t.split, data_dir=t.data_dir or None)
    self.source, self.cfg, self.batch_size, self.seed = source, cfg, batch_size, seed
    self.p, self.n = process_index, process_count
    self.epoch, self.pos = 0, 0
    self.counts: dict = {}
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.workers))

  def _indices(self) -> np.ndarray:
    perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.source))
    return perm[self.p::self.n]

  def _example(self, i: int):
    t = self.cfg.tfds
    rec = self.source[int(i)]
    img = rec[t.image_key]
    img = Image.open(io.BytesIO(img)) if isinstance(img, bytes) else Image.fromarray(np.asarray(img))
    rng = np.random.default_rng([self.seed, self.epoch, int(i)])
    a, _ = decode.resize_crop(decode.to_rgb(img), self.cfg.resolution, self.cfg.crop,
                              self.cfg.flip, rng)
    cap = rec.get(t.caption_key, b"") if t.caption_key else b""
    cap = cap.decode("utf-8", "replace") if isinstance(cap, bytes) else str(cap)
    label = int(rec[t.label_key]) if t.label_key and t.label_key in rec else -1
    return {"image": a.astype(np.float32) / 127.5 - 1, "caption": cap, "label": label}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    idx = self._indices()
    take = []
    while len(take) < self.batch_size:
      if self.pos >= len(idx):
        self.epoch, self.pos = self.epoch + 1, 0
        idx = self._indices()
      take.append(idx[self.pos])
      self.pos += 1
    ex = list(self._pool.map(self._example, take))
    return {"image": np.stack([e["image"] for e in ex]),
            "caption": np.array([e["caption"] for e in ex], object),
            "label": np.array([e["label"] for e in ex], np.int32)}

  def get_state(self) -> dict:
    return {"epoch": self.epoch, "pos": self.pos}

  def set_state(self, state: dict) -> None:
    self.epoch, self.pos = state["epoch"], state["pos"]

  def stats(self) -> dict:
    return dict(self.counts)
