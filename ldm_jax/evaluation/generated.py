"""FID, KID, Inception Score, CLIP score and (on the shapes data) prompt accuracy
of the images a stage-2 model generates.

`evaluate(task, state, mesh, config, metrics, judges, ...)` samples `num` images
batch by batch (each batch sharded over every device and host by
`sampling.generate`), keeps only each batch's metric inputs (`store`), and
returns the metrics as scalars: the command line (`ldm_jax.evaluate`) calls it
once per guidance scale, training (`evaluation.periodic`) every so many steps.
`Judges` holds what the metrics need (the Inception, CLIP, the reference
statistics); `Judges.load` checks everything before anything compiles.
"""
import dataclasses
import os
import time
from typing import Optional, Sequence

import jax
import numpy as np

from jax.experimental import multihost_utils

from ldm_jax import parallel, sampling
from ldm_jax.console import progress
from ldm_jax.evaluation import fid as fid_lib
from ldm_jax.evaluation import kid as kid_lib
from ldm_jax.evaluation import prompts as prompts_lib
from ldm_jax.evaluation.conditions import Conditions
from ldm_jax.evaluation.inception_score import SPLITS, inception_score
from ldm_jax.evaluation.store import BatchStore, digest
from ldm_jax.data import shapes
from ldm_jax.models import inception as inception_lib
from ldm_jax.training import images as image_io

METRICS = ("fid", "kid", "is", "clip_score", "prompts")
_INCEPTION_METRICS = ("fid", "kid", "is")


@dataclasses.dataclass
class Judges:
  """The networks and reference statistics the metrics are computed with.

  Attributes:
    inception: an `InceptionFeatures` (fid, kid, is).
    clip: a `ClipScorer` (clip_score).
    reference: `fid.Reference` statistics of real images (fid; kid needs its features).
    kid_subsets, kid_subset_size: KID's subsets.
    is_splits: the Inception Score's splits.
  """
  inception: Optional[object] = None
  clip: Optional[object] = None
  reference: Optional[fid_lib.Reference] = None
  kid_subsets: int = kid_lib.NUM_SUBSETS
  kid_subset_size: int = kid_lib.SUBSET_SIZE
  is_splits: int = SPLITS

  @classmethod
  def load(cls, metrics: Sequence[str], mesh, *, num: int, text: bool,
           inception_weights: Optional[str] = None, clip: Optional[str] = None,
           reference=None, **kw) -> "Judges":
    """Checks the request (`check`) and loads what `metrics` need.

    Args:
      metrics, num, inception_weights, clip, kw: as `check`.
      text: whether the model is text-conditioned (clip_score needs captions).
      reference: a `fid.Reference`, or a callable (InceptionFeatures) -> Reference
        that makes one (the shapes data's held-out images).
    """
    from ldm_jax.evaluation.clip_score import ClipScorer
    from ldm_jax.evaluation.inception_features import InceptionFeatures
    made = callable(reference)
    check(metrics, num=num, inception_weights=inception_weights, clip=clip,
          reference=None if made else reference, **kw)
    if "clip_score" in metrics and not text:
      raise ValueError("clip_score needs a text-to-image model (it compares images with captions)")
    judges = cls(**kw)
    if any(m in metrics for m in _INCEPTION_METRICS):
      judges.inception = InceptionFeatures(inception_weights, mesh)
    if any(m in metrics for m in ("fid", "kid")):
      if reference is None:
        raise ValueError("FID and KID need reference statistics: give --reference=STATS.npz "
                         "(python -m ldm_jax.evaluate --make_reference ... makes them)")
      judges.reference = reference(judges.inception) if made else reference
      check_reference(metrics, judges.reference, judges.kid_subset_size)
    if "clip_score" in metrics:
      judges.clip = ClipScorer(clip, mesh)
    return judges


