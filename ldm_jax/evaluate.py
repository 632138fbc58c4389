"""python -m ldm_jax.evaluate --workdir=DIR --metrics=fid,kid,clip_score,is --num=N
       [--captions=FILE|SHARDS] [--reference=STATS.npz] [--guidance=1.5,3,5,7.5]
       [--sampler ddim --steps 50 --seed 0 --batch 64]
python -m ldm_jax.evaluate --make_reference --data=shapes|wds:PATTERN|tfds:NAME --num=N
       --out=STATS.npz [--resolution R | --workdir DIR]

Judges the images a stage-2 model generates as the literature does (docs/evaluation.md):
FID and KID against reference statistics, the Inception Score, and the CLIP score
of text-to-image samples, one row per guidance scale (the FID / CLIP-score
trade-off); on the shapes data also the prompt accuracy (`prompts`: the
attributes read back from each image against its held-out prompt's). Images are sampled in batches sharded over every device and host;
each batch's metric inputs are kept under DIR/eval/, so a restarted run skips the
batches it finished. Process 0 prints the table and writes DIR/eval/results_*.json
and TensorBoard scalars (eval/<metric>_g<guidance>) into the run's ldm/tensorboard.

Weights are read from paths, never downloaded: the FID Inception from
--inception_weights or $LDM_INCEPTION_WEIGHTS (pytorch-fid's
pt_inception-2015-12-05-6726825d.pth), CLIP from --clip or $LDM_CLIP (a
transformers CLIPModel folder, e.g. openai/clip-vit-large-patch14). Without
--reference, a model trained on the shapes data is compared with held-out shapes
images (their statistics are made once and kept in DIR/eval/).
"""
import json
import logging
import os
import time
import types

from absl import flags

from ldm_jax import cli

