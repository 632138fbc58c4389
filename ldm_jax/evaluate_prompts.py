"""python -m ldm_jax.evaluate_prompts --workdir=DIR [--num 100]

Does a text-to-image model trained on the embedded shapes data follow its
prompts? Samples one image per held-out prompt (attribute combinations never
seen in training), reads the attributes back from the pixels with
`shapes.classify_image`, and prints the per-attribute accuracy beside chance.
"""
import logging

from absl import app, flags

from ldm_jax import cli

flags.DEFINE_string("workdir", None, "A txt2img workdir (its ldm/ checkpoints are used).")
flags.DEFINE_string("checkpoint", None, "A stage-2 checkpoints folder (instead of --workdir).")
flags.DEFINE_integer("num", 100, "Held-out prompts to sample (one image each).")
flags.DEFINE_integer("steps", 50, "DDIM steps.")
flags.DEFINE_float("guidance", None, "Guidance scale (default: the config's).")
flags.DEFINE_string("sampler", "ddim", "Sampler.")
flags.DEFINE_integer("seed", 1234, "Seed of the prompts and of the noise.")
flags.DEFINE_integer("chunk", 50, "Images per sampling call.")
flags.DEFINE_float("strength", 1.0, "Below 1: start each sample from the prompt's true image "
                   "noised to this strength (img2img), to find the noise level at which an "
                   "attribute is lost; 0 = the first stage's round trip.")
flags.DEFINE_string("out", None, "Where to write results.json and grid.png (default: workdir/eval).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  if not (FLAGS.workdir or FLAGS.checkpoint):
    raise app.UsageError("give --workdir or --checkpoint")
  for name in ("num", "steps", "chunk"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value}: must be at least 1")
  from ldm_jax.console import setup_logging
  setup_logging()
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  from ldm_jax import storage
  ckpt = FLAGS.checkpoint or storage.join(FLAGS.workdir, "ldm", "checkpoints")
  out = FLAGS.out or storage.join(FLAGS.workdir or ".", "eval")
  from ldm_jax.evaluation.prompts import evaluate
  r = evaluate(ckpt, num=FLAGS.num, steps=FLAGS.steps, guidance=FLAGS.guidance,
               sampler=FLAGS.sampler, seed=FLAGS.seed, chunk=FLAGS.chunk, out=out,
               strength=FLAGS.strength)
  log = logging.getLogger("ldm_jax")
  log.info("%d held-out prompts, %d %s steps, guidance %.1f%s (%.0f s)", r["num"], r["steps"],
           r["sampler"], r["guidance"],
           f", from the true image at strength {r['strength']}" if r["strength"] < 1 else "",
           r["seconds"])
  log.info("%-22s %9s %7s", "attribute", "accuracy", "chance")
  for k, v in r["accuracy"].items():
    log.info("%-22s %8.1f%% %6.1f%%", k, 100 * v, 100 * r["chance"][k])
  log.info("images: %s", storage.join(out, "grid.png"))


if __name__ == "__main__":
  cli.run(main)
