"""The notebook API (`ldm_jax.load_run`, `sample_images`, `first_stage`, `encode`,
`decode`, `load_first_stage`) on tiny random checkpoints: the same images and
latents as the lower-level calls and the CLI, deterministic by seed."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import ldm_jax
from ldm_jax import checkpoint, config_lib, parallel, sampling, storage
from ldm_jax.training.autoencoder import AutoencoderTask
from ldm_jax.training.first_stage import model_variables
from tests.test_sampling import _save_untrained, load_config

PROMPT = "a large red circle in the centre on a blue background"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run's workdir with an untrained stage-2 checkpoint in ldm/checkpoints."""
  wd = tmp_path_factory.mktemp("run")
  _save_untrained(load_config("txt2img"), str(wd / "ldm" / "checkpoints"))
  return str(wd)


@pytest.fixture(scope="module")
def model(workdir):
  return ldm_jax.load_run(workdir)


def test_import_is_light():
  code = "import sys, ldm_jax; assert 'jax' not in sys.modules; print(ldm_jax.__all__)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__)))))
  assert out.returncode == 0, out.stderr
  assert "load_run" in out.stdout


def test_sample_images_matches_the_cli_and_is_seeded(model, tmp_path):
  steps = 2
  a = ldm_jax.sample_images(model, PROMPT, num=2, seed=3, steps=steps)
  assert a.shape == (2, 32, 32, 3) and a.dtype == np.uint8
  np.testing.assert_array_equal(a, ldm_jax.sample_images(model, [PROMPT], num=2, seed=3,
                                                         steps=steps))
  assert np.abs(a.astype(int) - ldm_jax.sample_images(model, PROMPT, num=2, seed=4,
                                                      steps=steps)).mean() > 1
  # What `python -m ldm_jax.sample` writes for the same request.
  req = sampling.Request(prompts=[PROMPT], num=2, seed=3, steps=steps)
  sampling.run("run", req, str(tmp_path / "cli"), loader=lambda: tuple(model))
  for i in range(2):
    png = np.asarray(Image.open(tmp_path / "cli" / f"{i:05d}.png"))
    np.testing.assert_array_equal(a[i], png)


def test_load_run_and_bad_requests(model, workdir):
  same = ldm_jax.load_run(os.path.join(workdir, "ldm", "checkpoints"))  # the folder itself
  assert same.config.to_dict() == model.config.to_dict()
  # No steps given: the config's (as `python -m ldm_jax.sample` without --steps).
  _, meta = sampling.build_batch(model.task, model.config, sampling.Request(prompts=[PROMPT]))
  sampling.check_request(sampling.Request(prompts=[PROMPT]))
  assert meta[0]["steps"] == model.config.stage2.sample.steps
  with pytest.raises(ValueError, match="text-to-image"):
    ldm_jax.sample_images(model, None)
  with pytest.raises(ValueError, match="--num=0"):
    ldm_jax.sample_images(model, PROMPT, num=0)
  with pytest.raises(ValueError, match="no checkpoint folder"):
    ldm_jax.load_run(os.path.join(workdir, "nowhere"))
  with pytest.raises(ValueError, match="not a stage-1"):
    ldm_jax.load_first_stage(os.path.join(workdir, "ldm", "checkpoints"))


def test_first_stage_of_a_model_encodes_and_decodes_as_the_task(model):
  task, state, _, _ = model
  first = ldm_jax.first_stage(model)
  scale = float(state["scale_factor"])
  assert first.scale_factor == scale and first.factor == task.first.factor
  x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), np.uint8)
  z = ldm_jax.encode(first, x)
  assert z.shape == (2, 32 // first.factor, 32 // first.factor, first.z_channels)
  variables = state["frozen"]["first_stage"]
  ref = scale * np.asarray(jax.jit(task.first.encode)(variables, x / 127.5 - 1.0, None))
  np.testing.assert_allclose(z, ref, rtol=1e-5, atol=1e-5)
  back = ldm_jax.decode(first, z)
  ref_x = np.asarray(jax.jit(task.first.decode)(variables, ref / scale))
  assert back.dtype == np.uint8 and back.shape == x.shape
  assert np.abs(back.astype(int) - np.round((ref_x + 1) * 127.5)).max() <= 1
  # Floats in [-1, 1] are the same images as their uint8.
  np.testing.assert_allclose(ldm_jax.encode(first, x / 127.5 - 1.0), z, rtol=1e-5, atol=1e-5)


def test_load_first_stage_of_a_stage1_run(tmp_path):
  """A stage-1 checkpoint with random weights; the scale factor stage 2 measured is read."""
  c1 = config_lib.for_stage(load_config("txt2img"), "stage1")
  task = AutoencoderTask(c1)
  mesh = parallel.make_mesh(c1)
  abstract, _ = parallel.abstract_state(task.init, jax.random.key(0), mesh, parallel.rules_of(c1))
  rng = np.random.default_rng(1)
  fill = lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype) \
      if np.issubdtype(a.dtype, np.floating) and a.ndim else np.zeros(a.shape, a.dtype)
  state = jax.tree.map(lambda a: jax.device_put(fill(a), a.sharding), abstract)
  ck = checkpoint.Checkpointer(str(tmp_path / "autoencoder" / "checkpoints"))
  ck.save(0, state, {}, config_lib.to_dict(c1))
  ck.close()
  first = ldm_jax.load_first_stage(str(tmp_path))
  assert first.scale_factor == 1.0  # stage 2 has not measured it yet
  storage.write_json(str(tmp_path / "autoencoder" / "scale_factor.json"), {"scale_factor": 0.5})
  first = ldm_jax.load_first_stage(str(tmp_path))
  assert first.scale_factor == 0.5
  x = np.random.default_rng(2).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  ref = 0.5 * np.asarray(jax.jit(first.encode)(model_variables(state["params"]), x, None))
  np.testing.assert_allclose(ldm_jax.encode(first, x), ref, rtol=1e-5, atol=1e-5)


def test_load_pretrained_samples_and_exposes_the_sd_vae():
  """A tiny Stable Diffusion folder (tests/sd_fixtures) through the API."""
  pytest.importorskip("diffusers")
  from tests import sd_fixtures
  fx = sd_fixtures.build("sd1")
  model = ldm_jax.load_pretrained(fx["folder"], devices=jax.devices()[:1])
  assert model.config.stage2.sample.guidance == 7.5  # SD pipelines' default
  hw = sd_fixtures.IMAGE
  images = ldm_jax.sample_images(model, "a dog", steps=2, height=hw, width=hw)
  assert images.shape == (1, hw, hw, 3) and images.dtype == np.uint8 and images.std() > 0
  first = ldm_jax.first_stage(model)
  assert first.scale_factor == pytest.approx(float(fx["pipe"].vae.config.scaling_factor))
