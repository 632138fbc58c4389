"""Export round trip: Stable Diffusion weights -> an ldm_jax stage-2 checkpoint -> a
diffusers folder and a CompVis single file, which diffusers reads back to the same
UNet / VAE / text-encoder outputs as ldm_jax's modules; and what cannot be exported."""
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from ldm_jax import checkpoint, config_lib, parallel, pretrained
from ldm_jax.pretrained import export, files, stage2
from ldm_jax.training.ldm import LDMTask

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests import sd_fixtures  # noqa: E402  (needs torch and diffusers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _stage2_checkpoint(style: str, path: str):
  """A stage-2 checkpoint of the tiny pipeline whose trained weights and EMA both moved
  away from the pretrained ones (differently), as after fine-tuning.

  Returns (task, host state). sd1 trains its text encoder (params.cond), sd2 keeps it
  frozen (frozen.cond).
  """
  p = pretrained.load(sd_fixtures.build(style)["folder"])
  trainable = style == "sd1"
  config = config_lib.for_stage(stage2.stage2_config(p, text_trainable=trainable), "stage2")
  task = LDMTask(config)
  mesh = parallel.make_mesh(config, jax.devices()[:1])  # a replica per device only costs here
  abstract, shardings = parallel.abstract_state(task.init, jax.random.key(0), mesh,
                                                parallel.rules_of(config))
  pieces = stage2.state_pieces(p, text_trainable=trainable)
  rng = np.random.default_rng(7)
  moved = lambda tree: jax.tree.map(
      lambda w: w + 0.01 * rng.standard_normal(w.shape).astype(np.float32), tree)
  pieces.update(params=moved(pieces["params"]), ema=moved(pieces["params"]))
  keys = ("params", "ema", "frozen", "scale_factor")
  state = stage2.place({k: abstract[k] for k in keys}, {k: shardings[k] for k in keys},
                       {k: pieces[k] for k in keys})
  # Hook: once training reads config.pretrained, the fine-tune steps run here (loop.run
  # from this state on the 8 devices) before the checkpoint is exported.
  state["opt"] = jax.jit(task.tx.init, out_shardings=shardings["opt"])(state["params"])
  state["step"] = jax.device_put(np.zeros((), np.int32), shardings["step"])
  ckpt = checkpoint.Checkpointer(path)
  ckpt.save(0, state, {}, config_lib.to_dict(config))
  ckpt.close()
  return task, jax.device_get({k: state[k] for k in keys})


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
  """style -> (checkpoint path, task, host state), each written once."""
  made = {}

  def get(style):
    if style not in made:
      path = str(tmp_path_factory.mktemp(style) / "ckpt")
      made[style] = (path,) + _stage2_checkpoint(style, path)
    return made[style]
  return get


def _torch(a):
  return torch.from_numpy(np.ascontiguousarray(a))


