"""The data pipeline: shards -> samples -> decoded examples -> host-local batches,
with an exactly resumable position and counted, never fatal, bad input.

Order. Each epoch the shard list is permuted by (seed, epoch), then divided
across processes (shard i goes to process i % P; with fewer shards than
processes, every process reads all shards and keeps sample j when j % P == p).
A process reads its shards in order and shuffles in blocks of `shuffle_buffer`
samples, each block permuted by (seed, epoch, process, block). The position is
(epoch, block start as shard + offset, emitted within the block), so
`set_state` re-reads one block and continues exactly where `get_state` was taken.

Decoding runs on a pool of `workers` threads (PIL releases the GIL while
decoding); results keep their order, so parallelism never changes the stream.
A sample's random crop and flip are drawn from (seed, a stable hash of its key,
epoch), so every interpreter and every resumed run sees the same augmentation.

Bad input never stops training and never hangs it: any failure to read a shard
or decode a sample is counted by its cause (`stats()`, logged as data/<cause>)
and skipped; a key repeated within a shard is kept once; but a full pass over
the data that yields no sample at all is an error naming the counts.
"""
import concurrent.futures
import hashlib
import logging
import os
from typing import Iterator, Optional

import ml_collections
import numpy as np

from ldm_jax.data import decode, shards

log = logging.getLogger("ldm_jax")


def default_config() -> ml_collections.ConfigDict:
  """`config.data`, each field commented."""
  c = ml_collections.ConfigDict()
  c.source = "shapes"        # 'shapes' (embedded, written as shards on first use) | 'wds' | 'tfds' | 'latents'
  c.shards = ""              # wds/latents: brace pattern, glob or comma list; local or fsspec URL
  c.resolution = 256         # square training resolution (shorter side resized, then cropped)
  c.crop = "center"          # 'center' | 'random'
  c.flip = False             # random horizontal flips
  c.caption_key = "caption"  # json field used when a sample has no .txt
  c.require_caption = True   # skip (and count) samples without a caption
  c.label_key = "label"      # json field with an int class label ('' = none)
  c.num_classes = 0          # > 0: skip (and count) samples without a label in [0, num_classes)
  c.layout_ext = ""          # extension of a layout / semantic map beside each image, e.g. 'seg.png' ('' = none)
  c.min_size = 0             # skip images whose shorter side (json width/height or actual) is smaller
  c.max_aspect_ratio = 0.0   # skip images whose longer side is more than this times the shorter (0 = off)
  c.min_caption_words = 0    # skip samples whose caption has fewer words (0 = off)
  c.min_aesthetic = 0.0      # skip samples whose json 'aesthetic' score is lower (0 = off)
  c.max_punsafe = 1.0        # skip samples whose json 'punsafe' is higher (1 = off)
  c.max_pwatermark = 1.0     # skip samples whose json 'pwatermark' is higher (1 = off)
  c.max_image_side = 16384   # skip images with a longer side, read from the header before decoding (0 = off)
  c.max_image_pixels = 40_000_000  # ... or more pixels (~120 MB as RGB per decoding thread; 0 = off)
  c.shuffle_buffer = 1000    # samples per shuffled block
  c.workers = max(1, min(8, os.cpu_count() or 1))  # decoding threads
  c.cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "ldm_jax")  # shapes shards
  c.shapes = ml_collections.ConfigDict(dict(
      num=20000,             # examples in the embedded dataset
      seed=0,                # dataset seed (attributes and colours)
      split="train",         # 'train' | 'heldout' | 'all' attribute combinations
      shard_size=1000))      # examples per shard
  c.tfds = ml_collections.ConfigDict(dict(
      name="", split="train", image_key="image", label_key="label", caption_key="",
      data_dir=""))
  return c