log = logging.getLogger("ldm_jax")
# The defaults below are kid.NUM_SUBSETS, kid.SUBSET_SIZE and inception_score.SPLITS,
# written out so that --help needs no jax import (test_evaluate checks they agree).
flags.DEFINE_string("workdir", None, "A training workdir (its ldm/checkpoints are evaluated).")
flags.DEFINE_string("checkpoint", None, "A stage-2 checkpoints folder (instead of --workdir).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("metrics", "fid", "Comma list of fid, kid, is, clip_score, prompts.")
flags.DEFINE_integer("num", 10000, "Images to generate (or to read with --make_reference).")
flags.DEFINE_integer("batch", 64, "Images per sampling / Inception call (rounded up to a "
                     "multiple of the devices).")
flags.DEFINE_string("captions", None, "Text models: a text file (one caption a line) or "
                    "webdataset shards; default on shapes: its held-out prompts.")
flags.DEFINE_string("reference", None, "Reference statistics .npz (ours, pytorch-fid's or "
                    "clean-fid's); default on shapes: held-out images.")
flags.DEFINE_string("guidance", None, "Comma list of guidance scales, one row each "
                    "(default: the config's).")
flags.DEFINE_enum("sampler", None, ["ddim", "ddpm", "plms", "dpmpp_2m"],
                  "Sampler (default: the config's).")
flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's).")
flags.DEFINE_integer("seed", 0, "Seed of the noise and of the shapes prompts.")
flags.DEFINE_string("inception_weights", None, "FID Inception weights (default: "
                    "$LDM_INCEPTION_WEIGHTS).")
flags.DEFINE_string("clip", None, "CLIP folder for clip_score (default: $LDM_CLIP).")
flags.DEFINE_integer("kid_subsets", 100, "KID: random subset pairs averaged over.")
flags.DEFINE_integer("kid_subset_size", 1000, "KID: features per subset (--num and the "
                     "reference need at least as many).")
flags.DEFINE_integer("is_splits", 10, "Inception Score: consecutive parts averaged over.")
flags.DEFINE_string("out", None, "--make_reference: the .npz to write; else the folder for "
                    "results (default: DIR/eval).")
flags.DEFINE_bool("make_reference", False, "Write reference statistics.")
flags.DEFINE_string("data", None, "--make_reference: shapes[:SPLIT] | wds:PATTERN | "
                    "tfds:NAME[:SPLIT].")
flags.DEFINE_integer("resolution", None, "--make_reference: image side (default: --workdir's "
                     "model's).")
FLAGS = flags.FLAGS
_NAMES = ("workdir", "checkpoint", "step", "metrics", "num", "batch", "captions", "reference",
          "guidance", "sampler", "steps", "seed", "inception_weights", "clip", "kid_subsets",
          "kid_subset_size", "is_splits", "out", "make_reference", "data", "resolution")


def parse_args() -> types.SimpleNamespace:
  """The parsed flags, checked, with --metrics and --guidance as lists.

  Raises:
    ValueError naming the flag.
  """
  args = types.SimpleNamespace(**{k: FLAGS[k].value for k in _NAMES})
  if args.num < 1 or args.batch < 1:
    raise ValueError(f"--num={args.num} and --batch={args.batch} must be positive")
  args.metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
  try:
    args.guidance = [float(g) for g in args.guidance.split(",")] if args.guidance else [None]
  except ValueError:
    raise ValueError(f"--guidance={args.guidance!r}: expected a comma list of numbers") from None
  return args


def _ckpt_dir(args):
  if args.checkpoint:
    return args.checkpoint
  if args.workdir:
    return os.path.join(args.workdir, "ldm", "checkpoints")
  raise ValueError("give --workdir or --checkpoint")


def make_reference(args) -> dict:
  """--make_reference: statistics of --num images of --data into --out."""
  import jax
  import ml_collections
  from ldm_jax import parallel
  from ldm_jax.evaluation import inception_features, reference
  if not args.data or not args.out:
    raise ValueError("--make_reference needs --data and --out")
  resolution, cache_dir = args.resolution, ""
  if resolution is None and (args.workdir or args.checkpoint):
    from ldm_jax import checkpoint
    ckpt = checkpoint.Checkpointer(_ckpt_dir(args))
    saved = ckpt.saved_config() or {}
    ckpt.close()
    resolution = saved.get("data", {}).get("resolution")
    cache_dir = saved.get("data", {}).get("cache_dir", "")
  if resolution is None:
    raise ValueError("--make_reference needs --resolution (or --workdir, to take its model's)")
  reference.data_config(args.data, num=args.num, resolution=resolution)  # a bad --data fails here
  inception_features.weights_path(args.inception_weights)
  mesh = parallel.make_mesh(ml_collections.ConfigDict(
      dict(mesh=[("data", -1), ("fsdp", 1), ("tensor", 1)])), jax.devices())
  inc = inception_features.InceptionFeatures(args.inception_weights, mesh)
  ref = reference.make_reference(args.data, args.out, inc, num=args.num, resolution=resolution,
                                 batch=args.batch, cache_dir=cache_dir, seed=args.seed)
  log.info("wrote %s: %d images of %s at %d px", args.out, ref.num, args.data, resolution)
  return dict(out=args.out, num=ref.num)


def evaluate(args) -> dict:
  """Samples and measures the checkpoint once per guidance scale; returns the results."""
  import jax
  from ldm_jax import sampling
  from ldm_jax.evaluation import conditions as cond_lib, generated, reference
  from ldm_jax.evaluation.fid import load_reference
  from ldm_jax.evaluation.inception_features import DIM
  ckpt_dir = _ckpt_dir(args)
  out_dir = args.out or os.path.join(args.workdir or os.path.dirname(os.path.dirname(
      os.path.abspath(ckpt_dir))), "eval")
  numbers = dict(kid_subsets=args.kid_subsets, kid_subset_size=args.kid_subset_size,
                 is_splits=args.is_splits)
  ref = load_reference(args.reference, DIM) if args.reference else None
  generated.check(args.metrics, num=args.num, inception_weights=args.inception_weights,
                  clip=args.clip, reference=ref, **numbers)
  task, state, mesh, config = sampling.load(ckpt_dir, args.step)
  if [g for g in args.guidance if g not in (None, 1.0)] and not task.cond.guidable:
    raise ValueError("--guidance needs a conditional model; this one is unconditional")
  conds = cond_lib.conditions_for(task, config, args.num, args.captions, args.seed)
  generated.check_conditions(args.metrics, conds)
  if ref is None and config.data.source == "shapes":
    ref = reference.shapes_heldout(out_dir, config, num=args.num, batch=args.batch)
  judges = generated.Judges.load(
      args.metrics, mesh, num=args.num, text=task.cond.context == "text",
      inception_weights=args.inception_weights, clip=args.clip, reference=ref, **numbers)
  step = int(jax.device_get(state["step"]))
  rows = []
  for g in args.guidance:
    r = generated.evaluate(task, state, mesh, config, args.metrics, judges, conditions=conds,
                           num=args.num, out_dir=out_dir, batch=args.batch, guidance=g,
                           steps=args.steps, sampler=args.sampler, seed=args.seed)
    rows.append(dict(guidance=config.stage2.sample.guidance if g is None else g, **r))
  s = config.stage2.sample
  result = dict(checkpoint=os.path.abspath(ckpt_dir), step=step, metrics=args.metrics,
                num=args.num, sampler=args.sampler or s.sampler, steps=args.steps or s.steps,
                seed=args.seed, conditions=conds.source,
                reference=judges.reference.path if judges.reference else None, rows=rows)
  if jax.process_index() == 0:
    _report(result, out_dir, os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)),
                                          "tensorboard"))
  return result


