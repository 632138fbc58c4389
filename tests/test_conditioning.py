"""Stage-2 conditioning and sampling requests: classifier-free dropout, negative
prompts, SD's inpainting input, the EMA warm-up, timestep spacing and its
validation, grids -- on the real Conditioner / LDMTask / sampling.build_batch."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ldm_jax import config_lib, parallel, sampling
from ldm_jax.diffusion import samplers
from ldm_jax.training import conditioning
from ldm_jax.training.first_stage import FirstStage
from ldm_jax.training.ldm import LDMTask, ema_update, timestep_spacing
from ldm_jax.training.run import train_and_evaluate
from tests.test_configs import load


def _stage2(name, arg=None, **fields):
  c = load(name, arg).unlock()
  for k, v in fields.items():
    target = c
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return config_lib.for_stage(c.lock(), "stage2")


def _cond(c2):
  return conditioning.Conditioner.from_config(c2, FirstStage.from_config(c2))


def _random(shapes, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: (0.2 * rng.standard_normal(a.shape)).astype(a.dtype),
                      parallel.unbox(shapes))


def test_class_dropout_rate_and_null_class():
  cond = _cond(_stage2("class_cond"))
  n, p = 4000, 0.1
  labels = np.arange(n) % cond.classes
  y = np.asarray(cond.encode(None, None, {"label": labels}, jax.random.key(0), drop_prob=p,
                             frozen_first=None, scale_factor=1.0)["y"])
  dropped = y == cond.classes  # the null class, the one guidance's unconditional half uses
  assert abs(dropped.mean() - p) < 0.02  # binomial std 0.005
  np.testing.assert_array_equal(y[~dropped], labels[~dropped])
  null = cond.null(None, None, {"y": jnp.asarray(labels[:3])})
  np.testing.assert_array_equal(null["y"], [cond.classes] * 3)


def test_text_dropout_substitutes_the_empty_prompt():
  cond = _cond(_stage2("txt2img"))
  params = _random(jax.eval_shape(cond.init, jax.random.key(0))[0])
  prompts = [f"a {c} circle at the {p}" for c in ("red", "green", "blue", "white")
             for p in ("top", "bottom", "left", "right")] * 16
  tokens = cond.tokenizer(prompts)
  encode = jax.jit(lambda p, t, r, q: cond.encode(p, None, {"tokens": t}, r, drop_prob=q,
                                                  frozen_first=None, scale_factor=1.0)["context"],
                   static_argnums=3)
  ctx = np.asarray(encode(params, tokens, jax.random.key(1), 0.5))
  full = np.asarray(encode(params, tokens, None, 0.0))
  null = np.asarray(jax.jit(lambda p: cond.null(p, None, {"context": full})["context"])(params))
  is_null = np.array([np.allclose(c, z, atol=1e-5) for c, z in zip(ctx, null)])
  is_full = np.array([np.allclose(c, f, atol=1e-5) for c, f in zip(ctx, full)])
  assert np.all(is_null ^ is_full)  # each row is exactly one of the two
  assert abs(is_null.mean() - 0.5) < 0.12  # 256 rows: binomial std 0.03


def test_negative_prompts_are_the_unconditional_half():
  c2 = _stage2("txt2img")
  task = LDMTask(c2)
  cond = task.cond
  params = _random(jax.eval_shape(cond.init, jax.random.key(0))[0])
  req = sampling.Request(prompts=["a red circle", "a blue star"], negative=["green", "white"],
                         num=2, steps=2)
  batch, meta = sampling.build_batch(task, c2, req)
  np.testing.assert_array_equal(batch["negative"],
                                cond.tokenizer(["green", "green", "white", "white"]))
  assert [m["negative_prompt"] for m in meta] == ["green", "green", "white", "white"]
  run = jax.jit(lambda p, t, neg: cond.null(p, None, {"context": t}, neg)["context"])
  dummy = jnp.zeros((4, cond.tokenizer.max_length, cond.text_model.width))
  with_neg = run(params, dummy, batch["negative"])
  np.testing.assert_allclose(with_neg, cond.text_model.apply(params, batch["negative"]),
                             atol=1e-5)
  assert not np.allclose(with_neg, run(params, dummy, None), atol=1e-3)
  with pytest.raises(ValueError, match="negative_prompt"):
    sampling.build_batch(task, c2, sampling.Request(prompts=["a", "b", "c"], negative=["x", "y"]))


def test_inpainting_input_is_stable_diffusions():
  """z_t, then the mask (1 = repaint), then the latent of the image with the hole
  blanked: diffusers' 9-channel order; SD 2 inpainting's preset is 512 px, eps."""
  sd2 = load("inpainting", "size=sd2")
  assert (sd2.data.resolution, sd2.stage1.image_size) == (512, 512)
  assert sd2.stage2.prediction_type == "eps" and not sd2.stage2.schedule.zero_terminal_snr
  first = FirstStage.from_config(config_lib.for_stage(sd2, "stage2"))
  c = sd2.stage2.conditioning
  sd2_cond = conditioning.Conditioner(c.context, c.classes, c.concat, None, None, False, first,
                                      (), c.lowres_factor)
  assert first.z_channels + sd2_cond.concat_channels == 9 and c.context == "text"

  c2 = _stage2("inpainting")
  cond = _cond(c2)
  variables = _random(jax.eval_shape(cond.first.init, jax.random.key(0)))
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  mask = np.zeros((2, 32, 32, 1), np.float32)
  mask[:, 8:24, 4:20] = 1.0
  z_t = np.random.default_rng(2).standard_normal((2, 8, 8, cond.first.z_channels))
  join = jax.jit(lambda v, b: cond.join(z_t.astype(np.float32), cond.encode(
      None, None, b, None, drop_prob=0.0, frozen_first=v, scale_factor=0.5)))
  got = np.asarray(join(variables, {"image": x, "mask": mask}))
  zc = cond.first.z_channels
  assert got.shape[-1] == 2 * zc + 1
  np.testing.assert_allclose(got[..., :zc], z_t, rtol=1e-6)
  np.testing.assert_allclose(got[..., zc:zc + 1], conditioning._resize(mask, (8, 8)), atol=1e-6)
  assert got[0, 4, 2, zc] == 1.0 and got[0, 0, 7, zc] == 0.0  # inside / outside the hole
  blanked = jax.jit(lambda v: 0.5 * cond.first.encode(v, x * (1 - mask), None))(variables)
  np.testing.assert_allclose(got[..., zc + 1:], blanked, rtol=1e-5, atol=1e-6)
  # training masks follow the same convention: one box to repaint per image
  boxes = np.asarray(conditioning.random_masks(jax.random.key(3), 64, (32, 32)))
  area = boxes.mean((1, 2, 3))
  assert np.all((area >= 1 / 16 - 0.05) & (area <= 9 / 16 + 0.05))
  rows, cols = boxes.max(2)[..., 0], boxes.max(1)[..., 0]  # a box: its area is rows x cols
  np.testing.assert_array_equal(boxes.sum((1, 2, 3)), rows.sum(1) * cols.sum(1))


def test_sample_mask_flag_is_white_to_repaint(tmp_path):
  c2 = _stage2("inpainting")
  task = LDMTask(c2)
  Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(tmp_path / "x.png")
  m = np.zeros((32, 32), np.uint8)
  m[:, 16:] = 255
  Image.fromarray(m, "L").save(tmp_path / "m.png")
  batch, _ = sampling.build_batch(task, c2, sampling.Request(
      init_image=str(tmp_path / "x.png"), mask=str(tmp_path / "m.png"), num=2))
  assert batch["mask"].shape == (2, 32, 32, 1)
  assert np.all(batch["mask"][:, :, 16:] == 1) and np.all(batch["mask"][:, :, :16] == 0)


def test_ema_warm_up_closed_form():
  """With the weights held at p after p_0, ema_k = P_k p_0 + (1 - P_k) p where P_k is
  the product of the decays: prod_{t<k} (1 + t) / (10 + t) = 1 / C(k + 9, 9) during the
  warm-up, and each decay capped at `decay` after it."""
  p0, p = jnp.asarray([1.0, -2.0]), jnp.asarray([3.0, 5.0])
  for decay, k in ((0.9999, 7), (0.5, 20)):
    ema = p0
    for t in range(k):
      ema = ema_update(ema, p, decay, jnp.asarray(t))
    P = math.prod(min(decay, (1 + t) / (10 + t)) for t in range(k))
    if decay > 0.99:
      assert P == pytest.approx(1 / math.comb(k + 9, 9))
    np.testing.assert_allclose(ema, P * p0 + (1 - P) * p, rtol=1e-6)


def test_timestep_spacing_follows_the_schedule_and_eps_with_zero_snr_fails(tmp_path):
  assert timestep_spacing(_stage2("txt2img").stage2) == "leading"
  ztsnr = _stage2("txt2img", **{"stage2.schedule.zero_terminal_snr": True})
  assert ztsnr.stage2.prediction_type == "v" and timestep_spacing(ztsnr.stage2) == "trailing"
  assert LDMTask(ztsnr) is not None
  eps = load("txt2img").unlock()
  eps.stage2.schedule.zero_terminal_snr = True
  eps.stage2.prediction_type = "eps"
  # named before anything trains: stage 1 would otherwise run first
  with pytest.raises(ValueError, match=r"stage2\.prediction_type.*stage2\.schedule\.zero_terminal_snr"):
    train_and_evaluate(eps.lock(), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "autoencoder").exists()
  with pytest.raises(ValueError, match="sample.timestep_spacing"):
    LDMTask(_stage2("txt2img", **{"stage2.sample.timestep_spacing": "uniform"}))
  sd = load("txt2img", "size=sd15").stage2.sample
  assert timestep_spacing(load("txt2img", "size=sd15").stage2) == "leading" and sd.steps_offset == 1


def test_request_defaults_to_the_config(monkeypatch):
  c2 = _stage2("txt2img", **{"stage2.sample.steps": 7})
  task = LDMTask(c2)
  _, meta = sampling.build_batch(task, c2, sampling.Request(prompts=["a"], num=1))
  assert meta[0]["steps"] == 7 and meta[0]["timestep_spacing"] == "leading"
  assert meta[0]["guidance_interval"] == (0.0, 1.0)
  # a request's interval reaches the sampler (generate's kwargs go to LDMTask.sample)
  seen = {}
  monkeypatch.setattr(sampling, "generate", lambda *a, **kw: seen.update(kw) or np.zeros(1))
  sampling.sample_request(task, None, None, c2, sampling.Request(prompts=["a"], num=1,
                                                                 guidance_interval=(0.2, 0.6)))
  assert seen["interval"] == (0.2, 0.6) and seen["guidance"] == c2.stage2.sample.guidance
  _, meta = sampling.build_batch(task, c2, sampling.Request(prompts=["a"], num=1, steps=3,
                                                            timestep_spacing="trailing"))
  assert meta[0]["steps"] == 3 and meta[0]["timestep_spacing"] == "trailing"
  c2 = _stage2("txt2img", **{"stage2.sample.steps_offset": 1})
  with pytest.raises(ValueError, match="steps_offset"):  # t = 1000 on a 1000-step schedule
    sampling.build_batch(LDMTask(c2), c2, sampling.Request(prompts=["a"], steps=1000))


@pytest.mark.parametrize("n,num,cols", [(5, 1, 3), (8, 1, 3), (4, 4, 2), (16, 4, 4), (8, 4, 4),
                                        (6, 2, 3), (2, 1, 2), (12, 4, 4)])
def test_grid_is_near_square(n, num, cols):
  assert sampling.grid_columns(n, num) == cols


def test_guidance_interval_reaches_the_sampler_and_is_checked(monkeypatch):
  seen, cfg = [], samplers.cfg_model_fn
  monkeypatch.setattr(samplers, "cfg_model_fn",
                      lambda *a, **k: seen.append(a[5:]) or cfg(*a, **k))
  for interval, want in (((0.0, 1.0), None), ((0.25, 0.75), (250.0, 750.0))):
    task = LDMTask(_stage2("txt2img", **{"stage2.sample.guidance_interval": interval}))
    state = jax.eval_shape(task.init, jax.random.key(0))  # traced, not compiled
    batch = task.prepare_batch({"caption": np.array(["a red circle"], object)})
    jax.eval_shape(lambda s, b: task.sample(s, b, jax.random.key(1), steps=2, guidance=3.0),
                   state, batch)
    assert seen.pop() == (want,)
  for bad in ((0.5, 0.25), (0.0, 1.5)):
    with pytest.raises(ValueError, match="sample.guidance_interval"):
      LDMTask(_stage2("txt2img", **{"stage2.sample.guidance_interval": bad}))
