"""Prompt following on the embedded shapes data: sample one image per held-out prompt
(attribute combinations never seen in training), read the attributes back from the
pixels with `shapes.classify_image`, and score them against the prompt and chance.
`python -m ldm_jax.evaluate_prompts` is its command line."""
import time

import numpy as np

from ldm_jax.data import shapes


def heldout_prompts(num: int, seed: int):
  """`num` held-out attribute sets (combinations never trained on) and their captions."""
  attrs = [shapes.sample_attrs(seed, i, "heldout") for i in range(num)]
  return attrs, [shapes.caption(a) for a in attrs]


JOINT = "colour+kind+position"  # what a caption's meaning rests on, all read right at once
KEYS = shapes.ATTRIBUTES + (JOINT,)


def scalar_name(key: str) -> str:
  """The name under which an accuracy of KEYS is logged (a TensorBoard tag takes no '+')."""
  return "prompts/" + key.replace("+", "_")


def correct(attrs, predicted) -> np.ndarray:
  """(N, len(KEYS)) float32: 1 where a predicted attribute (or all of colour, kind
  and position, the last column) equals the prompt's."""
  hits = [[getattr(g, k) == getattr(a, k) for k in shapes.ATTRIBUTES]
          for g, a in zip(predicted, attrs)]
  hits = np.array(hits, bool).reshape(-1, len(shapes.ATTRIBUTES))
  joint = hits[:, [shapes.ATTRIBUTES.index(k) for k in JOINT.split("+")]].all(1, keepdims=True)
  return np.concatenate([hits, joint], 1).astype(np.float32)


def score(attrs, images) -> dict:
  """Per-attribute accuracy of classify_image(images) against attrs, plus chance."""
  got = [shapes.classify_image(img) for img in images]
  acc = dict(zip(KEYS, map(float, correct(attrs, got).mean(0))))
  chance = {"colour": 1 / (len(shapes.COLOUR_NAMES) - 1), "kind": 1 / len(shapes.KINDS),
            "position": 1 / len(shapes.POSITIONS), "size": 1 / len(shapes.SIZES),
            "background": 1 / len(shapes.COLOUR_NAMES)}
  chance[JOINT] = chance["colour"] * chance["kind"] * chance["position"]
  return dict(accuracy=acc, chance=chance, predicted=[g.to_json() for g in got])


def evaluate(ckpt_dir: str, *, num: int, steps: int, guidance, sampler: str, seed: int,
             chunk: int, out: str, strength: float = 1.0) -> dict:
  """Samples and scores `num` held-out prompts with the stage-2 checkpoint in
  `ckpt_dir`; writes results.json and grid.png to `out` and returns the results."""
  import jax
  from ldm_jax.console import progress
  from ldm_jax import sampling, storage
  from ldm_jax.training import images as image_io
  storage.check_writable(out)
  task, state, mesh, config = sampling.load(ckpt_dir)
  if task.cond.context != "text":
    raise ValueError("evaluate_prompts needs a text-to-image model")
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength={strength}: must be in [0, 1]")
  attrs, prompts = heldout_prompts(num, seed)
  t0 = time.time()
  images = []
  for i in progress(range(0, num, chunk), desc="prompts", unit="batch"):
    batch = task.prepare_batch({"caption": np.array(prompts[i:i + chunk], object)})
    kw = {}
    if strength < 1.0:  # img2img from the exact ground-truth drawing of each prompt
      truth = [shapes.render(a, config.data.resolution) for a in attrs[i:i + chunk]]
      batch["init_image"] = np.stack(truth).astype(np.float32) / 127.5 - 1.0
      kw["strength"] = strength
    images.append(sampling.generate(task, state, mesh, config, batch, seed=seed + i, steps=steps,
                                    guidance=guidance, sampler=sampler, **kw))
  images = np.concatenate(images)
  result = score(attrs, images)
  result.update(num=num, steps=steps, sampler=sampler, seed=seed, seconds=time.time() - t0,
                strength=strength,
                guidance=task.c.sample.guidance if guidance is None else guidance,
                prompts=prompts)
  if jax.process_index() == 0:
    storage.write_json(storage.join(out, "results.json"), result, indent=1)
    image_io.save_png(image_io.grid(images[:64], cols=8), storage.join(out, "grid.png"))
  return result
