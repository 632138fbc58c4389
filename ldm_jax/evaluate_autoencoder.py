"""python -m ldm_jax.evaluate_autoencoder --workdir=DIR [--num 1000] [--inception PATH]

Reconstruction quality of a trained first stage on images it never trained on:
PSNR and SSIM of x against x_hat = D(E(x)) (posterior mode / quantised), and,
given the FID Inception weights (pytorch-fid's `pt_inception-2015-12-05-*.pth`),
rFID between the Inception statistics of the originals and the reconstructions
(the paper's Table 8 columns). The held-out images are, per data source:
  shapes: the held-out split (attribute combinations never trained on);
  wds:    --shards (the training run's shards are not held out);
  tfds:   --tfds_split (default 'validation').
Batches are sharded over all devices and hosts; process 0 prints the table and
writes results.json.
"""
import logging
import posixpath
import time

from absl import app, flags

from ldm_jax import cli


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program: `evaluate` is also
  imported beside other entry points whose flags share these names."""
  flags.DEFINE_string("workdir", None, "A training workdir (its autoencoder/ checkpoints are used).")
  flags.DEFINE_string("checkpoint", None, "A stage-1 checkpoints folder (instead of --workdir).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("num", 1000, "Held-out images to reconstruct.")
  flags.DEFINE_integer("batch", 100, "Global batch (rounded up to a multiple of the devices).")
  flags.DEFINE_float("latent_noise", 0.0, "KL: decode z + s std(z) eps instead of z (s = this): "
                     "how much survives latents off the encoder's, as stage 2's samples are.")
  flags.DEFINE_string("inception", None, "FID Inception weights (.pth/.safetensors); rFID is "
                      "skipped without them.")
  flags.DEFINE_string("shards", None, "wds runs: the held-out shards (brace pattern, glob, list).")
  flags.DEFINE_string("tfds_split", "validation", "tfds runs: the held-out split.")
  flags.DEFINE_string("out", None, "Where to write results.json (default: workdir/autoencoder/eval).")


FLAGS = flags.FLAGS


def evaluate(task, state, mesh, config, *, num: int, batch: int, inception=None,
             shards=None, tfds_split: str = "validation", latent_noise: float = 0.0) -> dict:
  """Mean PSNR / SSIM (and rFID when `inception` = (module, params)) over `num` held-out
  images; `latent_noise` s > 0 decodes z + s std(z) eps (batch b's eps drawn from (seed, b))."""
  import jax
  import numpy as np
  from jax.experimental import multihost_utils
  from ldm_jax import data as data_lib, parallel
  from ldm_jax.console import progress
  from ldm_jax.evaluation.image_metrics import psnr, ssim
  from ldm_jax.evaluation.fid import feature_stats, frechet_distance

  dp = parallel.data_parallel_size(mesh)
  batch = -(-batch // dp) * dp
  per_process = batch // jax.process_count()
  it = data_lib.make_iterator(data_lib.heldout(config.data, num=num, shards=shards,
                                               tfds_split=tfds_split),
                              batch_size=per_process, process_index=jax.process_index(),
                              process_count=jax.process_count(), seed=config.seed)
  # On the shapes data: which attributes survive the round trip, i.e. the ceiling
  # a stage 2 trained on these latents can reach in evaluate_prompts.
  shapes_attrs = config.data.source == "shapes" and not shards
  inc_params = None
  if inception is not None:
    inc_params = jax.device_put(inception[1], parallel.replicated(mesh))

  @jax.jit
  def measure(state, inc_params, x, key):
    if latent_noise:
      x_hat = task.sample(state, {"image": x}, key, latent_noise=latent_noise)
    else:
      x_hat = task.sample(state, {"image": x}, None)
    out = {"psnr": psnr(x, x_hat), "ssim": ssim(x, x_hat)}
    if shapes_attrs:
      out["x"], out["x_hat"] = x, x_hat
    if inc_params is not None:
      feats = inception[0].apply({"params": inc_params}, jax.numpy.concatenate([x, x_hat]))
      out["feat_x"], out["feat_x_hat"] = feats[:x.shape[0]], feats[x.shape[0]:]
    return out

  from ldm_jax.data.shapes import ATTRIBUTES, classify_image
  parts = []
  for b in progress(range(-(-num // batch)), desc="round trips", unit="batch"):
    x = parallel.global_batch({"image": next(it)["image"]}, mesh)["image"]
    key = jax.random.fold_in(jax.random.key(config.seed), b)
    part = multihost_utils.process_allgather(measure(state, inc_params, x, key), tiled=True)
    if shapes_attrs:  # images become per-attribute matches here: only scalars are kept
      pairs = [(classify_image(a), classify_image(b)) for a, b in
               zip(part.pop("x"), part.pop("x_hat"))]
      part.update({f"kept_{k}": np.array([getattr(a, k) == getattr(b, k) for a, b in pairs])
                   for k in ATTRIBUTES})
    parts.append(part)
  got = {k: np.concatenate([np.asarray(p[k]) for p in parts])[:num] for k in parts[0]}
  res = {"num": int(len(got["psnr"])), "psnr": float(got["psnr"].mean()),
         "psnr_std": float(got["psnr"].std()), "ssim": float(got["ssim"].mean()),
         "ssim_std": float(got["ssim"].std()), "latent_noise": latent_noise,
         "data_stats": it.stats()}
  if shapes_attrs:
    res["attributes_kept"] = {k: float(got[f"kept_{k}"].mean()) for k in ATTRIBUTES}
  if inception is not None:
    res["rfid"] = frechet_distance(*feature_stats(got["feat_x"]), *feature_stats(got["feat_x_hat"]))
  return res


def main(argv):
  del argv
  from ldm_jax import storage
  ckpt_dir = FLAGS.checkpoint or (storage.join(FLAGS.workdir, "autoencoder", "checkpoints")
                                  if FLAGS.workdir else None)
  if ckpt_dir is None:
    raise app.UsageError("give --workdir or --checkpoint")
  if FLAGS.latent_noise < 0:
    raise app.UsageError(f"--latent_noise={FLAGS.latent_noise}: must be >= 0")
  for name in ("num", "batch"):
    if FLAGS[name].value < 1:
      raise app.UsageError(f"--{name}={FLAGS[name].value}: must be at least 1")
  from ldm_jax.console import setup_logging
  setup_logging()
  import jax
  jax.config.update("jax_threefry_partitionable", True)
  from ldm_jax.evaluation.restore import restore
  from ldm_jax.training.autoencoder import AutoencoderTask
  log = logging.getLogger("ldm_jax")
  out_dir = FLAGS.out or storage.join(posixpath.dirname(ckpt_dir.rstrip("/")), "eval")
  inception = None
  if FLAGS.inception:
    from ldm_jax.models.inception import load_inception
    inception = load_inception(FLAGS.inception)
  else:
    log.info("no --inception weights: rFID is skipped (PSNR and SSIM only)")
  task, state, mesh, config = restore(ckpt_dir, AutoencoderTask, stage="autoencoder",
                                      what="autoencoder/checkpoints folder of a run",
                                      step=FLAGS.step)
  t0 = time.time()
  res = evaluate(task, state, mesh, config, num=FLAGS.num, batch=FLAGS.batch, inception=inception,
                 shards=FLAGS.shards, tfds_split=FLAGS.tfds_split, latent_noise=FLAGS.latent_noise)
  res.update(step=int(jax.device_get(state["step"])), seconds=round(time.time() - t0, 1),
             checkpoint=ckpt_dir)
  if jax.process_index() == 0:
    rows = [("PSNR (dB)", f"{res['psnr']:.2f} ± {res['psnr_std']:.2f}"),
            ("SSIM", f"{res['ssim']:.4f} ± {res['ssim_std']:.4f}"),
            ("rFID", f"{res['rfid']:.3f}" if "rfid" in res else "— (no --inception)")]
    rows += [(f"{k} kept", f"{100 * v:.1f}%") for k, v in res.get("attributes_kept", {}).items()]
    noise = f", latents + {FLAGS.latent_noise:g} std(z) noise" if FLAGS.latent_noise else ""
    print(f"{res['num']} held-out images, checkpoint step {res['step']}{noise}:")
    print("| metric | value |\n|---|---|")
    for name, value in rows:
      print(f"| {name} | {value} |")
    storage.write_json(storage.join(out_dir, "results.json"), res, indent=1)
    log.info("wrote %s", storage.join(out_dir, "results.json"))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