def check(metrics: Sequence[str], *, num: int, inception_weights: Optional[str] = None,
          clip: Optional[str] = None, reference: Optional[fid_lib.Reference] = None,
          kid_subsets: int = kid_lib.NUM_SUBSETS, kid_subset_size: int = kid_lib.SUBSET_SIZE,
          is_splits: int = SPLITS) -> None:
  """Everything about a request that can be checked without devices.

  Args:
    metrics: names from METRICS; num: images that will be generated.
    inception_weights, clip: paths, checked when a metric needs them (None: the
      environment's $LDM_INCEPTION_WEIGHTS, $LDM_CLIP).
    reference: checked when given (`check_reference`).
    kid_subsets, kid_subset_size, is_splits: KID's subsets, the IS's splits.
  Raises:
    ValueError / FileNotFoundError naming the flag, file or number at fault.
  """
  from ldm_jax.evaluation.clip_score import clip_folder
  from ldm_jax.evaluation.inception_features import weights_path
  unknown = [m for m in metrics if m not in METRICS]
  if unknown or not metrics:
    raise ValueError(f"--metrics={','.join(metrics)}: choose from {', '.join(METRICS)}")
  if "clip_score" in metrics:
    clip_folder(clip)
  if any(m in metrics for m in _INCEPTION_METRICS):
    weights_path(inception_weights)
  if "kid" in metrics:
    if kid_subsets < 1:
      raise ValueError(f"--kid_subsets={kid_subsets} must be positive")
    if num < kid_subset_size:
      raise ValueError(f"--num={num} is smaller than the KID subset size "
                       f"--kid_subset_size={kid_subset_size}")
  if "is" in metrics and not 1 <= is_splits <= num:
    raise ValueError(f"the Inception Score cuts --num={num} images into --is_splits="
                     f"{is_splits}: give 1 to {num} splits")
  if reference is not None:
    check_reference(metrics, reference, kid_subset_size)


def check_reference(metrics: Sequence[str], reference: fid_lib.Reference,
                    kid_subset_size: int = kid_lib.SUBSET_SIZE) -> None:
  """Raises ValueError when `reference` has the wrong feature size, or lacks the
  features (or enough of them) KID needs."""
  from ldm_jax.evaluation.inception_features import DIM
  if reference.dim != DIM:
    raise ValueError(f"reference {reference.path!r} has {reference.dim}-d features; the "
                     f"Inception pool3 features are {DIM}-d")
  if "kid" in metrics:
    if reference.features is None:
      raise ValueError(f"KID needs the reference's features; {reference.path!r} holds only "
                       "mu and sigma (make one with --make_reference)")
    if len(reference.features) < kid_subset_size:
      raise ValueError(f"reference {reference.path!r} has {len(reference.features)} features, "
                       f"fewer than the KID subset size --kid_subset_size={kid_subset_size}")


def check_conditions(metrics: Sequence[str], conditions: Conditions) -> None:
  """Raises ValueError when 'prompts' is asked for conditions it cannot judge: it reads
  the attributes of a shapes image back and needs the shapes held-out prompts."""
  if "prompts" in metrics and not conditions.attrs:
    raise ValueError("the 'prompts' metric judges the shapes held-out prompts: it needs a "
                     f"text-to-image model trained on the shapes data (conditions here: "
                     f"{conditions.source})")


def sample_batch(task, state, mesh, config, conditions: Conditions, b: int, batch: int, *,
                 seed: int, **kw) -> np.ndarray:
  """uint8 images b * batch ... (b + 1) * batch - 1, the same on every process and
  for any number of devices (the noise of batch b is drawn from (seed, b) for the
  whole batch); kw go to `LDMTask.sample` (steps, guidance, sampler, use_ema)."""
  host = task.prepare_batch(conditions.host_batch(b * batch, (b + 1) * batch))
  batch_seed = int(np.random.default_rng([seed, b]).integers(2 ** 31))
  return image_io.to_uint8(sampling.generate(task, state, mesh, config, host, seed=batch_seed,
                                             **kw))


