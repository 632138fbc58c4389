"""Stage 1: the perceptual autoencoder as a Task (see `ldm_jax.training.step`).

One pure `update` trains the autoencoder (generator) and the PatchGAN
discriminator together: the two losses are summed with stop-gradients placed
so that their gradients separate exactly (the generator sees D with frozen
weights, D sees sg[x_hat]); one (accumulated) backward pass then yields both
gradients, and two Adam optimisers (betas 0.5, 0.9) apply them. D therefore
trains on the reconstructions of the autoencoder before this step's update
(taming-transformers recomputes them after it; the difference is one step).

Before `disc_start` the GAN branch is skipped by `lax.cond` (d_weight, g_loss
and the D metrics read 0). After it, lambda is computed per micro-batch when
`grad_accum > 1`; everything else equals the full-batch gradient.
"""
import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from ldm_jax.evaluation.image_metrics import psnr, ssim
from ldm_jax.models import autoencoder as ae
from ldm_jax.models import layers
from ldm_jax.models.convert import load_torch_file, torch_to_flax
from ldm_jax.models.discriminator import NLayerDiscriminator
from ldm_jax.models.lpips import load_lpips
from ldm_jax.training import autoencoder_losses as L
from ldm_jax.training.step import Task, accumulate_gradients, lr_schedule


def default_config(kind: str = "kl", f: int = 8, size: str = "ref") -> ml_collections.ConfigDict:
  """`config.stage1` for a paper first-stage model (size='ref') or its CPU variant ('tiny')."""
  c = ml_collections.ConfigDict()
  c.kind = kind                      # 'kl' (Gaussian posterior) or 'vq' (codebook)
  c.f = f                            # downsampling factor H/h = 2^(len(ch_mult)-1)
  c.image_size = 256 if size == "ref" else 32  # training resolution; must be divisible by f
  c.model = ml_collections.ConfigDict(ae.preset(kind, f, size))  # AutoencoderKL / VQModel kwargs
  c.model.dropout = 0.0              # dropout in the ResnetBlocks (needs a dropout rng when > 0)
  if kind == "vq":
    c.model.beta = 0.25              # commitment weight beta
    c.model.l2_normalize = False     # cosine-similarity codebook lookups
    c.model.ema_decay = 0.0          # > 0: EMA codebook updates instead of the codebook loss term
    # EMA codebook: a code whose running count (vectors a batch) falls below this is
    # re-seeded from the batch's encodings (dead-code restarts); 0 = never.
    c.dead_code_threshold = 0.0
  # KL: decode a posterior sample in training (mode otherwise). tiny decodes the mode:
  # in a few thousand steps the posterior variance is still large and its noise
  # drowns the small shapes; the KL term still regularises the mean.
  c.sample_posterior = size == "ref"
  c.init_from = ""                   # diffusers AutoencoderKL/VQModel weights (.safetensors/.bin); "" = random
  # Reference lr: base 4.5e-6 x batch 12 x 8 GPUs (CompVis scale_lr); tiny: tuned on shapes.
  c.lr = 4.5e-6 * 12 * 8 if size == "ref" else 1e-3
  c.disc_lr = -1.0                   # discriminator lr; < 0 means the same as lr
  # 'constant' (the reference) | 'cosine' to 0 at the last step: a short CPU run
  # ends sharper when the step size anneals.
  c.lr_decay = "constant" if size == "ref" else "cosine"
  # Adam betas of both optimisers (taming: 0.5, 0.9). tiny, which trains for minutes
  # without a GAN on a CPU, converges far faster with the usual (0.9, 0.999).
  c.b1 = 0.5 if size == "ref" else 0.9
  c.b2 = 0.9 if size == "ref" else 0.999
  c.loss = ml_collections.ConfigDict()
  c.loss.rec = "l1" if size == "ref" else "l2"  # pixel term; tiny: l2 learns small shapes sooner
  # Weight w_g of the same penalty on the images' finite differences (the gradient-
  # difference loss), which charges a blurred outline where the pixel term hardly does.
  # tiny: 10, since without LPIPS (its VGG weights are a download) the pixel term alone
  # decodes small stars and crosses as round blobs (docs/experiments.md).
  c.loss.gradient_weight = 0.0 if size == "ref" else 10.0
  c.loss.perceptual_weight = 1.0     # LPIPS weight w_p; only used when both paths below are set
  c.loss.lpips_vgg_path = ""         # torchvision vgg16 state dict (features.*); "" = no LPIPS
  c.loss.lpips_lin_path = ""         # lpips weights/v0.1/vgg.pth (lin0..lin4); "" = no LPIPS
  c.loss.kl_weight = 1e-6            # KL: weight of KL(q(z|x) || N(0, I))
  # KL: tau of the noise-augmented decoder (RAE, Zheng et al. 2025): it decodes
  # z + sigma * std(z) * eps, sigma ~ |N(0, tau^2)| per example, so it learns to
  # read latents off the encoder's, as stage 2's samples are. 0 = off.
  c.loss.latent_noise = 0.0
  c.loss.logvar_init = 0.0           # KL: initial value of the learned scalar log-variance
  c.loss.codebook_weight = 1.0       # VQ: weight of the codebook + commitment loss
  c.loss.disc_start = 50001 if size == "ref" else 10**9  # step at which the GAN terms switch on
  c.loss.disc_factor = 1.0           # multiplies G in the AE loss and the D loss after disc_start
  c.loss.disc_weight = 0.5           # scales the adaptive weight lambda
  c.loss.disc_loss = "hinge"         # 'hinge' or 'vanilla'
  c.loss.disc_layers = 3             # PatchGAN n_layers
  c.loss.disc_ch = 64 if size == "ref" else 32  # PatchGAN base channels ndf
  c.loss.disc_norm = "batch"         # 'batch' (batch statistics, as taming in train mode) | 'group' | 'none'
  return c


