"""Evaluation of generated images while stage 2 trains (`config.stage2.eval`).

Every `eval.every` steps and at the end of the stage, the shared loop calls an
`Evaluator` with the train state. It samples `eval.num` images with the EMA
weights through `generated.evaluate`, the code `python -m ldm_jax.evaluate` runs
(batches sharded over the mesh, the noise of batch b drawn from (seed, b), so the
images do not depend on the number of devices), and returns the scalars; the loop
logs them and writes them to TensorBoard as eval/<metric>, and each evaluation's
numbers go to ldm/eval/train_step<N>.json beside the checkpoints.

FID, KID and IS need the FID Inception's weights and clip_score a CLIP folder,
read from paths only. A metric whose file is named neither in the config nor in
the environment is skipped, and the run says so once (and in every JSON); a file
that is named but missing is an error. No other network stands in for them.
"""
import atexit
import logging
import os
import shutil
import tempfile
import time

import jax

from ldm_jax import storage
from ldm_jax.evaluation import clip_score, generated, inception_features, kid
from ldm_jax.evaluation.inception_score import SPLITS

log = logging.getLogger("ldm_jax")
_INCEPTION = ("fid", "kid", "is")


def _name(field: str) -> str:
  return f"config.stage2.eval.{field}"


def metrics_of(e) -> list:
  """The metric names of `config.stage2.eval.metrics`, a comma list."""
  return [m.strip() for m in e.metrics.split(",") if m.strip()]


def available(config) -> tuple:
  """(the metrics to compute, {skipped metric: why}) of `config.stage2.eval`: those
  whose weights are named neither in the config nor in the environment are skipped."""
  from ldm_jax.models.inception import WEIGHTS_FILE
  e = config.stage2.eval
  metrics, skipped = metrics_of(e), {}
  if not (e.inception_weights or os.environ.get(inception_features.ENV)):
    for m in (m for m in metrics if m in _INCEPTION):
      skipped[m] = (f"no FID Inception weights: set {_name('inception_weights')} or "
                    f"${inception_features.ENV} to pytorch-fid's {WEIGHTS_FILE}")
  if "clip_score" in metrics and not (e.clip or os.environ.get(clip_score.ENV)):
    skipped["clip_score"] = (f"no CLIP model: set {_name('clip')} or ${clip_score.ENV} to a "
                             "transformers CLIPModel folder")
  return [m for m in metrics if m not in skipped], skipped


def check_config(config) -> None:
  """Checks `config.stage2.eval` before anything compiles; raises ValueError (or
  FileNotFoundError for a named file that is missing) naming the field."""
  from ldm_jax.evaluation.fid import load_reference
  e = config.stage2.eval

  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"{_name(field)}: {msg} (got {e[field]!r})")

  need(e.every >= 0, "every", "must be >= 0 (0 = off)")
  for field in ("num", "batch"):
    need(e[field] >= 1, field, "must be positive")
  need(e.steps >= 0, "steps", "must be >= 0 (0 = config.stage2.sample.steps)")
  need(e.guidance >= 0, "guidance", "must be >= 0 (0 = config.stage2.sample.guidance)")
  metrics = metrics_of(e)
  need(metrics and all(m in generated.METRICS for m in metrics), "metrics",
       f"a comma list of {', '.join(generated.METRICS)}")
  if not e.every:
    return
  cond = config.stage2.conditioning
  need(cond.concat == "none", "every", f"evaluation samples text, class and unconditional "
       f"models; this one also takes an image (concat='{cond.concat}'): set it to 0")
  text = cond.context == "text"
  need("prompts" not in metrics or (text and config.data.source == "shapes"), "metrics",
       "'prompts' judges the shapes held-out prompts: it needs a text-to-image model trained "
       "on data.source='shapes'")
  need("clip_score" not in metrics or text, "metrics", "clip_score needs a text-to-image model")
  kept, skipped = available(config)
  need(kept, "metrics", "none can be computed: " + "; ".join(f"{m}: {why}" for m, why in
                                                           skipped.items()))
  need("kid" not in kept or e.num >= kid.SUBSET_SIZE, "num",
       f"KID draws subsets of {kid.SUBSET_SIZE} images: num must be at least that")
  need("is" not in kept or e.num >= SPLITS, "num",
       f"the Inception Score cuts the images into {SPLITS} parts: num must be at least that")
  for field, check in (("inception_weights", inception_features.weights_path),
                       ("clip", clip_score.clip_folder)):
    metric_needs = _INCEPTION if field == "inception_weights" else ("clip_score",)
    if any(m in kept for m in metric_needs):
      try:
        check(e[field] or None)
      except FileNotFoundError as err:
        raise FileNotFoundError(f"{_name(field)}: {err}") from None
  if any(m in kept for m in ("fid", "kid")):
    if e.reference:
      try:
        generated.check_reference(kept, load_reference(e.reference, inception_features.DIM))
      except (OSError, ValueError) as err:
        raise type(err)(f"{_name('reference')}: {err}") from None
    else:
      need(config.data.source == "shapes", "reference",
           f"fid and kid need reference statistics of real images on data.source="
           f"'{config.data.source}': make them with python -m ldm_jax.evaluate "
           "--make_reference --data ... --out STATS.npz")


