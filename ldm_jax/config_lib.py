"""Shared pieces of the `configs/*.py` files: arg strings, the training spine's
fields and their validation. Model presets live beside the models."""
import os
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
  # Mesh axes (data, fsdp, tensor), one may be -1 = the remaining devices; a tuple,
  # so that --config.mesh="(('data', -1), ('fsdp', 2), ('tensor', 1))" overrides it.
  c.mesh = (("data", -1), ("fsdp", 1), ("tensor", 1))
  c.dcn_mesh = ()                  # sizes across slices for multi-slice jobs, same axis order
  c.sharding_rules = [list(r) for r in parallel.DEFAULT_RULES]  # logical name -> mesh axes
  c.log_every = 50                 # console + TensorBoard scalars
  c.ckpt_every = 500               # async Orbax save
  c.keep_ckpts = 3                 # checkpoints kept
  c.sample_every = 1000            # PNG grid + TensorBoard image (0 = only at the end)
  c.num_samples = 16               # images in a sample grid (0: no grids, not even the last)
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
  need(config.num_samples >= 0, "num_samples", "must be >= 0 (0 = no sample grids)")
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


def config_file(path: str) -> str:
  """The file a `--config=PATH[:arg]` names: PATH itself when it exists, else the
  file of that name among the configs shipped in the package (`pip install .`
  copies the top-level `configs/` to `ldm_jax/configs/`) or beside it (a checkout
  run from another folder); PATH unchanged when neither has it."""
  if os.path.exists(path):
    return path
  name = os.path.basename(path)
  package = os.path.dirname(os.path.abspath(__file__))
  for folder in (os.path.join(package, "configs"), os.path.join(os.path.dirname(package), "configs")):
    if os.path.isfile(os.path.join(folder, name)):
      return os.path.join(folder, name)
  return path


def resolve_config_argv(argv: list, flag: str = "config") -> list:
  """`argv` with the file of `--config=PATH[:arg]` (or `--config PATH`) resolved by `config_file`."""
  out, prefix = list(argv), f"--{flag}"
  for i, a in enumerate(out):
    if a.startswith(prefix + "="):
      value, at = a[len(prefix) + 1:], i
    elif a == prefix and i + 1 < len(out):
      value, at = out[i + 1], i + 1
    else:
      continue
    path, sep, arg = value.partition(".py:")
    path = path + ".py" if sep else value
    resolved = config_file(path) + (":" + arg if sep else "")
    out[at] = f"{prefix}={resolved}" if at == i else resolved
  return out


def to_dict(config) -> dict:
  """A JSON-able dict of a config (tuples become lists)."""
  return ml_collections.ConfigDict(config).to_dict()


# ---- builders of the sections a configs/*.py file assembles --------------------


def check_arg(arg, name: str, choices) -> None:
  """Fails naming the config arg when `arg[name]` is not one of `choices`."""
  if arg[name] not in choices:
    raise ValueError(f"config arg {name}={arg[name]!r} is not one of {tuple(choices)}")


def sibling(config_path: str, name: str):
  """The module of the config file `name` beside `config_path` (a config file's
  `__file__`), for a config that is another's recipe with changes."""
  import importlib.util
  path = os.path.join(os.path.dirname(os.path.abspath(config_path)), name + ".py")
  spec = importlib.util.spec_from_file_location(f"ldm_jax_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def config_module(name: str):
  """The module of the shipped config file `name` (e.g. 'txt2img'), for library code
  that builds on a recipe (Stable Diffusion's stage 2 from pretrained files)."""
  path = config_file(os.path.join("configs", name + ".py"))
  if not os.path.isfile(path):
    raise ValueError(f"no config file '{name}.py' in the package or beside it")
  return sibling(path, name)


def data(source: str, resolution: int) -> ml_collections.ConfigDict:
  """`config.data` reading `source` (shapes | wds | tfds) at `resolution` px."""
  from ldm_jax.data import default_config
  c = default_config()
  c.source = source
  c.resolution = resolution
  return c


def autoencoder_stage(kind: str, f: int, preset: str, resolution: int) -> ml_collections.ConfigDict:
  """`config.stage1`: the paper's `kind`-f`f` first stage (preset 'ref') or its CPU
  variant ('tiny'), trained at `resolution` px (each field is commented in
  training/autoencoder.py)."""
  from ldm_jax.training import autoencoder
  c = autoencoder.default_config(kind, f, preset)
  c.image_size = resolution
  c.scale_batches = 8           # batches over which stage 2's 1/std(z) is estimated
  return c


def ldm_stage(preset: str, *, context: str, classes: int = 0,
              concat: str = "none") -> ml_collections.ConfigDict:
  """`config.stage2`: the UNet `preset` (tiny | base | sd15 | sd2) conditioned by
  (context, classes, concat) (training/conditioning.py; each field is commented in
  training/ldm.py). A from-scratch text encoder's width is the UNet's context_dim."""
  from ldm_jax.models import text as text_lib
  from ldm_jax.training import ldm
  c = ldm.default_config(preset, context=context, classes=classes, concat=concat)
  if context == "text" and c.text.encoder == "transformer":
    c.unet.context_dim = text_lib.preset(c.text.size)["width"]
  return c


def shapes_text(stage2, *, words: bool) -> None:
  """Text conditioning on the embedded shapes data: the sample grids show held-out
  prompts (combinations never trained on); `words`: a word tokenizer over the
  captions' ~40 words (~14 tokens a caption) instead of bytes."""
  from ldm_jax.data import shapes
  from ldm_jax.models.text import WordTokenizer
  stage2.sample.prompts = tuple(shapes.caption(shapes.sample_attrs(7, i, "heldout"))
                                for i in range(8))
  # Evaluation reads the attributes of each sample back (prompt accuracy) and, given
  # the Inception weights, compares the samples with held-out images (FID).
  stage2.eval.metrics = "prompts,fid"
  if words:
    stage2.text.tokenizer = "words"
    stage2.text.vocab = WordTokenizer.build_vocab(
        [shapes.caption(shapes.sample_attrs(0, i, "all")) for i in range(2000)])
    stage2.text.max_length = 16
