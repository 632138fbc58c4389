"""Stage 2: the latent diffusion model's train state, update step and sampler.

The first stage (autoencoder) is frozen: its weights ride along in the state
under `frozen` (so a stage-2 checkpoint is all `ldm_jax.sample` needs) and
z = scale_factor * E(x) is computed inside the jitted step. The condition
encoder tau is either trained jointly (`params['text']`, the LDM paper's text
transformer) or frozen (`frozen['text']`, e.g. CLIP).
"""
import jax
import jax.numpy as jnp
import optax

from ldm_jax.diffusion import losses, samplers
from ldm_jax.diffusion.schedule import make_schedule
from ldm_jax.training import conditioning, first_stage
from ldm_jax.training.step import Task, accumulate_gradients, cast_kernels, lr_schedule


def ema_update(ema, params, decay, step):
  """EMA with the reference's warm-up: decay_t = min(decay, (1 + t) / (10 + t))."""
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return jax.tree.map(lambda e, p: d * e + (1 - d) * p, ema, params)


def make_optimizer(c, total_steps: int) -> optax.GradientTransformation:
  """AdamW with linear warm-up, constant or cosine lr, and global-norm clipping
  (config.stage2 fields)."""
  try:
    lr = lr_schedule(c.lr, warmup_steps=c.warmup_steps, total_steps=total_steps,
                     decay=c.get("lr_decay", "constant"))
  except ValueError as e:
    raise ValueError(f"config.stage2.{e}") from None
  return optax.chain(optax.clip_by_global_norm(c.grad_clip),
                     optax.adamw(lr, b1=0.9, b2=0.999, weight_decay=c.weight_decay))


def timestep_spacing(c) -> str:
  """The sampling grid of `config.stage2`: `sample.timestep_spacing`, where 'auto' is
  'trailing' on a zero-terminal-SNR schedule (its first step must be t = T - 1, the
  one level where z_t is pure noise) and 'leading' (Stable Diffusion's) otherwise."""
  spacing = c.sample.get("timestep_spacing", "auto")
  if spacing == "auto":
    return "trailing" if c.schedule.zero_terminal_snr else "leading"
  return spacing


def check_config(config) -> None:
  """Stage-2 checks that need no devices; raises ValueError naming the fields."""
  c = config.stage2
  if c.schedule.zero_terminal_snr and c.prediction_type == "eps":
    raise ValueError("config.stage2.prediction_type='eps' with config.stage2.schedule."
                     "zero_terminal_snr=True: at t = T - 1 the SNR is 0, z_t is the noise itself "
                     "and eps carries nothing about z0; use prediction_type 'v' (or 'x0')")
  spacing = c.sample.get("timestep_spacing", "auto")
  if spacing != "auto" and spacing not in samplers.SPACINGS:
    raise ValueError(f"config.stage2.sample.timestep_spacing={spacing!r} is not 'auto' or one "
                     f"of {samplers.SPACINGS}")
  if c.timestep_sampling not in losses.TIMESTEP_SAMPLINGS:
    raise ValueError(f"config.stage2.timestep_sampling={c.timestep_sampling!r} is not one of "
                     f"{losses.TIMESTEP_SAMPLINGS}")
  interval = tuple(c.sample.get("guidance_interval", (0.0, 1.0)))
  if len(interval) != 2 or not 0.0 <= interval[0] <= interval[1] <= 1.0:
    raise ValueError(f"config.stage2.sample.guidance_interval={interval}: expected (lo, hi) "
                     "with 0 <= lo <= hi <= 1 (fractions of the T timesteps)")


