"""Shared pieces of the `configs/*.py` files: arg strings, the training spine's
fields and their validation. Model presets live beside the models."""
from typing import Any

import ml_collections

from ldm_jax import parallel


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """'size=tiny,data=shapes' -> ConfigDict, typed after `defaults`.

  An unknown key fails with its name (the config file's documented args are
  `defaults`' keys).
  """
  out = ml_collections.ConfigDict(defaults)
  if arg:
    for item in arg.split(","):
      key, _, value = item.partition("=")
      key = key.strip()
      if key not in defaults:
        raise ValueError(f"unknown config arg '{key}'; known: {sorted(defaults)}")
      kind = type(defaults[key])
      out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
  return out.lock()


def spine(**overrides: Any) -> ml_collections.ConfigDict:
  """Fields of the training spine shared by every config (each commented)."""
  c = ml_collections.ConfigDict()
  c.seed = 0                       # one seed for init, data order and noise
  c.batch_size = 32                # global batch over all processes and devices
  c.total_steps = 1000             # optimizer steps of this stage
  c.grad_accum = 1                 # micro-batches per step (lax.scan inside the jitted step)
  c.dtype = "float32"              # compute dtype: float32 | bfloat16 (master weights stay f32)
  c.remat = False                  # rematerialise each block in the backward pass
  # Mesh axes (data, fsdp, tensor), one may be -1 = the remaining devices.
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  c.dcn_mesh = ()                  # sizes across slices for multi-slice jobs, same axis order
  c.sharding_rules = [list(r) for r in parallel.DEFAULT_RULES]  # logical name -> mesh axes
  c.log_every = 50                 # console + TensorBoard scalars
  c.ckpt_every = 500               # async Orbax save
  c.keep_ckpts = 3                 # checkpoints kept
  c.sample_every = 1000            # PNG grid + TensorBoard image (0 = only at the end)
  c.num_samples = 16               # images in a sample grid
  # Stop, keeping the last good checkpoint, when the loss exceeds its running mean by
  # more than this many times the running mean of |loss| (0 = off): a blow-up, far
  # outside the batch-to-batch noise of a loss, whatever its sign.
  c.divergence_factor = 10.0
  for k, v in overrides.items():
    c[k] = v
  return c


# The stages `config.stages` may list, and the config section each trains with.
STAGE_SECTIONS = {"autoencoder": "stage1", "ldm": "stage2"}


def _validate_spine(config, name) -> None:
  """Raises ValueError naming `name(field)` when a spine field of `config` is invalid."""
  def need(cond, field, msg):
    if not cond:
      raise ValueError(f"{name(field)}: {msg} (got {config.get(field)!r})")

  need(config.batch_size > 0, "batch_size", "must be positive")
  need(config.total_steps >= 0, "total_steps", "must be >= 0")
  need(config.grad_accum >= 1, "grad_accum", "must be >= 1")
  need(config.batch_size % config.grad_accum == 0, "batch_size",
       f"must be a multiple of grad_accum={config.grad_accum}")
  need(config.dtype in ("float32", "bfloat16"), "dtype", "must be float32 or bfloat16")
  need(config.log_every > 0, "log_every", "must be positive")
  need(config.ckpt_every > 0, "ckpt_every", "must be positive")
  need(config.keep_ckpts > 0, "keep_ckpts", "must be positive")
  need(config.sample_every >= 0, "sample_every", "must be >= 0")
  need(config.num_samples > 0, "num_samples", "must be positive")
  need(config.divergence_factor >= 0, "divergence_factor", "must be >= 0 (0 = off)")
  need([a for a, _ in config.mesh] == list(parallel.MESH_AXES), "mesh",
       f"must list the axes {parallel.MESH_AXES}")
  sizes = [s for _, s in config.mesh]
  need(all(s == -1 or s >= 1 for s in sizes) and sizes.count(-1) <= 1, "mesh",
       "sizes must be >= 1, one of them may be -1")
  rule_names = {r[0] for r in config.sharding_rules}
  need("batch" in rule_names, "sharding_rules", "needs a rule for 'batch'")