def key_hash(key: str) -> int:
  """A 64-bit hash of a sample key that every interpreter agrees on (Python's
  `hash` of a str changes with PYTHONHASHSEED)."""
  digest = hashlib.blake2b(key.encode("utf-8", "surrogateescape"), digest_size=8).digest()
  return int.from_bytes(digest, "little")


class Stats:
  """Counters of skipped / repaired input; each kind is named in one warning."""

  def __init__(self):
    self.counts: dict = {}
    self._warned: set = set()

  def add(self, kind: str, detail: str = "") -> None:
    self.counts[kind] = self.counts.get(kind, 0) + 1
    if kind not in self._warned:
      self._warned.add(kind)
      log.warning("data: %s (%s); such samples are skipped and counted as data/%s, "
                  "this is the only warning", kind.replace("_", " "), detail[:200], kind)


class WebDatasetIterator:
  """Host-local batches from webdataset shards; see the module docstring."""

  def __init__(self, cfg, *, batch_size: int, process_index: int = 0, process_count: int = 1,
               seed: int = 0, urls: Optional[list] = None):
    self.cfg, self.batch_size, self.seed = cfg, batch_size, seed
    self.p, self.n = process_index, process_count
    for field in ("max_image_side", "max_image_pixels"):
      if not isinstance(cfg[field], int) or cfg[field] < 0:
        raise ValueError(f"config.data.{field} must be an int >= 0 (0 = no cap), got {cfg[field]!r}")
    self.urls = urls if urls is not None else shards.list_shards(cfg.shards)
    if not self.urls:
      raise ValueError(f"config.data.shards='{cfg.shards}' names no shard")
    self.stats_ = Stats()
    self._pool = concurrent.futures.ThreadPoolExecutor(max(1, cfg.workers))
    self.epoch, self.shard, self.offset, self.emitted = 0, 0, 0, 0
    self._block: list = []
    self._next_pos = None

  # -- order ---------------------------------------------------------------------
  def _epoch_shards(self, epoch: int) -> list:
    perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.urls))
    order = [self.urls[i] for i in perm]
    return order[self.p::self.n] if len(order) >= self.n else order

  def _raw(self, epoch: int, shard: int, offset: int) -> Iterator[tuple]:
    """(shard index, offset after it, sample) from a position to the epoch's end.

    A key seen before in the same shard is dropped (counted as duplicate_key); the
    keys before `offset` are still read, so a resumed pass drops the same ones.
    """
    urls = self._epoch_shards(epoch)
    split = len(self.urls) < self.n
    for si in range(shard, len(urls)):
      j, keys = 0, set()
      try:
        for sample in shards.iter_samples(urls[si]):
          j += 1
          repeated = sample["__key__"] in keys
          keys.add(sample["__key__"])
          if j <= (offset if si == shard else 0):
            continue
          if split and (j - 1) % self.n != self.p:
            continue
          if repeated:
            self.stats_.add("duplicate_key", f"{urls[si]}: {sample['__key__']}")
            continue
          yield si, j, sample
      except FileNotFoundError as e:
        self.stats_.add("missing_shard", f"{urls[si]}: {e}")
      except Exception as e:  # unreachable, malformed, zero-byte or truncated shard
        self.stats_.add("bad_shard", f"{urls[si]}: {type(e).__name__}: {e}")

  def _fill_block(self) -> None:
    """Reads the block at (epoch, shard, offset); advances the epoch at its end."""
    for _ in range(2):
      raw, end = [], None
      for si, j, sample in self._raw(self.epoch, self.shard, self.offset):
        raw.append(sample)
        end = (si, j)
        if len(raw) == self.cfg.shuffle_buffer:
          break
      if raw:
        break
      self.epoch, self.shard, self.offset = self.epoch + 1, 0, 0
    if not raw:
      raise ValueError(f"config.data.shards='{self.cfg.shards}': no readable sample in any shard")
    block_id = (self.shard, self.offset)
    perm = np.random.default_rng([self.seed, self.epoch, self.p, *block_id]).permutation(len(raw))
    self._block = [raw[i] for i in perm]
    self._next_pos = (self.epoch, end[0], end[1]) if len(raw) == self.cfg.shuffle_buffer \
        else (self.epoch + 1, 0, 0)

  def _decode(self, args):
    epoch, sample = args
    rng = np.random.default_rng([self.seed, key_hash(sample["__key__"]), epoch])
    counts: dict = {}
    try:
      return decode.decode_sample(sample, self.cfg, rng, counts), counts, None
    except decode.Skip as s:
      return None, counts, s
    except Exception as e:  # whatever else one sample's bytes provoke skips that sample only
      return None, counts, decode.Skip(f"error_{type(e).__name__}", f"{sample['__key__']}: {e}")

  def _examples(self) -> Iterator[dict]:
    # The epoch being read from its start with nothing yielded yet (None once
    # something is, or when reading began mid-epoch): ending it is a barren pass.
    barren = self.epoch if (self.shard, self.offset, self.emitted) == (0, 0, 0) else None
    while True:
      if not self._block or self.emitted >= len(self._block):
        epoch = self.epoch
        if self._block:
          self.epoch, self.shard, self.offset = self._next_pos
          self.emitted = 0
        self._fill_block()
        if self.epoch != epoch:
          if barren == epoch:
            raise ValueError(
                f"config.data.shards='{self.cfg.shards}': a full pass over {len(self.urls)} "
                f"shard(s) gave no usable sample; skipped so far: {self.stats()}")
          barren = self.epoch
      todo = self._block[self.emitted:]
      for ex, counts, skip in self._pool.map(self._decode, [(self.epoch, smp) for smp in todo]):
        self.emitted += 1
        self._count(counts, skip)
        if skip is None:
          barren = None
          yield ex

  def _count(self, counts: dict, skip) -> None:
    for k, v in counts.items():
      self.stats_.counts[k] = self.stats_.counts.get(k, 0) + v
    if skip is not None:
      self.stats_.add(skip.kind, str(skip))

  def one_epoch(self, chunk: int = 256) -> Iterator[dict]:
    """This process's share of one pass over the data, unshuffled, decoded; bad
    samples are skipped and counted as in training. For encoding a dataset once
    (the latent cache); leaves the training position untouched."""
    buf = []
    for _, _, sample in self._raw(0, 0, 0):
      buf.append((0, sample))
      if len(buf) == chunk:
        yield from self._decoded(buf)
        buf = []
    yield from self._decoded(buf)

  def _decoded(self, todo: list) -> Iterator[dict]:
    for ex, counts, skip in self._pool.map(self._decode, todo):
      self._count(counts, skip)
      if skip is None:
        yield ex

  # -- the iterator protocol -------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if not hasattr(self, "_gen"):
      self._gen = self._examples()
    out = []
    while len(out) < self.batch_size:
      out.append(next(self._gen))
    batch = {k: np.stack([e[k] for e in out]) for k in out[0] if k != "caption"}
    batch["caption"] = np.array([e["caption"] for e in out], object)
    if "label" in batch:
      batch["label"] = batch["label"].astype(np.int32)
    return batch

  def get_state(self) -> dict:
    """The position after the last returned batch (JSON-able)."""
    return dict(epoch=self.epoch, shard=self.shard, offset=self.offset,
                emitted=self.emitted, seed=self.seed, urls=len(self.urls))

  def set_state(self, state: dict) -> None:
    if state.get("urls", len(self.urls)) != len(self.urls):
      log.warning("data: the shard list changed since the checkpoint (%s -> %d shards); "
                  "starting a fresh epoch", state.get("urls"), len(self.urls))
      return
    self.epoch, self.shard, self.offset = state["epoch"], state["shard"], state["offset"]
    self._fill_block()
    self.emitted = state["emitted"]
    if hasattr(self, "_gen"):
      del self._gen

  def stats(self) -> dict:
    return dict(self.stats_.counts)