class LDMTask(Task):
  """eps_theta(z_t, t, tau(y)) on the latents of a frozen first stage."""

  def __init__(self, config, *, first_stage_given: bool = False):
    """`first_stage_given`: the caller puts trained first-stage weights into a fresh
    state (as `run.train_ldm` does), so `init` leaves zeros there instead of drawing
    them (their initialiser is about a third of the state's compile)."""
    check_config(config)
    self.config = config
    self.first_stage_given = first_stage_given
    c = config.stage2
    self.c = c
    self.dtype = jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32
    self.first = first_stage.FirstStage.from_config(config)
    self.cond = conditioning.Conditioner.from_config(config, self.first)
    self.unet = self.cond.make_unet(config)
    self.schedule = make_schedule(c.schedule.kind, c.schedule.T, c.schedule.linear_start,
                                  c.schedule.linear_end, c.schedule.zero_terminal_snr)
    self.tx = make_optimizer(c, int(config.total_steps))
    res = config.data.resolution
    if res % self.first.factor:
      raise ValueError(f"config.data.resolution={res} is not divisible by the first stage's "
                       f"downsampling factor f={self.first.factor}")
    self.latent_hw = res // self.first.factor

  # -- state ---------------------------------------------------------------
  def init(self, rng):
    r_unet, r_cond, r_first = jax.random.split(rng, 3)
    b = 1
    z = jnp.zeros((b, self.latent_hw, self.latent_hw, self.unet.in_channels))
    trainable_cond, frozen_cond = self.cond.init(r_cond)
    ctx, y = self.cond.dummy(b)
    params = {"unet": self.unet.init(r_unet, z, jnp.zeros((b,), jnp.int32), ctx, y)}
    if trainable_cond is not None:
      params["cond"] = trainable_cond
    if self.first_stage_given:
      frozen = {"first_stage": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                            jax.eval_shape(self.first.init, r_first))}
    else:
      frozen = {"first_stage": self.first.init(r_first)}
    if frozen_cond is not None:
      frozen["cond"] = frozen_cond
    return dict(step=jnp.zeros((), jnp.int32), params=params, ema=params,
                opt=self.tx.init(params), frozen=frozen,
                scale_factor=jnp.ones((), jnp.float32))

  def initial_values(self, state, shardings):
    """Puts loaded condition-encoder weights (CLIP) into a fresh state."""
    if self.cond.pretrained is None:
      return state
    where = "params" if self.cond.text_trainable else "frozen"
    key = "cond"
    loaded = jax.device_put({"params": self.cond.pretrained}, shardings[where][key])
    state = dict(state, **{where: dict(state[where], **{key: loaded})})
    if where == "params":
      state["ema"] = dict(state["ema"], cond=loaded)
    return state

  # -- training ------------------------------------------------------------
  def _loss(self, params, batch, rng, frozen, scale_factor):
    r_enc, r_drop, r_diff, r_dropout = jax.random.split(rng, 4)
    if "latent" in batch:  # from the latent cache (config.data.source = 'latents')
      z0 = batch["latent"].astype(jnp.float32)
      if "latent_std" in batch:  # a stored posterior: a fresh sample, as from the image
        z0 = z0 + batch["latent_std"] * jax.random.normal(r_enc, z0.shape)
      z0 = scale_factor * z0
    else:
      z0 = scale_factor * self.first.encode(frozen["first_stage"], batch["image"], r_enc)
    z0 = jax.lax.stop_gradient(z0)
    cond = self.cond.encode(params.get("cond"), frozen.get("cond"), batch, r_drop,
                            drop_prob=self.c.cond_drop, frozen_first=frozen["first_stage"],
                            scale_factor=scale_factor)

    unet_params = params["unet"]
    if self.c.get("cast_params_once") and self.dtype != jnp.float32:
      unet_params = cast_kernels(unet_params, self.dtype)

    def model_fn(z_t, t):
      x = self.cond.join(z_t, cond)
      return self.unet.apply(unet_params, x, t, cond.get("context"), cond.get("y"), train=True,
                             rngs={"dropout": r_dropout})

    per_example = losses.diffusion_loss(model_fn, z0, r_diff, self.schedule,
                                        prediction_type=self.c.prediction_type,
                                        weighting=self.c.weighting,
                                        min_snr_gamma=self.c.min_snr_gamma,
                                        min_snr_floor=self.c.min_snr_floor,
                                        offset_noise=self.c.offset_noise,
                                        timestep_sampling=self.c.timestep_sampling,
                                        logit_mean=self.c.logit_mean,
                                        logit_std=self.c.logit_std)
    loss = jnp.mean(per_example)
    return loss, {"loss": loss, "latent_std": jnp.std(z0)}

  def update(self, state, batch, rng):
    loss_fn = lambda p, b, r: self._loss(p, b, r, state["frozen"], state["scale_factor"])
    loss, aux, grads = accumulate_gradients(loss_fn, state["params"], batch, rng,
                                            self.config.grad_accum)
    updates, opt = self.tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    ema = ema_update(state["ema"], params, self.c.ema_decay, state["step"])
    metrics = dict(aux, grad_norm=optax.global_norm(grads))
    return dict(state, step=state["step"] + 1, params=params, ema=ema, opt=opt), metrics

  # -- sampling ------------------------------------------------------------
  def sample(self, state, batch, rng, *, steps=None, guidance=None, sampler=None, eta=0.0,
             use_ema=True, height=None, width=None, strength=1.0, rescale=0.0, spacing=None,
             interval=None):
    """Images in [-1, 1] for `batch` with classifier-free guidance.

    `batch` holds the condition (tokens / label / image for concat models), and
    optionally `negative` (tokens of negative prompts), `init_image` (img2img from
    `strength`) and `mask` (pixel mask, 1 = repaint, 0 = keep, as Stable Diffusion's:
    inpainting from pure noise with any model, the kept region pasted in at every
    step; an inpainting-concat UNet also reads it as its mask input). `spacing`
    defaults to `timestep_spacing(config.stage2)`; 'leading' adds
    `sample.steps_offset`. `interval` (lo, hi): guidance only at t / T in [lo, hi]
    (None: `sample.guidance_interval`). `z_T` (B, h, w, c), if given, is the initial
    latent noise in place of noise drawn from `rng`.
    """
    s = self.c.sample
    steps = steps or s.steps
    spacing = spacing or timestep_spacing(self.c)
    guidance = s.guidance if guidance is None else guidance
    params = state["ema"] if use_ema else state["params"]
    frozen, scale = state["frozen"], state["scale_factor"]
    cond = self.cond.encode(params.get("cond"), frozen.get("cond"), batch, None, drop_prob=0.0,
                            frozen_first=frozen["first_stage"], scale_factor=scale)
    f = self.first.factor
    h, w = height or self.latent_hw * f, width or self.latent_hw * f
    n = self.cond.batch_size(batch)
    shape = (n, h // f, w // f, self.first.z_channels)

    def apply(z_t, t, c):
      return self.unet.apply(params["unet"], self.cond.join(z_t, c), t, c.get("context"),
                             c.get("y"))

    if guidance != 1.0 and self.cond.guidable:
      uncond = self.cond.null(params.get("cond"), frozen.get("cond"), cond, batch.get("negative"))
      lo, hi = interval or s.get("guidance_interval", (0.0, 1.0))
      interval = None if (lo, hi) == (0.0, 1.0) else (lo * self.schedule.T, hi * self.schedule.T)
      model_fn = samplers.cfg_model_fn(apply, cond, uncond, guidance, rescale, interval)
    else:
      model_fn = lambda z_t, t: apply(z_t, t, cond)
    init_latent = mask = known = None
    if "init_image" in batch:
      init_latent = scale * self.first.encode(frozen["first_stage"], batch["init_image"], None)
    if "mask" in batch:  # inpainting: from pure noise, whatever `strength`
      if init_latent is None:
        raise ValueError("inpainting needs an init image")
      known, init_latent = init_latent, None
      if self.cond.concat != "inpaint":  # the UNet cannot see the mask: paste the kept region
        m = jax.image.resize(batch["mask"], (n, shape[1], shape[2], 1), "linear", antialias=True)
        mask = (m >= 0.5).astype(jnp.float32)  # repaint a latent pixel mostly in the hole
    z0 = samplers.sample(model_fn, batch.get("z_T", shape), rng, self.schedule, sampler=sampler or s.sampler,
                         steps=steps, eta=eta, spacing=spacing,
                         steps_offset=s.get("steps_offset", 0),
                         set_alpha_to_one=s.get("set_alpha_to_one", True),
                         prediction_type=self.c.prediction_type, init_latent=init_latent,
                         strength=strength, mask=mask, known_latent=known)
    return self.first.decode(frozen["first_stage"], z0 / scale)

  def prepare_batch(self, host_batch):
    return self.cond.prepare(host_batch)


PROMPTS = ("a photograph of an astronaut riding a horse",
           "a watercolour painting of a lighthouse at dawn",
           "a red bicycle leaning against a brick wall",
           "a bowl of ramen, studio lighting")


def default_config(size: str = "tiny", *, context: str = "text", classes: int = 0,
                   concat: str = "none"):
  """`config.stage2` for the UNet preset `size` (each field commented)."""
  import ml_collections
  from ldm_jax.models import unet as unet_lib
  c = ml_collections.ConfigDict()
  c.unet = ml_collections.ConfigDict(unet_lib.preset(size))  # UNetModel kwargs (in/out channels set from the first stage)
  c.text = conditioning.text_config(size)          # tokenizer + tau (from-scratch or CLIP)
  c.conditioning = ml_collections.ConfigDict(dict(
      context=context,        # 'text' (cross-attention) | 'none'
      classes=classes,        # class labels for 'adm' conditioning (0 = none)
      concat=concat,          # 'none' | 'lowres' | 'inpaint' | 'layout'
      lowres_factor=4,        # super-resolution: the low-res image is 1/lowres_factor
      pooled=False))          # text: also add mean-pooled tau(y) to the time embedding (SDXL-like)
  c.schedule = ml_collections.ConfigDict(dict(
      kind="linear", T=1000, linear_start=0.00085, linear_end=0.012,  # SD's scaled-linear
      zero_terminal_snr=False))   # rescaled to SNR 0 at T - 1 (Lin et al. 2023): needs v or x0
  c.prediction_type = "eps"   # eps | v | x0
  c.weighting = "simple"      # simple | min_snr
  c.min_snr_gamma = 5.0       # min_snr: the cap gamma of the SNR weight
  c.min_snr_floor = 0.0       # min_snr: x0-space weight min(max(SNR, floor), gamma); 1 = truncated SNR
  c.offset_noise = 0.0        # offset-noise scale (0 = off)
  c.timestep_sampling = "uniform"  # uniform | logit_normal: t = T sigmoid(u), u ~ N(logit_mean, logit_std)
  c.logit_mean = 0.0          # logit_normal: the mean of u
  c.logit_std = 1.0           # logit_normal: the standard deviation of u
  c.cond_drop = 0.1           # P(condition replaced by the null condition): classifier-free guidance
  c.ema_decay = 0.9999        # EMA of the weights (with the reference's warm-up)
  c.lr = 1e-4                 # AdamW's peak learning rate
  c.warmup_steps = 1000       # linear warm-up from 0
  c.lr_decay = "constant"     # after warm-up: 'constant' (the reference) | 'cosine' (to 0 at total_steps)
  c.weight_decay = 0.0        # AdamW's decoupled weight decay
  c.grad_clip = 1.0           # the gradients' global norm is clipped to this
  # dtype bfloat16: cast the UNet's kernels to bf16 once per step, before the forward
  # pass, instead of at every use (step.cast_kernels; no effect in float32).
  c.cast_params_once = False
  c.scale_factor = 0.0        # z = scale_factor * E(x); 0 = estimate 1/std(z) after stage 1
  c.first_stage_workdir = ""  # a stage-1 workdir to take the autoencoder from ("" = this run's)
  # Encode the training set once before the first step and train on the stored
  # latents (training/latent_cache.py): each step skips the frozen encoder.
  c.latent_cache = False
  c.sample = ml_collections.ConfigDict(dict(
      steps=50, guidance=5.0, sampler="ddim", prompts=PROMPTS,
      # diffusers' names: 'leading' | 'trailing' | 'linspace' (| CompVis 'quadratic');
      # 'auto' = 'trailing' on a zero-terminal-SNR schedule, else 'leading'
      timestep_spacing="auto",
      # guidance only at t / T in [lo, hi] (Kynkaanniemi et al. 2024); (0, 1) = every step
      guidance_interval=(0.0, 1.0),
      steps_offset=1 if size in ("sd15", "sd2") else 0,  # added to 'leading' (SD's scheduler: 1)
      # False: the last step ends at alphas_cumprod[0], not a = 1 (SD's scheduler)
      set_alpha_to_one=size not in ("sd15", "sd2")))
  # Evaluation while training (evaluation/periodic.py, docs/evaluation.md): every
  # `every` steps and at the end, `num` images sampled with the EMA weights are
  # measured, logged as eval/<metric> and kept in ldm/eval/train_step<N>.json.
  c.eval = ml_collections.ConfigDict(dict(
      every=0,                # steps between evaluations (0 = off)
      num=64,                 # images each time (FID grows as N shrinks: compare equal N only)
      metrics="fid",          # comma list: fid, kid, is, clip_score, prompts (shapes held-out prompts)
      guidance=0.0,           # guidance scale (0 = sample.guidance)
      steps=0,                # sampler steps (0 = sample.steps)
      batch=64,               # images per sampling call (rounded up to a multiple of the devices)
      seed=0,                 # seed of the noise and of the shapes held-out prompts
      reference="",           # FID/KID statistics .npz ("" = on shapes data: num held-out images)
      # pytorch-fid's Inception .pth for fid, kid, is ("" = $LDM_INCEPTION_WEIGHTS;
      # neither: those metrics are skipped and the run says so)
      inception_weights="",
      clip=""))               # CLIPModel folder for clip_score ("" = $LDM_CLIP; neither: skipped)
  return c
