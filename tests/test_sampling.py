"""python -m ldm_jax.sample's machinery: outputs, determinism across device counts,
and clear errors before compiling."""
import importlib.util
import json
import os

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import checkpoint, config_lib, parallel, sampling
from ldm_jax.data import shapes
from ldm_jax.training.ldm import LDMTask
from tests import host_init

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _save_untrained(config, path):
  """A stage-2 checkpoint with random weights (sampling does not care what they are),
  drawn on the host: compiling the models' initialisers would cost far more."""
  c2 = config_lib.for_stage(config, "stage2")
  task = LDMTask(c2)
  mesh = parallel.make_mesh(c2)
  abstract, shardings = parallel.abstract_state(task.init, jax.random.key(0), mesh,
                                                parallel.rules_of(c2))
  state, _ = host_init.state(abstract, shardings)
  ck = checkpoint.Checkpointer(path)
  ck.save(0, state, {}, config_lib.to_dict(c2))
  ck.close()


@pytest.fixture(scope="module")
def txt2img_ckpt(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("t2i") / "ckpt")
  _save_untrained(load_config("txt2img"), path)
  return path


def test_samples_files_and_same_images_on_any_device_count(txt2img_ckpt, tmp_path):
  req = sampling.Request(prompts=["a large red circle in the centre on a blue background"],
                         num=2, steps=3, seed=5)
  paths = sampling.run(txt2img_ckpt, req, str(tmp_path / "a"))
  assert len(paths) == 3 and paths[-1].endswith("grid.png")
  meta = json.load(open(str(tmp_path / "a" / "00001.json")))
  assert meta["prompt"].startswith("a large red") and meta["steps"] == 3 and meta["seed"] == 5
  sampling.run(txt2img_ckpt, req, str(tmp_path / "b"), devices=jax.devices()[:1])
  for i in range(2):
    a = np.asarray(Image.open(str(tmp_path / "a" / f"{i:05d}.png")), np.int32)
    b = np.asarray(Image.open(str(tmp_path / "b" / f"{i:05d}.png")), np.int32)
    assert np.abs(a - b).max() <= 1  # 8 devices vs 1: same seed, same images


@pytest.mark.parametrize("kw,match", [
    (dict(steps=5000), "steps"),
    (dict(prompts=[]), "prompt"),
    (dict(init_image="/nonexistent.png"), "init_image"),
    (dict(height=20), "height"),
    (dict(mask="/m.png"), "mask"),
    (dict(guidance_interval=(0.6, 0.2)), "guidance_interval"),
])
def test_bad_requests_fail_before_compiling(txt2img_ckpt, tmp_path, kw, match):
  req = dict(prompts=["a small red circle at the top on a blue background"], steps=3)
  req.update(kw)
  with pytest.raises(ValueError, match=match):
    sampling.run(txt2img_ckpt, sampling.Request(**req), str(tmp_path / "o"))


def test_wrong_size_init_image(txt2img_ckpt, tmp_path):
  Image.new("RGB", (17, 17)).save(tmp_path / "x.png")
  Image.new("L", (32, 32)).save(tmp_path / "g.png")
  base = dict(prompts=["a"], steps=3)
  with pytest.raises(ValueError, match="17x17"):
    sampling.run(txt2img_ckpt, sampling.Request(init_image=str(tmp_path / "x.png"), **base),
                 str(tmp_path / "o"))
  with pytest.raises(ValueError, match="mode L"):
    sampling.run(txt2img_ckpt, sampling.Request(init_image=str(tmp_path / "g.png"), **base),
                 str(tmp_path / "o"))


def test_unwritable_out_and_not_a_stage2_checkpoint(txt2img_ckpt, tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(ValueError, match="not writable"):
    sampling.run(txt2img_ckpt, sampling.Request(prompts=["a"]), str(tmp_path / "f" / "o"))
  with pytest.raises(ValueError, match="no checkpoint"):
    sampling.run(str(tmp_path / "nothing"), sampling.Request(prompts=["a"]), str(tmp_path / "o"))
  # a stage-1 checkpoint is not a stage-2 model
  ck = checkpoint.Checkpointer(str(tmp_path / "ae"))
  ck.save(0, {"x": np.zeros(2)}, {}, {"stages": ["autoencoder"], "stage1": {}})
  ck.close()
  with pytest.raises(ValueError, match="not a stage-2"):
    sampling.run(str(tmp_path / "ae"), sampling.Request(prompts=["a"]), str(tmp_path / "o"))


def test_guidance_of_unconditional_model_is_refused(tmp_path):
  path = str(tmp_path / "ckpt")
  _save_untrained(load_config("unconditional"), path)
  with pytest.raises(ValueError, match="unconditional"):
    sampling.run(path, sampling.Request(guidance=3.0, steps=3), str(tmp_path / "o"))
  with pytest.raises(ValueError, match="no text prompt"):
    sampling.run(path, sampling.Request(prompts=["a cat"], steps=3), str(tmp_path / "o"))


def test_img2img_strength_zero_returns_the_reconstruction(txt2img_ckpt, tmp_path):
  task, state, mesh, config = sampling.load(txt2img_ckpt)
  x = np.random.default_rng(0).uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)
  batch = dict(task.prepare_batch({"caption": np.array(["a"], object)}), init_image=x)
  out = sampling.generate(task, state, mesh, config, batch, steps=10, strength=0.0)
  z = state["scale_factor"] * task.first.encode(state["frozen"]["first_stage"], x, None)
  rec = task.first.decode(state["frozen"]["first_stage"], z / state["scale_factor"])
  np.testing.assert_allclose(out, np.asarray(rec), atol=1e-5)


def test_evaluate_prompts_at_strength_zero_scores_the_first_stage_round_trip(txt2img_ckpt,
                                                                           tmp_path):
  from ldm_jax.evaluation import prompts
  r = prompts.evaluate(txt2img_ckpt, num=4, steps=3, guidance=None, sampler="ddim",
                                seed=0, chunk=4, out=str(tmp_path), strength=0.0)
  task, state, mesh, config = sampling.load(txt2img_ckpt)
  attrs, _ = prompts.heldout_prompts(4, 0)
  x = np.stack([shapes.render(a, 32) for a in attrs]).astype(np.float32) / 127.5 - 1.0
  z = task.first.encode(state["frozen"]["first_stage"], x, None)
  rec = np.asarray(task.first.decode(state["frozen"]["first_stage"], z))
  assert r["strength"] == 0.0
  names = lambda preds: [[p[k] for k in shapes.ATTRIBUTES] for p in preds]
  assert names(r["predicted"]) == names(prompts.score(attrs, rec)["predicted"])
  with pytest.raises(ValueError, match="strength"):
    prompts.evaluate(txt2img_ckpt, num=4, steps=3, guidance=None, sampler="ddim",
                              seed=0, chunk=4, out=str(tmp_path), strength=1.5)


def test_layout_model_samples_from_a_map(tmp_path):
  path = str(tmp_path / "ckpt")
  _save_untrained(load_config("layout"), path)
  with pytest.raises(ValueError, match="--layout"):
    sampling.run(path, sampling.Request(steps=2), str(tmp_path / "o"))
  Image.fromarray(shapes.layout_map(shapes.sample_attrs(0, 0), 32)).save(tmp_path / "m.png")
  paths = sampling.run(path, sampling.Request(layout=str(tmp_path / "m.png"), num=2, steps=2),
                       str(tmp_path / "o"))
  assert len(paths) == 3
  assert json.load(open(str(tmp_path / "o" / "00000.json")))["layout"].endswith("m.png")
