"""Stage 2 on the spine: 8 devices train like 1, and bad stage-2 configs fail by name."""
import flax.linen as nn
import jax
import numpy as np
import pytest

from ldm_jax import config_lib, data
from ldm_jax.training import loop
from ldm_jax.training.ldm import LDMTask
from tests.test_configs import load


def _config(tmp_path, **kw):
  c = load("txt2img").unlock()
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.shapes.num = 64
  c.data.shapes.shard_size = 16
  c.stage2.batch_size = 16
  c.stage2.total_steps = 3
  c.log_every = 1
  c.ckpt_every = 100
  c.sample_every = 0
  for k, v in kw.items():
    c[k] = v
  return config_lib.for_stage(c, "stage2")


def _make_data(c):
  def make(state, per_process):
    it = data.make_iterator(c.data, batch_size=per_process, seed=c.seed)
    if state:
      it.set_state(state)
    return it
  return make


def test_eight_devices_train_like_one(tmp_path):
  runs = {}
  for name, mesh, devices in [("one", [("data", 1), ("fsdp", 1), ("tensor", 1)], jax.devices()[:1]),
                              ("eight", [("data", 2), ("fsdp", 4), ("tensor", 1)], None)]:
    c = _config(tmp_path, mesh=mesh)
    runs[name] = loop.run(LDMTask(c), c, str(tmp_path / name), _make_data(c), devices=devices)
  losses = {k: [m["loss"] for _, m in r["logged"]] for k, r in runs.items()}
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-4)
  a, b = (jax.device_get(runs[k]["state"]["params"]) for k in ("one", "eight"))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-5), a, b)


def test_context_dim_mismatch_is_named(tmp_path):
  c = _config(tmp_path).unlock()
  c.stage2.unet.context_dim = 32
  with pytest.raises(ValueError, match="context_dim"):
    LDMTask(c)


def test_resolution_not_divisible_by_f(tmp_path):
  c = _config(tmp_path).unlock()
  c.data.resolution = 30
  with pytest.raises(ValueError, match="resolution"):
    LDMTask(c)


def test_unknown_conditioning_is_named(tmp_path):
  c = _config(tmp_path).unlock()
  c.stage2.conditioning.concat = "depth"
  with pytest.raises(ValueError, match="conditioning.concat"):
    LDMTask(c)


def test_pooled_text_and_patched_unet_train_and_sample(tmp_path):
  # conditioning.pooled adds mean-pooled tau(y) to the time embedding through the
  # UNet's adm input; unet.patch_size=2 runs it on 2x2 latent patches.
  c = _config(tmp_path, mesh=[("data", 1), ("fsdp", 1), ("tensor", 1)]).unlock()
  c.stage2.conditioning.pooled = True
  c.stage2.unet.patch_size = 2
  task = LDMTask(c)
  width = task.cond.text_model.width
  assert task.unet.num_classes == "continuous" and task.unet.adm_in_channels == width
  run = loop.run(task, c, str(tmp_path / "run"), _make_data(c), devices=jax.devices()[:1])
  state = jax.device_get(run["state"])
  assert all(np.isfinite(m["loss"]) for _, m in run["logged"])
  # the pooled path was trained: its first layer moved from its initial value
  fresh = nn.unbox(task.init(jax.random.key(c.seed)))
  moved = lambda p: p["params"]["unet"]["params"]["class_embedding"]["linear_1"]["kernel"]
  assert not np.allclose(moved(state), moved(fresh))
  batch = task.prepare_batch(task.cond.fixed_batch(2))
  cond = task.cond.encode(state["params"].get("cond"), None, batch, None, drop_prob=0.0,
                          frozen_first=None, scale_factor=1.0)
  np.testing.assert_allclose(cond["y"], cond["context"].mean(1), rtol=1e-6)
  null = task.cond.null(state["params"].get("cond"), None, cond)
  assert null["y"].shape == cond["y"].shape and not np.allclose(null["y"], cond["y"])
  images = task.sample(state, batch, jax.random.key(0), steps=2)
  assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_pooled_text_needs_text_and_no_classes(tmp_path):
  c = load("class_cond").unlock()
  c.stage2.conditioning.pooled = True
  with pytest.raises(ValueError, match="conditioning.pooled"):
    LDMTask(config_lib.for_stage(c, "stage2"))
