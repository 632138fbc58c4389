"""python -m ldm_jax.sample --workdir=DIR --prompt="a red circle ..." [--num 4 --steps 50 ...]
   python -m ldm_jax.sample --pretrained=SD_FOLDER_OR_FILE --prompt="..."

Loads a stage-2 checkpoint (EMA weights by default), samples a batch sharded over
all devices and hosts with one jitted lax.scan sampler, and writes one PNG and
one JSON (every setting) per image plus a grid. The same seed gives the same
images on any number of devices: the noise is drawn for the global batch.
"""
import logging
import os
import time

from absl import app, flags

from ldm_jax import cli

flags.DEFINE_string("workdir", None, "A training workdir (its ldm/ checkpoints are used).")
flags.DEFINE_string("checkpoint", None, "A stage-2 checkpoints folder (instead of --workdir).")
flags.DEFINE_string("pretrained", None, "Stable Diffusion weights instead of a checkpoint: a "
                    "diffusers folder or a single .safetensors/.ckpt file (local or fsspec URL).")
flags.DEFINE_string("pretrained_config", None, "--pretrained single file: a diffusers folder "
                    "whose configs, tokenizer and scheduler describe it.")
flags.DEFINE_string("pretrained_tokenizer", None, "--pretrained: a CLIP tokenizer folder "
                    "(a single file holds none).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
flags.DEFINE_string("prompts_file", None, "A text file with one prompt per line.")
flags.DEFINE_multi_string("negative_prompt", [], "Negative prompt(s): one, or one per prompt.")
flags.DEFINE_multi_integer("label", [], "Class label(s) for class-conditional models.")
flags.DEFINE_integer("num", 4, "Images per prompt (or in all, for unconditional models).")
flags.DEFINE_integer("steps", None, "Sampler steps (default: the config's stage2.sample.steps).")
flags.DEFINE_enum("timestep_spacing", None, ["leading", "trailing", "linspace", "quadratic"],
                  "The sampler's grid, diffusers' names; 'leading' adds the config's "
                  "stage2.sample.steps_offset (default: the config's; 'trailing' on a "
                  "zero-terminal-SNR schedule).")
flags.DEFINE_float("guidance", None, "Classifier-free guidance scale (default: the config's).")
flags.DEFINE_float("guidance_rescale", 0.0, "Guidance rescale phi (Lin et al. 2023).")
flags.DEFINE_list("guidance_interval", None, "lo,hi: guidance only at t / T in [lo, hi] "
                  "(Kynkaanniemi et al. 2024; default: the config's, every step).")
flags.DEFINE_enum("sampler", "ddim", ["ddim", "ddpm", "plms", "dpmpp_2m"], "Sampler.")
flags.DEFINE_float("eta", 0.0, "DDIM eta.")
flags.DEFINE_integer("seed", 0, "Noise seed.")
flags.DEFINE_integer("height", None, "Image height (default: the training resolution).")
flags.DEFINE_integer("width", None, "Image width (default: the training resolution).")
flags.DEFINE_string("init_image", None, "img2img / inpainting source image (PNG/JPEG).")
flags.DEFINE_float("strength", 0.8, "img2img strength in [0, 1].")
flags.DEFINE_string("mask", None, "Inpainting mask image (needs --init_image), Stable Diffusion's "
                    "convention: white (1) = repaint, black (0) = keep.")
flags.DEFINE_string("lowres", None, "Super-resolution models: the low-resolution image.")
flags.DEFINE_string("layout", None, "Layout-to-image models: the semantic / layout map image.")
flags.DEFINE_bool("ema", True, "Use the EMA weights.")
flags.DEFINE_string("out", "samples", "Output folder.")
# Every two-word flag also answers to its hyphenated spelling (--init-image = --init_image).
for _name in ("prompts_file", "negative_prompt", "guidance_rescale", "guidance_interval",
              "init_image", "timestep_spacing"):
  flags.DEFINE_alias(_name.replace("_", "-"), _name)
FLAGS = flags.FLAGS


def _interval(values):
  if values is None:
    return None
  try:
    return tuple(float(v) for v in values)
  except ValueError:
    raise app.UsageError(f"--guidance_interval={','.join(values)}: "
                         "expected two numbers lo,hi") from None


def main(argv):
  del argv
  from ldm_jax.console import setup_logging
  setup_logging()
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  from ldm_jax import sampling
  req = sampling.Request(
      prompts=sampling.read_prompts(FLAGS.prompt, FLAGS.prompts_file),
      negative=list(FLAGS.negative_prompt), labels=list(FLAGS.label), num=FLAGS.num,
      steps=FLAGS.steps, timestep_spacing=FLAGS.timestep_spacing, guidance=FLAGS.guidance,
      guidance_rescale=FLAGS.guidance_rescale,
      guidance_interval=_interval(FLAGS.guidance_interval),
      sampler=FLAGS.sampler, eta=FLAGS.eta, seed=FLAGS.seed, height=FLAGS.height,
      width=FLAGS.width, init_image=FLAGS.init_image, strength=FLAGS.strength, mask=FLAGS.mask,
      lowres=FLAGS.lowres, layout=FLAGS.layout, ema=FLAGS.ema)
  ckpt_dir = FLAGS.checkpoint or (os.path.join(FLAGS.workdir, "ldm", "checkpoints")
                                  if FLAGS.workdir else None)
  loader = None
  if FLAGS.pretrained:
    from ldm_jax import pretrained
    from ldm_jax.pretrained import stage2
    ckpt_dir = FLAGS.pretrained
    loader = lambda: stage2.for_sampling(pretrained.load(
        FLAGS.pretrained, config=FLAGS.pretrained_config, tokenizer=FLAGS.pretrained_tokenizer))
  if ckpt_dir is None:
    raise app.UsageError("give --workdir, --checkpoint or --pretrained")
  t0 = time.time()
  paths = sampling.run(ckpt_dir, req, FLAGS.out, step=FLAGS.step, loader=loader)
  logging.getLogger("ldm_jax").info("wrote %d images and %s in %.1f s", len(paths) - 1, paths[-1], time.time() - t0)


if __name__ == "__main__":
  cli.run(main)