_COLUMNS = (("fid", "FID", 1), ("kid", "KID x 10^3", 1e3), ("is", "IS", 1),
            ("clip_score", "CLIP score", 1), ("prompts", "prompts c+k+p %", 100))


def table(result: dict) -> str:
  """The results as a Markdown table, one row per guidance scale."""
  from ldm_jax.evaluation.prompts import JOINT, scalar_name
  cols = [(scalar_name(JOINT) if c[0] == "prompts" else c[0],) + c[1:]
          for c in _COLUMNS if c[0] in result["metrics"]]
  lines = ["| guidance | " + " | ".join(c[1] for c in cols) + " |",
           "|---" * (len(cols) + 1) + "|"]
  for r in result["rows"]:
    cells = []
    for key, _, scale in cols:
      v = f"{r[key] * scale:.3f}" if key in ("fid", "kid") else f"{r[key] * scale:.2f}"
      cells.append(v + (f" ± {r[key + '_std'] * scale:.3f}" if key + "_std" in r else ""))
    lines.append(f"| {r['guidance']:g} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _report(result: dict, out_dir: str, tb_dir: str) -> None:
  from tensorboardX import SummaryWriter
  from ldm_jax.evaluation.generated import metric_keys
  print(f"{result['num']} images per row, checkpoint step {result['step']}, {result['steps']} "
        f"{result['sampler']} steps, conditions: {result['conditions']}; reference: "
        f"{result['reference'] or '-'}")
  print(table(result))
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"results_step{result['step']}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1)
  writer = SummaryWriter(tb_dir)
  for r in result["rows"]:
    for key in metric_keys(result["metrics"]):
      if not key.endswith("_std"):
        writer.add_scalar(f"eval/{key}_g{r['guidance']:g}", r[key], result["step"])
  writer.close()
  log.info("wrote %s and TensorBoard scalars in %s", path, tb_dir)


def main(argv) -> dict:
  del argv  # every setting is a flag
  from ldm_jax.console import setup_logging
  setup_logging()
  args = parse_args()
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  t0 = time.time()
  out = make_reference(args) if args.make_reference else evaluate(args)
  log.info("done in %.0f s", time.time() - t0)
  return out


if __name__ == "__main__":
  cli.run(main)
