"""Stage 2 on the spine: 8 devices train like 1, and bad stage-2 configs fail by name."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ldm_jax import config_lib, data
from ldm_jax.training import loop
from ldm_jax.training.ldm import LDMTask
from tests import host_init
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
  c.num_samples = 0  # no sample grids: the pooled test samples itself
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
                              ("eight", [("data", 2), ("fsdp", 2), ("tensor", 2)], None)]:
    c = _config(tmp_path, mesh=mesh)
    task = LDMTask(c)
    runs[name] = loop.run(task, c, str(tmp_path / name), _make_data(c), devices=devices,
                          initial_state=host_init.initial_state)
  losses = {k: [m["loss"] for _, m in r["logged"]] for k, r in runs.items()}
  np.testing.assert_allclose(losses["eight"], losses["one"], rtol=1e-4)
  a, b = (jax.device_get(runs[k]["state"]["params"]) for k in ("one", "eight"))
  # atol: Adam's normalised step turns the tensor axis's other summation order on
  # near-zero gradients into differences of a fraction of a step.
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-3, atol=1e-4), a, b)


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
  fresh = {}

  def initial_state(abstract, shardings):
    state, params = host_init.state(abstract, shardings)
    fresh.update(params=params)
    return state
  run = loop.run(task, c, str(tmp_path / "run"), _make_data(c), devices=jax.devices()[:1],
                 initial_state=initial_state)
  state = jax.device_get(run["state"])
  assert all(np.isfinite(m["loss"]) for _, m in run["logged"])
  # the pooled path was trained: its first layer moved from its initial value
  moved = lambda p: p["params"]["unet"]["params"]["class_embedding"]["linear_1"]["kernel"]
  assert not np.allclose(moved(state), moved(fresh))
  batch = task.prepare_batch(task.cond.fixed_batch(2))
  cond = task.cond.encode(state["params"].get("cond"), None, batch, None, drop_prob=0.0,
                          frozen_first=None, scale_factor=1.0)
  np.testing.assert_allclose(cond["y"], cond["context"].mean(1), rtol=1e-6)
  null = task.cond.null(state["params"].get("cond"), None, cond)
  assert null["y"].shape == cond["y"].shape and not np.allclose(null["y"], cond["y"])
  sample = jax.jit(lambda s, b, r: task.sample(s, b, r, steps=2))
  images = sample(state, batch, jax.random.key(0))
  assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()


def test_pooled_text_needs_text_and_no_classes(tmp_path):
  c = load("class_cond").unlock()
  c.stage2.conditioning.pooled = True
  with pytest.raises(ValueError, match="conditioning.pooled"):
    LDMTask(config_lib.for_stage(c, "stage2"))


def test_cast_params_once_changes_the_program_not_the_result(tmp_path):
  # bfloat16: the UNet's kernels cast once before the forward pass instead of at every
  # use. The same casts of the same weights, so a UNet's loss and gradients agree...
  from ldm_jax.models import unet
  from ldm_jax.training.step import cast_kernels
  model = unet.UNetModel(in_channels=4, out_channels=4, model_channels=16, channel_mult=(1,),
                         num_res_blocks=1, attention_resolutions=(1,), num_heads=2,
                         context_dim=8, norm_num_groups=8, dtype=jnp.bfloat16)
  x, t, ctx = jnp.ones((2, 4, 4, 4)), jnp.array([3, 900]), jnp.ones((2, 3, 8))
  shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), x, t, ctx))
  rng = np.random.default_rng(0)  # non-zero everywhere (zero-initialised output layers)
  params = jax.tree.map(lambda a: (0.1 * rng.standard_normal(a.shape)).astype(a.dtype), shapes)
  cast = cast_kernels(params, jnp.bfloat16)
  kernel = cast["params"]["conv_in"]["kernel"]
  assert kernel.dtype == jnp.bfloat16 and cast["params"]["conv_in"]["bias"].dtype == jnp.float32
  loss = lambda p, once: jnp.mean(jnp.square(model.apply(
      cast_kernels(p, jnp.bfloat16) if once else p, x, t, ctx)))
  grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  (l0, g0), (l1, g1) = grad(params, False), grad(params, True)
  np.testing.assert_allclose(l1, l0, rtol=1e-3)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-2, atol=1e-3), g1, g0)
  # ... and stage2.cast_params_once puts the cast into the step's loss: with and without
  # it the same bfloat16 loss, and the UNet sees bfloat16 kernels only with it.
  c = _config(tmp_path, dtype="bfloat16").unlock()
  seen, out = {}, {}

  def spy(next_fun, args, kwargs, context):
    if isinstance(context.module, unet.UNetModel) and context.method_name == "__call__":
      leaves = jax.tree.leaves(context.module.variables["params"])
      seen[once] = {a.dtype for a in leaves if a.ndim >= 2}
    return next_fun(*args, **kwargs)

  for once in (False, True):
    c.stage2.cast_params_once = once
    task = LDMTask(config_lib.for_stage(c.lock(), "stage2"))
    c = c.unlock()
    if not out:  # one state for both: the flag changes the loss's program, not the state
      state, _ = host_init.state(nn.unbox(jax.eval_shape(task.init, jax.random.key(0))))
    host = task.cond.fixed_batch(2)
    host["latent"] = np.random.default_rng(1).standard_normal(  # the same for both
        (2, task.latent_hw, task.latent_hw, task.first.z_channels))
    with nn.intercept_methods(spy):
      out[once] = float(jax.jit(lambda s, b: task._loss(
          s["params"], b, jax.random.key(1), s["frozen"], s["scale_factor"])[0])(
              state, task.prepare_batch(host)))
  assert seen == {False: {jnp.dtype(jnp.float32)}, True: {jnp.dtype(jnp.bfloat16)}}
  np.testing.assert_allclose(out[True], out[False], rtol=1e-2)


def test_a_given_first_stage_is_not_drawn(tmp_path):
  """`run.train_ldm`'s task leaves zeros where it puts the trained first stage; every
  other draw is the one of a task that draws it."""
  from tests.test_tasks import shrink
  c = shrink(load("unconditional"), tmp_path)
  drawn, given = LDMTask(c), LDMTask(c, first_stage_given=True)
  a, b = jax.jit(lambda r: nn.unbox((drawn.init(r), given.init(r))))(jax.random.key(0))
  assert all(not np.any(x) for x in jax.tree.leaves(b["frozen"]["first_stage"]))
  assert all(np.any(x) for x in jax.tree.leaves(a["frozen"]["first_stage"]["params"])
             if x.ndim > 1)
  rest = lambda s: dict(s, frozen={k: v for k, v in s["frozen"].items() if k != "first_stage"})
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, rest(a), rest(b))))