def evaluate(task, state, mesh, config, metrics: Sequence[str], judges: Judges, *,
             conditions: Conditions, num: int, out_dir: str, batch: int = 64,
             guidance: Optional[float] = None, steps: Optional[int] = None,
             sampler: Optional[str] = None, seed: int = 0, use_ema: bool = True) -> dict:
  """Samples `num` images and measures them.

  Args:
    task, state, mesh, config: a stage-2 task and its (restored or training) state.
    metrics: names from METRICS, with `judges` loaded for them.
    conditions: what image i is conditioned on (`conditions.conditions_for`).
    num: images to generate.
    out_dir: where the per-batch results go (DIR/eval): a restarted call with the
      same arguments resamples only the batches it had not finished.
    batch: images per sampling call (rounded up to a multiple of the devices).
    guidance, steps, sampler: the sampler's settings (None: the config's).
    seed: the noise seed (batch b draws from (seed, b)).
  Returns:
    Scalars: fid; kid, kid_std; is, is_std; clip_score, clip_score_std;
    prompts/<attribute> (accuracy in [0, 1], `prompts.scalar_name`) (those asked for),
    num, seconds, and folder (the per-batch results).
  """
  s = config.stage2.sample
  guidance = s.guidance if guidance is None else float(guidance)
  steps, sampler = steps or s.steps, sampler or s.sampler
  dp = parallel.data_parallel_size(mesh)
  batch = -(-batch // dp) * dp
  num_batches = -(-num // batch)
  step = int(jax.device_get(state["step"]))
  needs = {}
  if any(m in metrics for m in _INCEPTION_METRICS):
    needs.update(pool3=judges.inception.fingerprint, logits=judges.inception.fingerprint)
  if "clip_score" in metrics:
    needs["clip"] = judges.clip.fingerprint
  if "prompts" in metrics:
    needs["prompts"] = "shapes.classify_image"
  settings = dict(step=step, ema=use_ema, sampler=sampler, steps=steps, guidance=guidance,
                  seed=seed, batch=batch, num=num, resolution=config.data.resolution,
                  inception_size=inception_lib.FID_SIZE, conditions=conditions.key())
  name = f"step{step}_{sampler}{steps}_g{guidance:g}_seed{seed}_n{num}_{digest(settings)}"
  store = BatchStore(os.path.join(out_dir, name), settings)
  done = store.done(num_batches, needs)
  t0 = time.time()
  per = batch // jax.process_count()
  mine = slice(jax.process_index() * per, (jax.process_index() + 1) * per)
  todo = np.flatnonzero(~done)
  for b in progress(todo, desc=f"eval {name}", unit="batch", initial=num_batches - len(todo),
                    total=num_batches):
    lo, hi = b * batch, (b + 1) * batch
    images = sample_batch(task, state, mesh, config, conditions, b, batch, seed=seed,
                          steps=steps, guidance=guidance, sampler=sampler, use_ema=use_ema)
    out = {}
    if "pool3" in needs:
      out.update(judges.inception(images[mine]))
    if "clip" in needs:
      out["clip"] = judges.clip(images[mine], conditions.captions_of(lo, hi)[mine])
    if "prompts" in needs and jax.process_index() == 0:  # numpy, and only process 0 writes
      out["prompts"] = prompts_lib.correct(conditions.attrs_of(lo, hi),
                                           [shapes.classify_image(im) for im in images])
    store.save(b, out, needs)
    if b == 0 and jax.process_index() == 0:  # a look at what is being measured
      grid = image_io.grid(images[:64].astype(np.float32) / 127.5 - 1)
      image_io.save_png(grid, os.path.join(store.folder, "grid.png"))
  seconds = time.time() - t0
  res = _metrics(store, metrics, judges, num_batches, num, list(needs)) \
      if jax.process_index() == 0 else {}
  if jax.process_count() > 1:  # the scalars of process 0, which read the files
    keys = sorted(metric_keys(metrics))
    vals = np.array([res.get(k, 0.0) for k in keys], np.float64)
    res = dict(zip(keys, map(float, multihost_utils.broadcast_one_to_all(vals))))
  return dict(res, num=num, seconds=round(seconds, 1), sampled_batches=int((~done).sum()),
              folder=store.folder)


def metric_keys(metrics) -> list:
  """The scalars `evaluate` returns for `metrics`, in order."""
  keys = {"fid": ["fid"], "kid": ["kid", "kid_std"], "is": ["is", "is_std"],
          "clip_score": ["clip_score", "clip_score_std"],
          "prompts": [prompts_lib.scalar_name(k) for k in prompts_lib.KEYS]}
  return [k for m in metrics for k in keys[m]]


def _metrics(store: BatchStore, metrics, judges: Judges, num_batches: int, num: int,
             keys: list) -> dict:
  """The metrics from the stored batches (the first `num` images)."""
  got = {k: [] for k in keys}
  left = num
  for b in range(num_batches):
    part = store.load(b, keys)
    for k in keys:
      got[k].append(part[k][:left])
    left -= len(part[keys[0]][:left])
  got = {k: np.concatenate(v) for k, v in got.items()}
  res = {}
  ref = judges.reference
  if "fid" in metrics:
    res["fid"] = fid_lib.frechet_distance_of_features(got["pool3"], ref.mu, ref.sigma)
  if "kid" in metrics:
    res["kid"], res["kid_std"] = kid_lib.kernel_inception_distance(
        got["pool3"], ref.features, num_subsets=judges.kid_subsets,
        subset_size=judges.kid_subset_size)
  if "is" in metrics:
    res["is"], res["is_std"] = inception_score(got["logits"], judges.is_splits)
  if "clip_score" in metrics:
    res["clip_score"] = float(np.mean(got["clip"]))
    res["clip_score_std"] = float(np.std(got["clip"]))
  if "prompts" in metrics:
    res.update({prompts_lib.scalar_name(k): float(v)
                for k, v in zip(prompts_lib.KEYS, got["prompts"].mean(0))})
  return res
