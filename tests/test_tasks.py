"""Every stage-2 task config trains a few steps and samples with its own inputs.

The configs are shrunk alike (16 px, a first stage of f = 2, one-level UNets, 2
sampler steps) so that compiling stays cheap; their conditioning is what the
config file sets. Each trains 2 steps of its `LDMTask.update`, jitted with the
loop's shardings on the 8 devices, on batches of its own data pipeline, from
weights drawn on the host (compiling the models' initialisers would cost more
than the steps; the loop's own init, resume and grids are the spine's and the
entry-point test's), and is saved as a checkpoint. Each kind of sampling input
then goes through `python -m ldm_jax.sample` once (--label, --lowres,
--init_image/--mask, --layout); the unconditional and the hybrid (text +
inpainting) models sample through the same `sampling.run` in-process. txt2img is
the entry-point test's (tests/test_entrypoints.py).
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from ldm_jax import checkpoint, config_lib, data, parallel, sampling
from ldm_jax.data import shapes
from ldm_jax.training.ldm import LDMTask
from tests import host_init
from tests.test_configs import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RES = 16
STEPS = 2


def shrink(c, tmp, **fields):
  """The same small shapes for every task; the conditioning stays the config's."""
  c = c.unlock()
  c.data.update(resolution=RES, cache_dir=str(tmp / "cache"))
  c.data.shapes.update(num=64, shard_size=64)
  c.stage1.update(image_size=RES, f=2)
  c.stage1.loss.disc_layers = 2
  c.stage1.model.update(ch=8, ch_mult=(1, 2), norm_groups=4, resolution=RES)
  s = c.stage2
  s.update(batch_size=8, total_steps=STEPS, scale_factor=1.0, latent_cache=False)
  text = s.conditioning.context == "text"  # cross-attention only where there is a context
  s.unet.update(model_channels=16, channel_mult=(1,), num_res_blocks=1, num_heads=2,
                attention_resolutions=(1,) if text else (), num_head_channels=-1,
                norm_num_groups=8)
  s.sample.steps = 2
  c.update(fields)
  return config_lib.for_stage(c.lock(), "stage2")


def _train(name, arg, tmp_path, **fields):
  """STEPS updates of the task on its data; returns (config, workdir, result)."""
  c2 = shrink(load(name, arg), tmp_path, **fields)
  task = LDMTask(c2)
  mesh, rules = parallel.make_mesh(c2), parallel.rules_of(c2)
  abstract, shardings = parallel.abstract_state(task.init, jax.random.key(0), mesh, rules)
  state, p0 = host_init.state(abstract, shardings)
  it = data.make_iterator(c2.data, batch_size=c2.batch_size, seed=c2.seed)
  first = next(it)
  # the periodic grids' batch has the task's inputs and its size (unconditional too)
  grid = task.prepare_batch(task.cond.fixed_batch(8, first))
  assert task.cond.batch_size(grid) == 8
  update = jax.jit(task.update, in_shardings=(shardings, parallel.batch_sharding(mesh), None),
                   out_shardings=(shardings, None))
  losses, host = [], first
  with parallel.activate(mesh, rules):
    for i in range(STEPS):
      state, m = update(state, parallel.global_batch(task.prepare_batch(host), mesh),
                        jax.random.key(i))
      losses.append(float(m["loss"]))
      host = next(it)
  assert np.isfinite(losses).all(), losses
  wd = tmp_path / "run"
  ck = checkpoint.Checkpointer(str(wd / "ldm" / "checkpoints"))
  ck.save(STEPS, state, it.get_state(), config_lib.to_dict(c2))
  ck.close()
  return c2, str(wd), dict(state=state, p0=p0, losses=losses, task=task, mesh=mesh)


@pytest.fixture(scope="module")
def class_cond(tmp_path_factory):
  """The class-conditional run, in float32; the bfloat16 and EMA tests read it too."""
  return _train("class_cond", None, tmp_path_factory.mktemp("class_cond"))


def _cli(workdir, out, *flags):
  r = subprocess.run([sys.executable, "-m", "ldm_jax.sample", f"--workdir={workdir}",
                      f"--out={out}", "--num=2", *flags], cwd=ROOT, capture_output=True,
                     text=True, timeout=600)
  assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


def _outputs(out, n):
  metas = [json.load(open(os.path.join(out, f"{i:05d}.json"))) for i in range(n)]
  images = np.stack([np.asarray(Image.open(os.path.join(out, f"{i:05d}.png"))) for i in range(n)])
  assert images.shape == (n, RES, RES, 3) and images.std() > 0
  assert os.path.isfile(os.path.join(out, "grid.png"))
  assert not os.path.exists(os.path.join(out, f"{n:05d}.png"))
  assert all(m["steps"] == 2 for m in metas)  # the config's stage2.sample.steps
  return metas, images


def _image(path, hw, mode="RGB"):
  a = np.random.default_rng(1).integers(0, 256, hw + ((3,) if mode == "RGB" else ()), np.uint8)
  Image.fromarray(a, mode).save(path)
  return str(path)