def validate(config) -> None:
  """Checks that need no devices: the spine, and the spine each stage of
  `config.stages` trains with (`for_stage`); raises ValueError naming the field."""
  _validate_spine(config, lambda field: f"config.{field}")
  stages = config.get("stages", ())
  unknown = [s for s in stages if s not in STAGE_SECTIONS]
  if unknown:
    raise ValueError(f"config.stages: unknown stage(s) {unknown}; known: {tuple(STAGE_SECTIONS)}")
  for stage in stages:
    section = STAGE_SECTIONS[stage]
    if section not in config:  # a stage config (for_stage) without the other stage's section
      continue
    def name(field, section=section):  # the field as the user sets it
      return f"config.{section}.{field}" if field in config[section] else f"config.{field}"
    c = for_stage(config, section)
    _validate_spine(c, name)
    if c.total_steps == 0:  # a listed stage that trains nothing would hand on a random model
      raise ValueError(f"{name('total_steps')}: must be positive for a stage in config.stages "
                       f"(got 0; remove '{stage}' from config.stages to skip it)")


SPINE_FIELDS = tuple(spine().keys())


def for_stage(config, name: str) -> ml_collections.ConfigDict:
  """The config one stage trains with: the spine fields, overridden by the ones
  that `config[name]` sets (e.g. stage1.total_steps, stage2.batch_size).

  Stage 1 does not see `stage2`: a trained autoencoder stays valid (and its
  checkpoint compatible) when only the diffusion model's settings change.
  Stage 2 keeps `stage1`, whose model it carries frozen.
  """
  d = config.to_dict()
  if name == "stage1":
    d.pop("stage2", None)
  c = ml_collections.ConfigDict(d)
  for k, v in config[name].items():
    if k in SPINE_FIELDS:
      c[k] = v
  return c.lock()


