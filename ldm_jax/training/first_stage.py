"""The frozen first stage as stage 2 sees it: the autoencoder's model, its weights
and the latent scale, z = scale_factor * E(x) and x = D(z / scale_factor).

  FirstStage.from_config(config)     the model alone (stage 2's state carries the weights);
  FirstStage.restore(config, workdir) a trained stage 1 from a workdir, with its scale factor;
  FirstStage.from_variables(config, variables, scale_factor)  weights from elsewhere
                                      (a pretrained VAE).

KL models give a sample of the posterior (as the reference's
`get_first_stage_encoding`), or its mode when stage 1 trained on the mode; VQ
models give the latent *before* quantisation, and decoding quantises it first.
"""
import dataclasses
import hashlib
import json
import logging
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ldm_jax import checkpoint, config_lib, parallel, storage
from ldm_jax.models import autoencoder

log = logging.getLogger("ldm_jax")
SCALE_FILE = "scale_factor.json"  # in <stage-1 workdir>/autoencoder/


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as jit needs
class FirstStage:
  kind: str                 # 'kl' | 'vq'
  model: Any                # AutoencoderKL | VQModel
  resolution: int
  sample_posterior: bool = True  # KL: z is a posterior sample (reference) or its mode
  variables: Any = None     # the model's variables; None: the model alone
  scale_factor: Optional[float] = None  # None: not known yet
  # Where the weights came from, e.g. {'stage1_step': 1600, 'stage1_config': '3f2a...'};
  # what stage 2's inputs (scale factor, latent cache) are checked against.
  source: dict = dataclasses.field(default_factory=dict)
  mesh: Any = None          # the mesh `variables` are sharded over (None: not placed)

  @classmethod
  def from_config(cls, config) -> "FirstStage":
    """The model of `config.stage1`, without weights."""
    s1 = config.stage1
    kw = dict(s1.model)
    kw["dtype"] = jnp.bfloat16 if config.dtype == "bfloat16" else None
    model = autoencoder.AutoencoderKL(**kw) if s1.kind == "kl" else autoencoder.VQModel(**kw)
    return cls(s1.kind, model, config.data.resolution, bool(s1.get("sample_posterior", True)))

  @classmethod
  def from_variables(cls, config, variables, scale_factor: Optional[float] = None, *,
                     source: Optional[dict] = None, mesh=None) -> "FirstStage":
    """The model of `config.stage1` with the given `variables` (its Flax variables)."""
    return dataclasses.replace(cls.from_config(config), variables=variables,
                               scale_factor=scale_factor, source=dict(source or {}), mesh=mesh)

  @classmethod
  def restore(cls, config, workdir: str) -> "FirstStage":
    """The first stage trained in `workdir` (a run's workdir: `autoencoder/` in it),
    with `config.stage2.scale_factor`, or else 1/std(z) as cached in
    `autoencoder/scale_factor.json` for this very checkpoint, or else estimated.

    Raises:
      ValueError: no stage-1 checkpoint, one from another `config.stage1`, or one
        that stopped before `stage1.total_steps`.
    """
    from ldm_jax.training.autoencoder import AutoencoderTask
    c = config_lib.for_stage(config, "stage1")
    task = AutoencoderTask(c)
    mesh = parallel.make_mesh(c)
    ckpt = checkpoint.Checkpointer(storage.join(workdir, "autoencoder", "checkpoints"))
    try:
      step = ckpt.latest_step()
      if step is None:
        raise ValueError(f"'{workdir}' has no stage-1 checkpoint (config.stage2.first_stage_workdir"
                         " names a workdir whose first stage has trained)")
      if step < c.total_steps:
        raise ValueError(f"the first stage in '{workdir}' stopped at step {step} of "
                         f"stage1.total_steps={c.total_steps}; finish stage 1 first")
      saved = ckpt.saved_config()
      diffs = checkpoint.config_differences(saved.get("stage1", {}),
                                            config_lib.to_dict(c)["stage1"])
      if diffs:
        raise ValueError(f"config.stage1 differs from the first stage in '{workdir}': "
                         + "; ".join(diffs[:5]))
      abstract, _ = parallel.abstract_state(task.init, jax.random.key(0), mesh,
                                            parallel.rules_of(c))
      state, _, _ = ckpt.restore(abstract)
    finally:
      ckpt.close()
    first = cls.from_variables(config, model_variables(state["params"]), mesh=mesh,
                               source={"stage1_step": int(step), "stage1_config": fingerprint(c)})
    scale = float(config.stage2.get("scale_factor", 0.0)) if "stage2" in config else 0.0
    if not scale:
      scale = first._cached_scale_factor(c, storage.join(workdir, "autoencoder", SCALE_FILE))
    return dataclasses.replace(first, scale_factor=scale)

  def _cached_scale_factor(self, c, path: str) -> float:
    """1/std(z) from `path` when it was measured on this first stage, else measured and written."""
    if storage.exists(path):
      saved = storage.read_json(path)
      if saved.get("source") == self.source and saved.get("batches") == c.stage1.scale_batches:
        return float(saved["scale_factor"])
      log.info("%s came from another first stage (%s, now %s): measuring again", path,
               saved.get("source"), self.source)
    scale = self.estimate_scale_factor(c)
    if jax.process_index() == 0:
      storage.write_json(path, {"scale_factor": scale, "batches": c.stage1.scale_batches,
                                "source": self.source}, indent=1)
    log.info("scale_factor = 1/std(z) = %.5f over %d batches", scale, c.stage1.scale_batches)
    return scale

  def estimate_scale_factor(self, c) -> float:
    """1/std(z) over `stage1.scale_batches` global batches of `c.data` (a stream of
    its own, seed + 2000) read by all processes, z the posterior mode (KL) or the
    pre-quantisation latent (VQ).

    Args:
      c: the stage-1 config (`config_lib.for_stage(config, 'stage1')`).
    """
    from ldm_jax.data import make_iterator
    it = make_iterator(c.data, batch_size=c.batch_size // jax.process_count(),
                       process_index=jax.process_index(), process_count=jax.process_count(),
                       seed=c.seed + 2000)

    @jax.jit
    def moments(variables, x):
      z = self.encode(variables, x, None).astype(jnp.float32)
      return jnp.sum(z), jnp.sum(z * z), jnp.asarray(z.size, jnp.float32)

    total = np.zeros(3)
    for _ in range(c.stage1.scale_batches):
      x = parallel.global_batch({"image": next(it)["image"]}, self.mesh)["image"]
      total += np.array(jax.device_get(moments(self.variables, x)), np.float64)
    s, s2, n = total
    return float(1.0 / np.sqrt(max(s2 / n - (s / n) ** 2, 1e-12)))

  def put(self, state: dict, shardings: dict) -> dict:
    """A fresh stage-2 `state` with these weights and this scale factor in it."""
    frozen = dict(state["frozen"], first_stage=jax.device_put(
        self.variables, shardings["frozen"]["first_stage"]))
    return dict(state, frozen=frozen, scale_factor=jax.device_put(
        np.float32(self.scale_factor), shardings["scale_factor"]))

  @property
  def factor(self) -> int:
    return 2 ** (len(self.model.ch_mult) - 1)

  @property
  def z_channels(self) -> int:
    return self.model.z_channels if self.kind == "kl" else self.model.embed_dim

  def init(self, rng):
    x = jnp.zeros((1, self.resolution, self.resolution, 3))
    return self.model.init(rng, x)

  def encode(self, variables, x, rng):
    """x in [-1, 1] -> unscaled latent z; a posterior sample when rng is given."""
    if self.kind == "kl":
      post = self.model.apply(variables, x, method=self.model.encode)
      return post.sample(rng) if rng is not None and self.sample_posterior else post.mode()
    return self.model.apply(variables, x, method=self.model.encode)

  def moments(self, variables, x):
    """x -> (mean, std) of what `encode` draws z from; std is None when z is
    deterministic (VQ, or KL encoded to its mode)."""
    if self.kind == "kl":
      post = self.model.apply(variables, x, method=self.model.encode)
      return post.mean, (jnp.exp(0.5 * post.logvar) if self.sample_posterior else None)
    return self.model.apply(variables, x, method=self.model.encode), None

  def decode(self, variables, z):
    return jnp.clip(self.model.apply(variables, z, method=self.model.decode), -1, 1)


def model_variables(params: dict) -> dict:
  """The autoencoder's Flax variables in the params of a stage-1 train state
  (`AutoencoderTask.init`'s layout: the model under 'autoencoder', an EMA
  codebook under 'vq_ema')."""
  v = {"params": params["autoencoder"]}
  if "vq_ema" in params:
    v["vq_ema"] = params["vq_ema"]
  return v


def fingerprint(c) -> str:
  """A short hash of the `stage1` section of the stage-1 config `c`: what the
  trained weights depend on besides their step."""
  text = json.dumps(config_lib.to_dict(c)["stage1"], sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]
