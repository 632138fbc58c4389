"""The VQ first stage's EMA codebook: the update in closed form, dead-code restarts,
and a tiny VQ autoencoder that trains on shapes with its codebook in use."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config_lib, data, parallel
from ldm_jax.models import autoencoder as ae
from ldm_jax.training.autoencoder import AutoencoderTask
from tests.test_configs import load

K, D = 8, 3


def _fresh_ema(seed=0):
  vq = ae.VectorQuantizer(K, D, ema_decay=0.99)
  return vq, vq.init(jax.random.key(seed), jnp.zeros((1, 2, 2, D)))["vq_ema"]


def test_ema_update_keeps_unused_codes_in_place():
  """Two codes used, six not: the used ones move to the closed-form EMA of their
  batch means, the unused ones keep their place (before, they were divided by a
  count of ~1e-5 and left the data for good)."""
  vq, ema = _fresh_ema()
  e0 = np.asarray(ema["embedding"])
  np.testing.assert_allclose(ema["embed_sum"], e0 * np.asarray(ema["cluster_size"])[:, None])
  z = np.concatenate([np.tile(e0[2] + 0.01, (6, 1)), np.tile(e0[5] - 0.01, (2, 1))])
  _, _, info = vq.apply({"vq_ema": ema}, z.reshape(1, 2, 4, D))
  n, d = 8, 0.99
  new = jax.device_get(ae.ema_codebook_update(ema, info["code_freq"], info["code_mean_sum"], n, d))
  counts = np.zeros(K)
  counts[[2, 5]] = 6, 2
  sums = np.zeros((K, D))
  sums[2], sums[5] = 6 * (e0[2] + 0.01), 2 * (e0[5] - 0.01)
  cs = d * 1.0 + (1 - d) * counts
  es = d * e0 + (1 - d) * sums
  smooth = (cs + 1e-5) / (cs.sum() + K * 1e-5) * cs.sum()
  np.testing.assert_allclose(new["cluster_size"], cs, rtol=1e-5)
  np.testing.assert_allclose(new["embedding"], es / smooth[:, None], rtol=1e-4, atol=1e-7)
  unused = [k for k in range(K) if k not in (2, 5)]
  np.testing.assert_allclose(new["embedding"][unused], e0[unused], rtol=1e-3, atol=1e-7)


def test_dead_codes_restart_at_used_centroids():
  vq, ema = _fresh_ema()
  e0 = np.asarray(ema["embedding"])
  z = np.concatenate([np.tile([1.0, 2.0, 3.0], (4, 1)), np.tile([-2.0, 0.5, 1.0], (4, 1))])
  _, _, info = vq.apply({"vq_ema": ema}, z.reshape(1, 2, 4, D).astype(np.float32))
  ema = dict(ema, cluster_size=jnp.asarray([3.0, 0.1, 3.0, 0.1, 0.1, 3.0, 3.0, 3.0]))
  new, n = jax.device_get(ae.restart_dead_codes(ema, info["code_freq"], info["code_mean_sum"],
                                                0.5, jax.random.key(1)))
  dead = [1, 3, 4]
  assert int(n) == 3
  live = [0, 2, 5, 6, 7]
  np.testing.assert_array_equal(new["embedding"][live], e0[live])
  freq, msum = np.asarray(info["code_freq"]), np.asarray(info["code_mean_sum"])
  centroids = msum[freq > 0] / freq[freq > 0, None]  # means of the vectors each used code took
  for k in dead:  # each at one of the used codes' centroids, up to 1% noise
    dist = np.linalg.norm(centroids - np.asarray(new["embedding"][k]), axis=1)
    assert dist.min() < 0.1 * np.linalg.norm(centroids[dist.argmin()])
  np.testing.assert_allclose(new["cluster_size"][dead], 0.5)
  np.testing.assert_allclose(new["embed_sum"][dead], 0.5 * np.asarray(new["embedding"][dead]),
                             rtol=1e-6)


def test_restarts_need_the_ema_codebook():
  c = load("autoencoder_vq").unlock()
  c.stage1.dead_code_threshold = 1.0
  with pytest.raises(ValueError, match="dead_code_threshold"):
    AutoencoderTask(config_lib.for_stage(c, "stage1"))


def _vq_config(tmp, **fields):
  """A 64-code EMA VQ autoencoder at 16 px with dead-code restarts, on shapes."""
  c = load("autoencoder_vq").unlock()
  c.data.resolution = c.stage1.image_size = 16
  c.data.cache_dir = str(tmp / "cache")
  c.data.shapes.num = c.data.shapes.shard_size = 256
  c.stage1.model.update(ch=16, ch_mult=(1, 2, 2), n_embed=64, ema_decay=0.95, resolution=16)
  c.stage1.loss.update(disc_layers=2, gradient_weight=0.0)
  c.stage1.lr = 3e-3
  c.stage1.dead_code_threshold = 0.5
  c.batch_size, c.total_steps = 8, 120
  c.update(fields)
  return config_lib.for_stage(c.lock(), "stage1")


def _steps(task, state, images):
  """Runs `task.update` over the batches; returns (state, metrics, max |e| after each)."""
  update = jax.jit(task.update)
  hist, norms = [], []
  for x in images:
    state, m = update(state, {"image": x}, jax.random.key(1))
    hist.append(m)
    norms.append(jnp.abs(state["params"]["vq_ema"]["quantize"]["embedding"]).max())
  hist, norms = jax.device_get((hist, norms))
  return state, hist, norms


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory):
  """(initial state, batches, metrics, max |e|) of 120 float32 steps."""
  c = _vq_config(tmp_path_factory.mktemp("vq"))
  task = AutoencoderTask(c)
  state0 = jax.jit(lambda r: parallel.unbox(task.init(r)))(jax.random.key(0))
  it = data.make_iterator(c.data, batch_size=c.batch_size, seed=0)
  images = [next(it)["image"] for _ in range(c.total_steps)]
  _, hist, norms = _steps(task, state0, images)
  return state0, images, hist, norms


def test_tiny_vq_first_stage_trains_with_its_codebook_in_use(vq_run):
  """120 steps: the codebook stays bounded and in use (128 vectors a batch can reach
  ~86% of 64 codes) and the reconstruction improves. Without the restarts usage
  stays near 0.3 here; with the old initialisation the first update threw unused
  codes ~1e4x away."""
  _, _, hist, norms = vq_run
  mean = lambda k, a, b: float(np.mean([h[k] for h in hist[a:b]]))
  assert max(norms) < 10.0
  assert mean("restarts", 0, 120) > 0
  assert mean("usage", 20, 120) > 0.6, [round(float(h["usage"]), 2) for h in hist[::10]]
  assert mean("perplexity", 20, 120) > 25
  assert mean("rec_loss", 100, 120) < 0.5 * mean("rec_loss", 0, 20)
  assert mean("psnr", 100, 120) > mean("psnr", 0, 20) + 4.0


def test_bfloat16_stage1_updates_like_float32(tmp_path, vq_run):
  """config.dtype=bfloat16 through stage-1 updates (encoder, quantizer, decoder, the
  discriminator's branch compiled in) and reconstructions: from the same weights and
  batches the losses are float32's within bf16's precision (1% at the first step,
  10% two Adam steps on), and the weights stay float32."""
  state0, images, hist32, _ = vq_run
  task = AutoencoderTask(_vq_config(tmp_path, dtype="bfloat16"))
  assert task.model.dtype == jnp.bfloat16
  state, hist16, _ = _steps(task, state0, images[:3])
  for k in ("loss", "rec_loss", "codebook_loss"):
    got, want = [h[k] for h in hist16], [h[k] for h in hist32[:3]]
    np.testing.assert_allclose(got[0], want[0], rtol=1e-2, err_msg=k)  # the same weights
    if k != "codebook_loss":  # a small term that follows which codes the vectors pick
      # Adam's lr-sized steps (3e-3) carry bf16's rounding of the small gradients
      np.testing.assert_allclose(got, want, rtol=0.1, err_msg=k)
  assert {a.dtype for a in jax.tree.leaves(state["params"])} == {np.dtype("float32")}
  recon = np.asarray(jax.jit(task.sample)(state, {"image": images[0]}, None))
  assert recon.shape == images[0].shape and np.isfinite(recon).all() and recon.std() > 0