def _tx(lr, c, total_steps):
  try:
    schedule = lr_schedule(lr, warmup_steps=0, total_steps=total_steps,
                           decay=c.get("lr_decay", "constant"))
  except ValueError as e:
    raise ValueError(f"config.stage1.{e}") from None
  return optax.adam(schedule, b1=c.b1, b2=c.b2)


def _noised(z, sigma, rng):
  """z + sigma * std(z) * eps: std over the batch, not differentiated (the noise cannot be
  outgrown); sigma a scalar or one per example."""
  return z + sigma * jax.lax.stop_gradient(jnp.std(z)) * jax.random.normal(rng, z.shape)


def _noisy_round_trip(model, x, rng, noise_rng, tau):
  """AutoencoderKL's round trip, decoding `_noised` z with sigma ~ |N(0, tau^2)| per example."""
  posterior = model.encode(x)
  z = posterior.sample(rng) if rng is not None else posterior.mode()
  r_sigma, r_eps = jax.random.split(noise_rng)
  sigma = tau * jnp.abs(jax.random.normal(r_sigma, (z.shape[0],) + (1,) * (z.ndim - 1)))
  x_hat, feats = model.decode(_noised(z, sigma, r_eps), return_features=True)
  return x_hat, posterior, {"features": feats}


class AutoencoderTask(Task):
  """Stage-1 Task. `config.stage1` from `default_config`; global `dtype`, `remat`, `grad_accum`."""

  def __init__(self, config):
    c = self.c = config.stage1
    self.grad_accum = int(config.get("grad_accum", 1))
    if c.kind not in ("kl", "vq"):
      raise ValueError(f"stage1.kind: expected 'kl' or 'vq', got {c.kind!r}")
    n_down = 2 ** (len(c.model.ch_mult) - 1)
    if n_down != c.f:
      raise ValueError(f"stage1.f={c.f} but stage1.model.ch_mult={tuple(c.model.ch_mult)} downsamples by {n_down}")
    if c.image_size % c.f:
      raise ValueError(f"stage1.image_size={c.image_size} is not divisible by stage1.f={c.f}")
    if c.image_size // 2 ** c.loss.disc_layers < 3:  # the two stride-1 4x4 convs need >= 3x3
      raise ValueError(f"stage1.loss.disc_layers={c.loss.disc_layers} downsamples "
                       f"stage1.image_size={c.image_size} below 3x3 patches")
    if c.loss.gradient_weight < 0:
      raise ValueError(f"stage1.loss.gradient_weight={c.loss.gradient_weight}: must be >= 0")
    tau = c.loss.get("latent_noise", 0.0)
    if tau < 0 or (tau > 0 and c.kind != "kl"):
      raise ValueError(f"stage1.loss.latent_noise={tau}: must be >= 0, and > 0 needs stage1.kind='kl'")
    if c.loss.disc_loss not in L.DISC_LOSSES:
      raise ValueError(f"stage1.loss.disc_loss: expected one of {sorted(L.DISC_LOSSES)}, got {c.loss.disc_loss!r}")
    dtype = {"float32": None, "bfloat16": jnp.bfloat16}.get(config.get("dtype", "float32"), "?")
    if dtype == "?":
      raise ValueError(f"dtype: expected 'float32' or 'bfloat16', got {config.dtype!r}")
    cls = ae.AutoencoderKL if c.kind == "kl" else ae.VQModel
    kw = dict(c.model.to_dict(), dtype=dtype, remat=bool(config.get("remat", False)))
    self.model = cls(**kw, deterministic=not c.model.dropout)
    self.eval_model = cls(**kw, deterministic=True)
    self.ema = c.kind == "vq" and c.model.get("ema_decay", 0.0) > 0
    self.restart = float(c.get("dead_code_threshold", 0.0))
    if self.restart < 0 or (self.restart > 0 and not self.ema):
      raise ValueError(f"stage1.dead_code_threshold={self.restart}: must be >= 0, and > 0 needs "
                       "the EMA codebook (stage1.kind='vq', stage1.model.ema_decay > 0)")
    self.disc = NLayerDiscriminator(c.loss.disc_ch, c.loss.disc_layers, c.loss.disc_norm, dtype=dtype)
    total = int(config.get("total_steps", 1))
    self.tx = _tx(c.lr, c, total)
    self.disc_tx = _tx(c.disc_lr if c.disc_lr >= 0 else c.lr, c, total)
    self.lpips = load_lpips(c.loss.lpips_vgg_path or None, c.loss.lpips_lin_path or None)
    self.x_shape = (1, c.image_size, c.image_size, 3)
    self.pretrained = self._load(c.init_from) if c.init_from else None

  def _load(self, path):
    """Host side: converts a diffusers checkpoint; a different z_channels/ch_mult fails here."""
    shapes = nn.unbox(jax.eval_shape(self.model.init, jax.random.PRNGKey(0), jnp.zeros(self.x_shape)))
    template = shapes["params"]
    logging.info("stage1: initialising the autoencoder from %s", path)
    return torch_to_flax(load_torch_file(path), template, what=f"stage1.init_from {path!r}")

  # ---- Task contract ----
  def init(self, rng):
    r_ae, r_d = jax.random.split(rng)
    x = jnp.zeros(self.x_shape)
    variables = self.model.init(r_ae, x)
    ae_params = variables["params"]
    if self.pretrained is not None:
      ae_params = jax.tree.map(lambda box, w: box.replace_boxed(jnp.asarray(w))
                               if isinstance(box, nn.LogicallyPartitioned) else jnp.asarray(w),
                               ae_params, self.pretrained,
                               is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
    params = {"autoencoder": ae_params}
    if self.c.kind == "kl":
      params["logvar"] = jnp.full((), self.c.loss.logvar_init, jnp.float32)
    if self.ema:  # not trained by gradients (they are exactly 0); updated by EMA in `update`
      params["vq_ema"] = variables["vq_ema"]
    disc_params = self.disc.init(r_d, x)["params"]
    return dict(step=jnp.zeros((), jnp.int32), params=params, disc_params=disc_params,
                opt=self.tx.init(params), disc_opt=self.disc_tx.init(disc_params))

  def prepare_batch(self, host_batch):
    return {"image": host_batch["image"]}

  def _variables(self, params):
    v = {"params": params["autoencoder"]}
    if self.ema:
      v["vq_ema"] = jax.lax.stop_gradient(params["vq_ema"])
    return v

  def _loss(self, trainable, batch, rng, step):
    c, lc = self.c, self.c.loss
    params, disc_params = trainable["g"], trainable["d"]
    x = batch["image"].astype(jnp.float32)
    r_z, r_drop, r_noise = jax.random.split(rng, 3)
    sample = c.kind == "kl" and c.sample_posterior
    if lc.get("latent_noise", 0.0) > 0:
      x_hat, reg, info = self.model.apply(
          self._variables(params), x, r_z if sample else None, r_noise, lc.latent_noise,
          method=_noisy_round_trip, rngs={"dropout": r_drop})
    else:
      x_hat, reg, info = self.model.apply(self._variables(params), x, r_z if sample else None,
                                          return_features=True, rngs={"dropout": r_drop})

    def nll_of(xh):
      p = self.lpips[0].apply({"params": self.lpips[1]}, x, xh) if self.lpips else None
      rec = L.rec_loss(x, xh, lc.rec, p, lc.perceptual_weight, lc.gradient_weight)
      nll = L.nll_loss(rec, params["logvar"]) if c.kind == "kl" else jnp.mean(rec)
      return nll, rec

    nll, rec = nll_of(x_hat)
    aux = {"rec_loss": jnp.mean(rec), "nll": nll,
           "psnr": jnp.mean(psnr(x, jnp.clip(x_hat, -1, 1)))}
    if c.kind == "kl":
      aux["kl"] = L.kl_loss(reg.mean, reg.logvar)
      aux["logvar"] = params["logvar"]
      ae_loss = nll + lc.kl_weight * aux["kl"]
    else:
      aux.update(codebook_loss=reg, perplexity=info["perplexity"], usage=info["usage"])
      if self.ema:
        aux.update(code_freq=info["code_freq"], code_mean_sum=info["code_mean_sum"])
      ae_loss = nll + lc.codebook_weight * reg

    disc_factor = L.adopt_weight(lc.disc_factor, step, lc.disc_start)
    d_fn = lambda p, im: self.disc.apply({"params": p}, im)
    conv_out = params["autoencoder"]["decoder"]["conv_out"]
    last = lambda feats, k: layers.Conv(3, 3, dtype=self.model.dtype).apply(
        {"params": {"kernel": k, "bias": conv_out["bias"]}}, feats).astype(jnp.float32)

    def gan_on(x_hat, feats, disc_params):
      d_frozen = jax.lax.stop_gradient(disc_params)
      g_of = lambda xh: L.generator_loss(d_fn(d_frozen, xh))
      g_loss = g_of(x_hat)
      d_weight = L.adaptive_weight(
          L.last_layer_grad(lambda xh: nll_of(xh)[0], last, feats, conv_out["kernel"]),
          L.last_layer_grad(g_of, last, feats, conv_out["kernel"]), lc.disc_weight)
      real = d_fn(disc_params, x)
      fake = d_fn(disc_params, jax.lax.stop_gradient(x_hat))
      d_loss = L.DISC_LOSSES[lc.disc_loss](real, fake)
      return g_loss, d_weight, d_loss, jnp.mean(real), jnp.mean(fake)

    def gan_off(x_hat, feats, disc_params):
      z = jnp.zeros((), jnp.float32)
      return z, z, z, z, z

    g_loss, d_weight, d_loss, lr_, lf_ = jax.lax.cond(
        step >= lc.disc_start, gan_on, gan_off, x_hat, info["features"], disc_params)
    g_total = ae_loss + d_weight * disc_factor * g_loss
    d_total = disc_factor * d_loss
    aux.update(loss=g_total, g_loss=g_loss, d_weight=d_weight, disc_factor=disc_factor,
               disc_loss=d_total, logits_real=lr_, logits_fake=lf_)
    return g_total + d_total, aux

  def update(self, state, batch, rng):
    """One generator + discriminator step. Returns (state, scalar metrics)."""
    step = state["step"]
    rng = jax.random.fold_in(rng, step)
    trainable = {"g": state["params"], "d": state["disc_params"]}
    loss_fn = lambda t, b, r: self._loss(t, b, r, step)
    _, aux, grads = accumulate_gradients(loss_fn, trainable, {"image": batch["image"]}, rng,
                                         self.grad_accum)
    upd, opt = self.tx.update(grads["g"], state["opt"], state["params"])
    params = optax.apply_updates(state["params"], upd)
    d_upd, disc_opt = self.disc_tx.update(grads["d"], state["disc_opt"], state["disc_params"])
    disc_params = optax.apply_updates(state["disc_params"], d_upd)
    if self.ema:
      freq, msum = aux.pop("code_freq"), aux.pop("code_mean_sum")
      b, h, w = batch["image"].shape[:3]
      n = b * (h // self.c.f) * (w // self.c.f)
      vq_ema = ae.ema_codebook_update(state["params"]["vq_ema"]["quantize"], freq, msum, n,
                                      self.c.model.ema_decay)
      if self.restart:
        r_restart = jax.random.fold_in(rng, self.grad_accum)  # micro-batch i takes i < grad_accum
        vq_ema, aux["restarts"] = ae.restart_dead_codes(vq_ema, freq, msum, self.restart, r_restart)
      params = dict(params, vq_ema={"quantize": vq_ema})
    state = dict(state, step=step + 1, params=params, disc_params=disc_params, opt=opt,
                 disc_opt=disc_opt)
    return state, aux

  def sample(self, state, batch, rng, latent_noise: float = 0.0):
    """Reconstructions x_hat = D(E(x)) (posterior mode / quantised) of batch['image'], in [-1, 1].

    latent_noise = s > 0 (KL): D(z + s std(z) eps) with eps from `rng`, how the decoder
    reads latents off the encoder's (stage 2's samples are such latents)."""
    variables = self._variables(state["params"])
    if latent_noise:
      if self.c.kind != "kl":
        raise ValueError("latent noise needs a KL first stage (stage1.kind='kl')")

      def noisy(model, x):
        return model.decode(_noised(model.encode(x).mode(), latent_noise, rng))
      out = self.eval_model.apply(variables, batch["image"], method=noisy)
    else:
      out = self.eval_model.apply(variables, batch["image"])[0]
    return jnp.clip(out, -1.0, 1.0)

  def sample_metrics(self, batch, images):
    """PSNR and SSIM of the reconstructions `images` (from `sample`) of batch['image']."""
    x = batch["image"]
    out = {"psnr": jnp.mean(psnr(x, images))}
    if min(x.shape[1:3]) >= 11:  # SSIM's 11x11 window
      out["ssim"] = jnp.mean(ssim(x, images))
    return out