def test_class_cond(tmp_path, class_cond):
  _, wd, _ = class_cond
  out = str(tmp_path / "s")
  _cli(wd, out, "--label=1", "--label=3")
  metas, _ = _outputs(out, 4)
  assert [m["label"] for m in metas] == [1, 1, 3, 3]
  assert metas[0]["timestep_spacing"] == "leading"  # the config's 'auto' on this schedule


def test_ema_after_two_steps_is_the_warm_up_closed_form(class_cond):
  """ema_t+1 = d_t ema_t + (1 - d_t) p_t+1 with d_t = min(decay, (1 + t) / (10 + t)),
  ema_0 = p_0. The warm-up's lr is 0 at the first step, so p_1 = p_0, and after two
  steps ema = d_1 p_0 + (1 - d_1) p_2 with d_1 = 2/11, in every leaf."""
  c2, _, res = class_cond
  assert c2.stage2.warmup_steps > 0 and c2.stage2.ema_decay > 2 / 11
  state = jax.device_get(res["state"])
  moved = []
  for e, p, p0 in zip(*(jax.tree.leaves(t) for t in (state["ema"], state["params"], res["p0"]))):
    np.testing.assert_allclose(e, 2 / 11 * p0 + 9 / 11 * p, rtol=1e-5, atol=1e-7)
    moved.append(not np.allclose(p, p0))
  assert any(moved)  # the second step changed the weights


def test_bfloat16_trains_and_samples_like_float32(tmp_path, class_cond):
  """config.dtype=bfloat16 through stage-2 updates and sampling: the losses of the
  same steps from the same weights on the same data are float32's within bf16's
  precision, the master weights stay float32, the samples are finite."""
  _, _, res32 = class_cond
  c2, _, res16 = _train("class_cond", None, tmp_path, dtype="bfloat16")
  assert res16["task"].unet.dtype == np.dtype("bfloat16")
  np.testing.assert_allclose(res16["losses"], res32["losses"], rtol=3e-2)
  assert {a.dtype for a in jax.tree.leaves(res16["state"]["params"])} == {np.dtype("float32")}
  task = res16["task"]
  batch, _ = sampling.build_batch(task, c2, sampling.Request(labels=[0, 2], num=4))
  images = sampling.generate(task, res16["state"], res16["mesh"], c2, batch)
  assert images.shape == (8, RES, RES, 3) and np.isfinite(images).all() and images.std() > 0


def test_super_resolution(tmp_path):
  c, wd, _ = _train("super_resolution", None, tmp_path)
  low = _image(tmp_path / "low.png", (RES // c.stage2.conditioning.lowres_factor,) * 2)
  out = str(tmp_path / "s")
  _cli(wd, out, f"--lowres={low}")
  metas, _ = _outputs(out, 2)
  assert metas[0]["lowres"] == low


def test_inpainting(tmp_path):
  _, wd, _ = _train("inpainting", None, tmp_path)
  init, mask = _image(tmp_path / "x.png", (RES, RES)), tmp_path / "m.png"
  m = np.zeros((RES, RES), np.uint8)
  m[4:12, 4:12] = 255  # white = repaint
  Image.fromarray(m, "L").save(mask)
  out = str(tmp_path / "s")
  _cli(wd, out, f"--init_image={init}", f"--mask={mask}")
  metas, _ = _outputs(out, 2)
  assert metas[0]["mask"] == str(mask) and metas[0]["init_image"] == init


def test_layout(tmp_path):
  _, wd, _ = _train("layout", None, tmp_path)
  lay = tmp_path / "map.png"
  Image.fromarray(shapes.layout_map(shapes.sample_attrs(0, 0), RES)).save(lay)
  out = str(tmp_path / "s")
  _cli(wd, out, f"--layout={lay}", "--timestep-spacing=trailing")
  metas, _ = _outputs(out, 2)
  assert metas[0]["layout"] == str(lay) and metas[0]["timestep_spacing"] == "trailing"


def test_unconditional(tmp_path):
  _, wd, _ = _train("unconditional", None, tmp_path)
  out = str(tmp_path / "s")
  sampling.run(os.path.join(wd, "ldm", "checkpoints"), sampling.Request(num=3), out)
  _outputs(out, 3)


def test_hybrid_text_and_inpainting(tmp_path):
  """Cross-attention on a prompt and the inpainting concat (SD 2 inpainting's pair),
  with a negative prompt per prompt."""
  c, wd, _ = _train("inpainting", "text=1", tmp_path)
  assert c.stage2.conditioning.context == "text" and c.stage2.conditioning.concat == "inpaint"
  init = _image(tmp_path / "x.png", (RES, RES))
  mask = _image(tmp_path / "m.png", (RES, RES), "L")
  out = str(tmp_path / "s")
  req = sampling.Request(prompts=["a red circle", "a blue square"], negative=["blurry", "dark"],
                         num=1, init_image=init, mask=mask)
  sampling.run(os.path.join(wd, "ldm", "checkpoints"), req, out)
  metas, _ = _outputs(out, 2)
  assert [(m["prompt"], m["negative_prompt"]) for m in metas] == [
      ("a red circle", "blurry"), ("a blue square", "dark")]
