"""What each image of an evaluation is conditioned on.

  text models:  the captions of `--captions` (a text file, one caption a line, or
                webdataset shards: each sample's .txt or json 'caption'), else on
                the shapes data its held-out prompts (combinations never trained on);
  class models: the labels 0, 1, ..., classes - 1 in turn, so every class is
                sampled equally often (uniform over the labels);
  unconditional models: nothing.
Image i takes condition i, whatever the batch size or the number of devices.
"""
import dataclasses
import os
from typing import Optional

import numpy as np

from ldm_jax.data import decode, shards
from ldm_jax.evaluation.prompts import heldout_prompts
from ldm_jax.evaluation.store import digest


def read_captions(spec: str, num: int) -> list:
  """The first `num` captions of a text file or of webdataset shards.

  Raises:
    ValueError when they are fewer than `num` or cannot be read, naming `spec`.
  """
  if os.path.isfile(spec) and not spec.endswith(".tar"):
    with open(spec, encoding="utf-8") as f:
      out = [line.strip() for line in f if line.strip()]
  else:
    out = []
    urls = shards.list_shards(spec)
    for url in urls:
      try:
        for sample in shards.iter_samples(url):
          cap = decode.read_text(sample.get("txt"), {})
          cap = cap if cap is not None else decode.read_json(sample.get("json")).get("caption")
          if cap:
            out.append(str(cap))
          if len(out) == num:
            break
      except Exception as e:  # missing or unreadable shard: name it
        raise ValueError(f"--captions={spec!r}: cannot read {url}: {e}") from None
      if len(out) == num:
        break
    if not urls:
      raise ValueError(f"--captions={spec!r} is neither a text file nor webdataset shards")
  if len(out) < num:
    raise ValueError(f"--captions={spec!r} holds {len(out)} captions; --num={num} needs as many")
  return out[:num]


@dataclasses.dataclass(frozen=True)
class Conditions:
  """The condition of every image index.

  Attributes:
    kind: 'text' | 'class' | 'none'.
    captions: text: one per image.
    classes: class: the number of labels.
    source: where the conditions come from, for the results.
    attrs: the shapes held-out prompts' attribute sets, one per caption (what the
      prompt judge compares the images with); () for other captions.
  """
  kind: str
  captions: tuple = ()
  classes: int = 0
  source: str = ""
  attrs: tuple = ()

  def captions_of(self, lo: int, hi: int) -> list:
    """Captions of images lo..hi-1 (indices past the end wrap: padding rows)."""
    return [self.captions[i % len(self.captions)] for i in range(lo, hi)]

  def attrs_of(self, lo: int, hi: int) -> list:
    """The attribute sets of images lo..hi-1, wrapping as `captions_of`."""
    return [self.attrs[i % len(self.attrs)] for i in range(lo, hi)]

  def host_batch(self, lo: int, hi: int) -> dict:
    """The host batch of images lo..hi-1 for `task.prepare_batch`."""
    if self.kind == "text":
      return {"caption": np.array(self.captions_of(lo, hi), object)}
    if self.kind == "class":
      return {"label": (np.arange(lo, hi) % self.classes).astype(np.int32)}
    # An unconditional model's batch carries only its size: this array's length.
    return {"image": np.zeros((hi - lo, 1, 1, 1), np.float32)}

  def key(self) -> dict:
    """What fixes the conditions, for the evaluation's folder name."""
    return dict(kind=self.kind, classes=self.classes, source=self.source,
                captions=digest(list(self.captions)))


def conditions_for(task, config, num: int, captions: Optional[str] = None,
                   seed: int = 0) -> Conditions:
  """The conditions of `num` images for the stage-2 model of `task`.

  Raises:
    ValueError for models evaluate cannot condition (image-conditioned ones) and
    for captions a model does not take or lacks.
  """
  cond = task.cond
  if cond.concat != "none":
    raise ValueError(f"evaluate samples text, class and unconditional models; this one also "
                     f"takes an image (concat='{cond.concat}')")
  if cond.context == "text":
    if captions:
      return Conditions("text", tuple(read_captions(captions, num)), source=f"captions {captions}")
    if config.data.source != "shapes":
      raise ValueError("this text-to-image model needs --captions (a text file, one caption a "
                       "line, or webdataset shards)")
    attrs, prompts = heldout_prompts(num, seed)
    return Conditions("text", tuple(prompts), source=f"shapes held-out prompts, seed {seed}",
                      attrs=tuple(attrs))
  if captions:
    raise ValueError("--captions is for text-to-image models; this one takes "
                     + ("class labels" if cond.classes else "no condition"))
  if cond.classes:
    return Conditions("class", classes=cond.classes, source=f"labels 0..{cond.classes - 1} in turn")
  return Conditions("none", source="unconditional")