def _check_outputs(task, state, pipe, trainable: bool):
  """ldm_jax's modules on the exported (EMA) weights vs diffusers' from the export."""
  rng = np.random.default_rng(0)
  ema = state["ema"]
  cond = (ema if trainable else state["frozen"])["cond"]
  ids = task.cond.tokenizer(["a cat", ""])
  ours = task.cond.text_model.apply(cond, ids)
  with torch.no_grad():
    theirs = pipe.text_encoder(_torch(ids).long()).last_hidden_state.numpy()
  np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([5, 901], np.int32)
  ours = jax.jit(task.unet.apply)(ema["unet"], x, t, np.asarray(theirs))  # jit: far cheaper than eager
  with torch.no_grad():
    ref = pipe.unet(_torch(x).permute(0, 3, 1, 2), _torch(t), encoder_hidden_states=_torch(theirs))
  np.testing.assert_allclose(ours, ref.sample.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)
  first = task.first.model
  ours = jax.jit(lambda v, z: first.apply(v, z, method=first.decode))(
      state["frozen"]["first_stage"], x)
  img = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  mean = jax.jit(lambda v, x: first.apply(v, x, method=first.encode).mean)(
      state["frozen"]["first_stage"], img)
  with torch.no_grad():
    dec = pipe.vae.decode(_torch(x).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    enc = pipe.vae.encode(_torch(img).permute(0, 3, 1, 2)).latent_dist.mean
  np.testing.assert_allclose(ours, dec, atol=1e-4, rtol=0)
  np.testing.assert_allclose(mean, enc.permute(0, 2, 3, 1).numpy(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_export_round_trip(style, tmp_path, checkpoints):
  from diffusers.loaders import single_file_utils as sfu
  ckpt, task, state = checkpoints(style)
  trainable = style == "sd1"

  folder = export.export_checkpoint(ckpt, str(tmp_path / "diffusers"))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
  assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
  assert pipe.scheduler.config.prediction_type == ("v_prediction" if style == "sd2" else "epsilon")
  assert (pipe.scheduler.config.steps_offset, pipe.scheduler.config.set_alpha_to_one) == (1, False)
  assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
  _check_outputs(task, state, pipe, trainable)

  # The single file, through the real entry point, with the trained (not EMA) weights.
  single = str(tmp_path / "sd.safetensors")
  run = subprocess.run([sys.executable, "-m", "ldm_jax.export", f"--checkpoint={ckpt}",
                        "--format=single_file", "--noema", f"--out={single}"], cwd=ROOT,
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  from safetensors.torch import load_file
  sd = load_file(single)
  noema = export.describe(task, state, task.config, ema=False)
  unet = sfu.convert_ldm_unet_checkpoint(sd, pipe.unet.config)
  assert set(unet) == set(noema.unet)
  for k, v in noema.unet.items():
    np.testing.assert_array_equal(unet[k].numpy(), v, err_msg=k)
  vae = sfu.convert_ldm_vae_checkpoint(sd, pipe.vae.config)
  for k, v in pipe.vae.state_dict().items():
    np.testing.assert_array_equal(vae[k].numpy(), v.numpy(), err_msg=k)
  text = (sfu.convert_ldm_clip_checkpoint(sd) if style == "sd1"
          else sfu.convert_open_clip_checkpoint(pipe.text_encoder, sd))
  text = {k[len("text_model."):] if k.startswith("text_model.") else k: v for k, v in text.items()}
  assert set(text) == set(noema.text)
  for k, v in noema.text.items():
    np.testing.assert_array_equal(text[k].numpy(), v, err_msg=k)
  # ... and ldm_jax reads it back (configs from the exported folder).
  back = pretrained.load(single, config=folder)
  for name, ref in (("unet", state["params"]["unet"]), ("vae", state["frozen"]["first_stage"])):
    same = jax.tree.map(np.array_equal, back.params[name], ref["params"])
    assert all(jax.tree.leaves(same)), name
  assert back.schedule == dict(task.config.stage2.schedule)


def test_export_dtype_and_existing_output(tmp_path, checkpoints):
  ckpt, task, state = checkpoints("sd2")
  out = export.export_checkpoint(ckpt, str(tmp_path / "half.safetensors"), fmt="single_file",
                                 dtype="float16")
  sd = files.read_weights(out)
  assert sd["model.diffusion_model.out.2.weight"].dtype == np.float16
  want = export.describe(task, state, task.config).unet["conv_out.weight"]
  np.testing.assert_array_equal(sd["model.diffusion_model.out.2.weight"], want.astype(np.float16))
  with pytest.raises(ValueError, match="exists"):
    export.export_checkpoint(ckpt, out, fmt="single_file")
  with pytest.raises(ValueError, match=r"\.safetensors"):
    export.export_checkpoint(ckpt, str(tmp_path / "x.ckpt"), fmt="single_file")


def test_from_scratch_model_is_not_expressible():
  import importlib.util
  spec = importlib.util.spec_from_file_location("t2i", os.path.join(ROOT, "configs", "txt2img.py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  config = mod.get_config("size=tiny").unlock()
  config.stage2.unet.patch_size = 2
  config.stage2.conditioning.pooled = True
  task = LDMTask(config_lib.for_stage(config, "stage2"))
  with pytest.raises(export.NotExpressible) as e:
    export.describe(task, None, task.config)
  msg = str(e.value)
  for reason in ("TextTransformer", "pooled", "patch_size=2"):
    assert reason in msg, msg
  config.stage1.kind = "vq"
  config.stage1.model = dict(config.stage1.model, embed_dim=3, n_embed=16)
  config.stage2.unet.patch_size = 1
  config.stage2.conditioning.pooled = False
  with pytest.raises(export.NotExpressible, match="first stage is a VQ model"):
    export.describe(LDMTask(config_lib.for_stage(config, "stage2")), None, config)
