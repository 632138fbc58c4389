"""Stage 2's latent cache on 8 devices: one pass encoded exactly, posterior std kept,
reused when complete, stage 2 trains from it, and configs it cannot serve fail by name."""
import glob
import io
import os

import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import config_lib, data, parallel
from ldm_jax.data import shards
from ldm_jax.training import latent_cache, loop, run
from ldm_jax.training.ldm import LDMTask
from tests import host_init, ports
from tests.test_configs import load


def _config(tmp_path, **stage1):
  c = load("txt2img").unlock()
  c.data.cache_dir = str(tmp_path / "cache")
  c.data.shapes.num = 60            # not a multiple of the batch: the last one is padded
  c.data.shapes.shard_size = 16
  c.stage2.batch_size = 16
  c.stage2.total_steps = 2
  c.stage2.latent_cache = True
  c.mesh = [("data", 2), ("fsdp", 4), ("tensor", 1)]
  c.log_every = 1
  c.sample_every = 0
  c.num_samples = 0  # no sample grid: a sampler compile this test does not read
  for k, v in stage1.items():
    c.stage1[k] = v
  return config_lib.for_stage(c, "stage2")


SOURCE = {"stage1_step": 7, "stage1_config": "abc"}


def _cached(out_dir, pattern="latents-p*.tar"):
  """(latent, std or None, caption) of every cached sample, in write order."""
  got = []
  for url in sorted(glob.glob(os.path.join(out_dir, pattern))):
    for s in shards.iter_samples(url):
      std = np.load(io.BytesIO(s["std.npy"])) if "std.npy" in s else None
      got.append((np.load(io.BytesIO(s["npy"])), std, s["txt"].decode()))
  return got


def _build(c, tmp_path, out=None):
  task = LDMTask(c)
  mesh = parallel.make_mesh(c)
  variables = task.first.init(jax.random.key(1))
  moments = jax.jit(task.first.moments, out_shardings=parallel.batch_sharding(mesh))
  out = out or str(tmp_path / "latents")
  pattern = latent_cache.build(c, lambda x: moments(variables, x), mesh, out, batch_size=16,
                               source=SOURCE)
  return task, variables, out, pattern


@pytest.mark.parametrize("sample_posterior", [False, True])
def test_cache_holds_one_pass_encoded(tmp_path, sample_posterior):
  c = _config(tmp_path, sample_posterior=sample_posterior)
  task, variables, out, pattern = _build(c, tmp_path)
  it = data.make_iterator(c.data, batch_size=4, seed=c.seed)
  examples = list(it.one_epoch())
  assert len(examples) == 60
  got = _cached(out)
  assert [g[2] for g in got] == [e["caption"] for e in examples]
  mean, std = task.first.moments(variables, np.stack([e["image"] for e in examples]))
  np.testing.assert_allclose(np.stack([g[0] for g in got]), mean, rtol=1e-2, atol=2e-3)
  if sample_posterior:
    np.testing.assert_allclose(np.stack([g[1] for g in got]), std, rtol=1e-2, atol=2e-3)
  else:
    assert std is None and all(g[1] is None for g in got)
  batch = next(data.make_iterator(run._on_latents(c, pattern).data, batch_size=8, seed=0))
  assert batch["latent"].shape == (8, 8, 8, task.unet.in_channels)
  assert ("latent_std" in batch) == sample_posterior


def test_complete_cache_is_reused_and_a_changed_one_rebuilt(tmp_path):
  c = _config(tmp_path)
  _, _, out, pattern = _build(c, tmp_path)
  never = lambda x: (_ for _ in ()).throw(AssertionError("re-encoded a complete cache"))
  mesh = parallel.make_mesh(c)
  assert latent_cache.build(c, never, mesh, out, batch_size=16, source=SOURCE) == pattern
  assert latent_cache.cached_pattern(out, c, dict(SOURCE, stage1_step=8)) == ""
  other = c.unlock()
  other.stage1.loss.kl_weight = 1e-3
  assert latent_cache.cached_pattern(out, other, SOURCE) == ""


def test_cache_at_a_url(tmp_path):
  c = _config(tmp_path)
  _, _, out, pattern = _build(c, tmp_path, out="memory://ldm/latents")
  assert pattern == "memory://ldm/latents/latents-p*.tar"
  assert latent_cache.cached_pattern(out, c, SOURCE) == pattern
  batch = next(data.make_iterator(run._on_latents(c, pattern).data, batch_size=60, seed=0))
  assert batch["latent"].shape[0] == 60


def test_stage2_trains_from_the_cache(tmp_path):
  c = _config(tmp_path)
  _, _, _, pattern = _build(c, tmp_path)
  lc = run._on_latents(c, pattern)

  def make(state, per_process):
    return data.make_iterator(lc.data, batch_size=per_process, seed=c.seed)

  task = LDMTask(c)
  res = loop.run(task, c, str(tmp_path / "ldm"), make, initial_state=host_init.initial_state)
  losses = [m["loss"] for _, m in res["logged"]]
  assert len(losses) == 2 and all(np.isfinite(losses))


@pytest.mark.parametrize("field,value,match", [
    ("data.source", "tfds", "data.source"),
    ("stage2.conditioning.concat", "lowres", "concat"),
])
def test_configs_the_cache_cannot_serve_fail_by_name(tmp_path, field, value, match):
  c = load("txt2img").unlock()
  c.stage2.latent_cache = True
  *path, name = field.split(".")
  node = c
  for part in path:
    node = node[part]
  node[name] = value
  with pytest.raises(ValueError, match=f"latent_cache.*{match}"):
    run.train_and_evaluate(c, str(tmp_path / "w"))


def pool(x):
  """A stand-in encoder: 4x4 average pooling (32x32x3 -> 8x8x3)."""
  return x.reshape(x.shape[0], 8, 4, 8, 4, 3).mean((2, 4))


def cache_worker_config(workdir):
  """50 images in 5 shards: 3 for one process, 2 for the other (unequal passes)."""
  c = load("txt2img").unlock()
  c.data.cache_dir = os.path.join(workdir, "cache")
  c.data.shapes.num = 50
  c.data.shapes.shard_size = 10
  c.mesh = [("data", -1), ("fsdp", 1), ("tensor", 1)]
  return config_lib.for_stage(c, "stage2")


def test_two_processes_build_one_cache(tmp_path):
  port = ports.free_port()
  worker = os.path.join(os.path.dirname(__file__), "two_process_worker.py")
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(tmp_path), "cache"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
           for i in range(2)]
  logs = [p.communicate(timeout=300)[0].decode() for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(l[-3000:] for l in logs)
  c = cache_worker_config(str(tmp_path))
  out = str(tmp_path / "latents")
  assert latent_cache.cached_pattern(out, c, {})
  for p in range(2):
    it = data.make_iterator(c.data, batch_size=4, process_index=p, process_count=2, seed=c.seed)
    examples = list(it.one_epoch())
    assert len(examples) == (30, 20)[p]
    got = _cached(out, f"latents-p{p:03d}-*.tar")
    assert [g[2] for g in got] == [e["caption"] for e in examples]
    np.testing.assert_allclose(np.stack([g[0] for g in got]),
                               pool(np.stack([e["image"] for e in examples])), atol=2e-3)