def to_dict(config) -> dict:
  """A JSON-able dict of a config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()


# Per size: (image resolution, first stage (kind, f, preset), stage-1 steps, stage-2 steps).
LDM_SIZES = {
    # tiny: the CPU default, 13-18 minutes end to end on 2 cores (the machine's hour).
    # First-stage steps buy more of the shapes' kind than stage-2 steps (README).
    "tiny": dict(resolution=32, first=("kl", 4, "tiny"), stage1_steps=1600, stage2_steps=2500,
                 batch1=16, batch2=64),
    "base": dict(resolution=256, first=("kl", 8, "ref"), stage1_steps=200_000, stage2_steps=400_000,
                 batch1=96, batch2=256),
    "sd15": dict(resolution=512, first=("kl", 8, "ref"), stage1_steps=0, stage2_steps=400_000,
                 batch1=8, batch2=2048),
    "sd2": dict(resolution=768, first=("kl", 8, "ref"), stage1_steps=0, stage2_steps=400_000,
                batch1=8, batch2=2048),
}


def ldm(arg, *, context: str = "text", classes: int = 0, concat: str = "none",
        doc_sizes=("tiny", "base", "sd15", "sd2")) -> ml_collections.ConfigDict:
  """A whole latent-diffusion config: data, stage 1 (autoencoder), stage 2 (UNet).

  Args:
    arg: the parsed config arg (size, data).
    context, classes, concat: the stage-2 conditioning (see training/conditioning.py).
  """
  from ldm_jax import data as data_lib
  from ldm_jax.models import text as text_lib
  from ldm_jax.training import autoencoder, ldm as ldm_lib
  if arg.size not in doc_sizes:
    raise ValueError(f"config arg size={arg.size!r} is not one of {doc_sizes}")
  s = LDM_SIZES[arg.size]
  c = spine(batch_size=s["batch2"])
  c.stages = ("autoencoder", "ldm") if s["stage1_steps"] else ("ldm",)
  c.data = data_lib.default_config()
  c.data.source = arg.data
  c.data.resolution = s["resolution"]
  kind, f, preset = s["first"]
  c.stage1 = autoencoder.default_config(kind, f, preset)
  c.stage1.image_size = s["resolution"]
  c.stage1.total_steps = s["stage1_steps"]    # stage-1 steps (overrides total_steps)
  c.stage1.batch_size = s["batch1"]           # stage-1 global batch (overrides batch_size)
  c.stage1.scale_batches = 8                  # batches over which 1/std(z) is estimated
  # A KL first stage decodes posterior samples in training (the reference; the tiny
  # autoencoder_kl config decodes the mean, which reconstructs a little better in
  # minutes), so its decoder has seen latents off the mean, as stage 2's are.
  c.stage1.sample_posterior = kind == "kl"
  c.stage2 = ldm_lib.default_config(arg.size, context=context, classes=classes, concat=concat)
  c.stage2.total_steps = s["stage2_steps"]
  c.stage2.batch_size = s["batch2"]
  if context == "text" and c.stage2.text.encoder == "transformer":
    c.stage2.unet.context_dim = text_lib.preset(c.stage2.text.size)["width"]
  if arg.data == "shapes" and context == "text":
    from ldm_jax.data import shapes  # grids show held-out prompts: combinations never trained on
    c.stage2.sample.prompts = tuple(shapes.caption(shapes.sample_attrs(7, i, "heldout"))
                                    for i in range(8))
    if arg.size in ("tiny", "base"):  # a word vocabulary: ~40 words, ~14 tokens a caption
      from ldm_jax.models.text import WordTokenizer
      c.stage2.text.tokenizer = "words"
      c.stage2.text.vocab = WordTokenizer.build_vocab(
          [shapes.caption(shapes.sample_attrs(0, i, "all")) for i in range(2000)])
      c.stage2.text.max_length = 16
  if arg.size == "tiny":  # minutes on a CPU: a high learning rate, short warm-up
    c.stage2.lr = 1e-3
    c.stage2.warmup_steps = 100
    # v-prediction with its plain loss (SD 2.x's). Earlier, shorter runs needed the
    # x0-space weight clip(SNR, 1, 5) (stage2.weighting=min_snr, min_snr_floor=1) to
    # learn the layout at all (1200 steps: position 18 -> 65%); at 4000 steps the plain
    # loss does better (200 held-out prompts, guidance 3: kind 36.5 vs 32.5%,
    # position 99.5 vs 98%), since it keeps the weight of the low-noise steps,
    # where the shape's outline is drawn.
    c.stage2.prediction_type = "v"
    # Timesteps t = T sigmoid(u), u ~ N(-0.5, 1): more of the updates on the low-noise
    # steps, where stage 2 loses the shape's kind (evaluate_prompts --strength); the
    # layout is learned by 4000 steps either way. 200 held-out prompts, guidance 3:
    # kind 38.5 -> 45%, position 99 -> 99.5%, colour 99 -> 96.5% (uniform t before).
    c.stage2.timestep_sampling = "logit_normal"
    c.stage2.logit_mean = -0.5
    # Attention (self and cross) at the 4x4 level only, and the embedded data's
    # latents cached once: each step is about 2x cheaper than with attention at 8x8
    # too and the encoder in the step, so the same minutes hold twice the steps.
    c.stage2.unet.attention_resolutions = (2,)
    c.stage2.latent_cache = arg.data == "shapes" and concat == "none"
    c.stage2.sample.steps = 25
    # Guidance 2-3 beats 5 on held-out prompts (4000 steps, 200 prompts, weighted
    # loss: position 99.5 / 98 / 92.5% at 2 / 3 / 5; kind 32.5 / 32.5 / 31.5%).
    c.stage2.sample.guidance = 3.0
    c.sample_every = 800
    c.log_every = 100
  if arg.size in ("sd15", "sd2"):
    c.stage2.scale_factor = 0.18215           # Stable Diffusion's VAE
    c.stage2.prediction_type = "v" if arg.size == "sd2" else "eps"
  return c


def autoencoder(arg, kind: str, factors: tuple) -> ml_collections.ConfigDict:
  """A stage-1-only config for the paper's `kind`-f models (arg: f, size=ref|tiny, data)."""
  from ldm_jax import data as data_lib
  from ldm_jax.training import autoencoder as ae_lib
  if arg.f not in factors:
    raise ValueError(f"config arg f={arg.f} is not one of {factors}")
  if arg.size not in ("ref", "tiny"):
    raise ValueError(f"config arg size={arg.size!r} is not one of ('ref', 'tiny')")
  ref = arg.size == "ref"
  # tiny: the default run's first stage (batch 16), trained about twice as long.
  c = spine(batch_size=96 if ref else 16, total_steps=200_000 if ref else 3000)
  c.stages = ("autoencoder",)
  c.data = data_lib.default_config()
  c.data.source = arg.data
  c.data.resolution = 256 if ref else 32
  c.stage1 = ae_lib.default_config(kind, arg.f, arg.size)
  c.stage1.image_size = c.data.resolution
  c.stage1.scale_batches = 8    # batches over which 1/std(z) is estimated
  return c
