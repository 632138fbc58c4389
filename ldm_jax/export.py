"""python -m ldm_jax.export --workdir=DIR --format=diffusers|single_file --out=PATH

Writes a stage-2 checkpoint's weights (EMA by default) as Stable Diffusion: a
diffusers folder that `StableDiffusionPipeline.from_pretrained(PATH)` loads
offline (unet, vae, text_encoder, tokenizer, scheduler, model_index.json), or one
`.safetensors` in the CompVis layout that single-file loaders read. A model that
diffusers' Stable Diffusion cannot express (ldm_jax's own text transformer, a VQ
first stage, a patched UNet, ...) fails before anything is written, saying why.
"""
import logging
import os

from absl import app, flags

from ldm_jax import cli

flags.DEFINE_string("workdir", None, "A training workdir (its ldm/ checkpoints are used).")
flags.DEFINE_string("checkpoint", None, "A stage-2 checkpoints folder (instead of --workdir).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_bool("ema", True, "Export the EMA weights (--noema: the trained weights).")
flags.DEFINE_enum("format", "diffusers", ["diffusers", "single_file"], "Output layout.")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored precision.")
flags.DEFINE_string("out", None, "Output folder (diffusers) or .safetensors file (single_file).")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from ldm_jax.console import setup_logging
  setup_logging()
  ckpt_dir = FLAGS.checkpoint or (os.path.join(FLAGS.workdir, "ldm", "checkpoints")
                                  if FLAGS.workdir else None)
  if ckpt_dir is None or not FLAGS.out:
    raise app.UsageError("give --workdir or --checkpoint, and --out")
  from ldm_jax.pretrained import export
  path = export.export_checkpoint(ckpt_dir, FLAGS.out, fmt=FLAGS.format, ema=FLAGS.ema,
                                  dtype=FLAGS.dtype, step=FLAGS.step)
  logging.getLogger("ldm_jax").info("wrote %s (%s, %s weights)", path, FLAGS.format,
                                    "EMA" if FLAGS.ema else "trained")


if __name__ == "__main__":
  cli.run(main)
