"""Text-to-image LDM: a KL autoencoder, then a UNet with cross-attention on a text encoder.

arg: size=tiny|base|sd15|sd2 (tiny: 32 px on the embedded shapes data, trains on a
CPU in minutes), data=shapes|wds|tfds. Overrides: --config.stage2.lr=5e-5 etc.
The other LDM configs (unconditional, class_cond, super_resolution, inpainting,
layout) are this recipe, `ldm(arg, ...)`, with their own conditioning.
"""
from ldm_jax import config_lib

SIZES = ("tiny", "base", "sd15", "sd2")
RESOLUTION = {"tiny": 32, "base": 256, "sd15": 512, "sd2": 768}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, size="tiny", data="shapes")
  c = ldm(arg, context="text")
  if arg.size == "tiny" and arg.data == "shapes":
    # Prompt accuracy (and FID, given the Inception weights) at each checkpoint, so
    # the run shows its progress; a small share of the run's time (docs/experiments.md).
    c.stage2.eval.every = 500
  return c.lock()


def ldm(arg, *, context: str, classes: int = 0, concat: str = "none", sizes=SIZES):
  """The two-stage recipe of `arg.size` on `arg.data`, stage 2 conditioned by
  (context, classes, concat) as training/conditioning.py describes."""
  config_lib.check_arg(arg, "size", sizes)
  tiny, sd = arg.size == "tiny", arg.size in ("sd15", "sd2")
  res = RESOLUTION[arg.size]
  c = config_lib.spine(batch_size={"tiny": 64, "base": 256}.get(arg.size, 2048))
  c.data = config_lib.data(arg.data, res)
  c.data.num_classes = classes  # a sample without a usable label is skipped, not a failed step
  # Stable Diffusion weights to fine-tune ("" = train from scratch): a diffusers folder
  # or a CompVis single file, local or an fsspec URL. They fix the first stage, the
  # UNet, the text encoder and tokenizer, the schedule and the latent scale, so stage 1
  # is skipped; the size's presets give way to them (ldm_jax/pretrained/finetune.py).
  c.pretrained = ""
  c.pretrained_config = ""     # single file: a diffusers folder of its configs + tokenizer
  c.pretrained_tokenizer = ""  # single file: a CLIP tokenizer folder (without pretrained_config)

  # Stage 1: the perceptual autoencoder. tiny: f=4, 8x8 latents of 32 px images;
  # base: the paper's kl-f8. SD's sizes train none: their VAE comes trained
  # (config.pretrained).
  c.stage1 = config_lib.autoencoder_stage("kl", 4 if tiny else 8, "tiny" if tiny else "ref", res)
  c.stage1.total_steps = {"tiny": 2400, "base": 200_000}.get(arg.size, 0)
  c.stage1.batch_size = {"tiny": 16, "base": 96}.get(arg.size, 8)
  # Decode posterior samples in training (the reference), so the decoder has seen
  # latents off the mean, as stage 2's are.
  c.stage1.sample_posterior = True
  if tiny:
    # A decoder that also reads noised latents (tau 0.1): stage 2's samples are
    # such latents, and it keeps the shape's kind in them (docs/experiments.md).
    c.stage1.loss.latent_noise = 0.1
  c.stages = ("autoencoder", "ldm") if c.stage1.total_steps else ("ldm",)

  # Stage 2: the UNet on z = scale_factor * E(x).
  c.stage2 = config_lib.ldm_stage(arg.size, context=context, classes=classes, concat=concat)
  c.stage2.total_steps = 3000 if tiny else 400_000
  c.stage2.batch_size = c.batch_size
  if context == "text" and arg.data == "shapes":
    config_lib.shapes_text(c.stage2, words=arg.size in ("tiny", "base"))
  if tiny:  # minutes on a CPU
    c.stage2.lr = 1e-3                  # a high learning rate, a short warm-up
    c.stage2.warmup_steps = 100
    # v-prediction with its plain loss (SD 2.x's): it keeps the weight of the
    # low-noise steps, where the shape's outline is drawn.
    c.stage2.prediction_type = "v"
    # t = T sigmoid(u), u ~ N(-0.5, 1): more updates on the low-noise steps, where
    # the shape's kind is lost (evaluate_prompts --strength shows where).
    c.stage2.timestep_sampling = "logit_normal"
    c.stage2.logit_mean = -0.5
    # Attention at the 4x4 level only and the latents encoded once: a cheaper step,
    # so the same minutes hold more of them.
    c.stage2.unet.attention_resolutions = (2,)
    c.stage2.latent_cache = arg.data == "shapes" and concat == "none"
    c.stage2.sample.steps = 25
    c.stage2.sample.guidance = 1.5      # held-out prompts follow best at 1.5-2 (3 and 5 less)
    c.sample_every = 800
    c.log_every = 100
  if sd:
    c.stage2.scale_factor = 0.18215     # Stable Diffusion's VAE
    c.stage2.prediction_type = "v" if arg.size == "sd2" else "eps"
  return c