class Evaluator:
  """Samples and measures a stage-2 train state (`training.step.Evaluator`).

  Args:
    task: the `LDMTask` being trained.
    config: its stage config (`config_lib.for_stage(config, 'stage2')`), checked
      by `check_config`.
    out_dir: where the JSON of each evaluation goes (local or URL); the per-batch
      files and the shapes reference go there too when it is local.
  """

  def __init__(self, task, config, out_dir: str):
    from ldm_jax.evaluation import conditions as cond_lib
    self.task, self.config, self.out_dir = task, config, out_dir
    self.e = config.stage2.eval
    self.every = self.e.every
    self.metrics, self.skipped = available(config)
    self.conditions = cond_lib.conditions_for(task, config, self.e.num, seed=self.e.seed)
    generated.check_conditions(self.metrics, self.conditions)
    # generated.evaluate keeps its per-batch files on a local disk.
    self.local_dir = out_dir
    if storage.is_url(out_dir):
      self.local_dir = tempfile.mkdtemp(prefix="ldm_eval_")
      atexit.register(shutil.rmtree, self.local_dir, True)
    self.judges = None
    if jax.process_index() == 0:
      for m, why in self.skipped.items():
        log.warning("eval: %s skipped (%s)", m, why)
      log.info("eval: every %d steps, %d images: %s", self.every, self.e.num,
               ", ".join(self.metrics))

  def _load(self, mesh) -> generated.Judges:
    from ldm_jax.evaluation import reference
    from ldm_jax.evaluation.fid import load_reference
    e, config = self.e, self.config
    if e.reference:
      ref = load_reference(e.reference, inception_features.DIM)
    elif config.data.source == "shapes":
      ref = reference.shapes_heldout(self.local_dir, config, num=e.num, batch=e.batch)
    else:
      ref = None
    return generated.Judges.load(self.metrics, mesh, num=e.num,
                                 text=self.task.cond.context == "text",
                                 inception_weights=e.inception_weights or None,
                                 clip=e.clip or None, reference=ref)

  def __call__(self, state, mesh) -> dict:
    """The scalars of `state`'s samples: each metric's (`generated.metric_keys`) and
    `seconds`, the time the whole evaluation took."""
    t0 = time.time()
    if self.judges is None:  # the networks and the reference, once
      self.judges = self._load(mesh)
    e = self.e
    r = generated.evaluate(self.task, state, mesh, self.config, self.metrics, self.judges,
                           conditions=self.conditions, num=e.num, out_dir=self.local_dir,
                           batch=e.batch, guidance=e.guidance or None, steps=e.steps or None,
                           seed=e.seed)
    scalars = {k: r[k] for k in generated.metric_keys(self.metrics)}
    scalars["seconds"] = time.time() - t0
    if jax.process_index() == 0:
      s = self.config.stage2.sample
      step = int(jax.device_get(state["step"]))
      storage.write_json(storage.join(self.out_dir, f"train_step{step:07d}.json"), dict(
          step=step, metrics=self.metrics, skipped=self.skipped, num=e.num, ema=True,
          guidance=e.guidance or s.guidance, steps=e.steps or s.steps, sampler=s.sampler,
          seed=e.seed, conditions=self.conditions.source, folder=r["folder"],
          reference=self.judges.reference.path if self.judges.reference else None,
          **scalars), indent=1)
    return scalars
