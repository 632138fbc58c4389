"""Fine-tune and export round trip: Stable Diffusion weights -> 3 fine-tune steps of
`train_and_evaluate` on the 8 CPU devices (`config.pretrained`) -> a diffusers folder
and a CompVis single file, which diffusers reads back to the same UNet / VAE /
text-encoder outputs as ldm_jax's modules; what the fine-tune changed and kept; and
what cannot be exported.

sd1: from the diffusers folder, float32, data-parallel, text encoder trained.
sd2: from the single file (configs from the folder), bfloat16, on a data x fsdp
mesh, on the latent cache, text encoder frozen; through `python -m ldm_jax.train`.
(Training on the tensor axis is test_ldm's eight-device test, checked against one
device.)
"""
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ldm_jax import config_lib, pretrained, sampling
from ldm_jax.pretrained import export, files, finetune
from ldm_jax.training import run
from ldm_jax.training.ldm import LDMTask

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from tests import sd_fixtures  # noqa: E402  (needs torch and diffusers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3


def finetune_config(style: str, data_dir: str):
  """configs/txt2img.py at SD's size, shrunk to 3 steps of a batch of 8 on 64 shapes
  images (written to `data_dir`) with the tiny `style` pipeline; with the fields a
  user would set (as `explicit`)."""
  fx = sd_fixtures.build(style)
  txt2img = config_lib.sibling(os.path.join(ROOT, "configs", "txt2img.py"), "txt2img")
  config = txt2img.get_config("size=sd15" if style == "sd1" else "size=sd2").unlock()
  config.batch_size = config.stage2.batch_size = 8
  config.stage2.total_steps = STEPS
  config.stage2.warmup_steps = 0
  config.stage2.lr = 1e-3  # steps that move the weights well above float32's rounding
  config.log_every, config.num_samples = 1, 8
  config.stage2.sample.steps = 2
  config.data.cache_dir = data_dir
  config.data.shapes.num, config.data.shapes.shard_size = 64, 32  # the latent cache encodes all
  if style == "sd1":
    config.pretrained = fx["folder"]
    config.stage2.text.trainable = True
  else:
    config.pretrained, config.pretrained_config = fx["file"], fx["folder"]
    config.dtype = "bfloat16"
    config.mesh = [("data", 2), ("fsdp", 4), ("tensor", 1)]
    config.stage2.latent_cache = True
    config.num_samples = 0  # no sample grid (the sd1 run draws one)
  explicit = ("pretrained", "pretrained_config", "batch_size", "stage2.batch_size",
              "stage2.total_steps", "stage2.warmup_steps", "stage2.lr", "log_every",
              "num_samples", "stage2.sample.steps", "stage2.text.trainable", "dtype", "mesh",
              "stage2.latent_cache", "num_samples")
  return config, explicit


def _train_command(size: str, config, explicit, workdir: str) -> list:
  """`python -m ldm_jax.train` on configs/txt2img.py:size=`size` with the `explicit`
  fields of `config` and its data settings as flags, on 8 CPU devices."""
  flags = []
  for name in dict.fromkeys(explicit):
    node = config
    for part in name.split("."):
      node = node[part]
    flags.append(f"--config.{name}={node!r}" if isinstance(node, list) else
                 f"--config.{name}={node}")
  return [sys.executable, "-m", "ldm_jax.train", f"--config=configs/txt2img.py:size={size}",
          f"--workdir={workdir}", f"--config.data.cache_dir={config.data.cache_dir}",
          f"--config.data.shapes.num={config.data.shapes.num}",
          f"--config.data.shapes.shard_size={config.data.shapes.shard_size}",
          "--cpu_devices=8"] + flags


def _logged(workdir: str) -> list:
  """[(step, {'loss': ...})] of stage 2's TensorBoard scalars."""
  from tests.test_entrypoints import events
  return [(e.step, {"loss": e.value})
          for e in events(os.path.join(workdir, "ldm", "tensorboard")).Scalars("train/loss")]


def _fine_tune(style: str, workdir: str) -> dict:
  """Runs the fine-tune: {workdir, ckpt, task (float32, of its model), state (host),
  result (`logged` as the loop's), p (the pretrained model it started from), seconds,
  cpu_seconds (of all threads: what a busy machine does not inflate)}.

  sd1 runs in this process; sd2 as a user types it, with XLA's default CPU fusion
  emitters (its bfloat16 update compiles in 58 s with them, 94 s with the older ones
  the suite's small programs compile faster with: tests/conftest.py)."""
  data_dir = os.path.join(os.path.dirname(workdir), "data")
  config, explicit = finetune_config(style, data_dir)
  t0, cpu0 = time.time(), time.process_time()
  child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
  keys = ("params", "ema", "frozen", "scale_factor")
  if style == "sd1":
    result = run.train_and_evaluate(config, workdir, explicit=explicit)["ldm"]
    state = jax.device_get({k: result["state"][k] for k in keys})
  else:
    xla = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if "fusion_emitters" not in f and "device_count" not in f]
    env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS=" ".join(xla))
    out = subprocess.run(_train_command("sd2", config, explicit, workdir), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "fine-tuning" in out.stderr + out.stdout
    _, restored, _, _ = sampling.load(os.path.join(workdir, "ldm", "checkpoints"),
                                      devices=jax.devices()[:1])
    state = jax.device_get({k: restored[k] for k in keys})
    result = dict(logged=_logged(workdir))
  child = resource.getrusage(resource.RUSAGE_CHILDREN)
  seconds = time.time() - t0
  cpu = (time.process_time() - cpu0 + child.ru_utime + child.ru_stime - child0.ru_utime
         - child0.ru_stime)
  resolved, p = finetune.resolve(config, explicit)
  resolved.dtype = "float32"  # the parity checks compare float32 modules
  task = LDMTask(config_lib.for_stage(resolved, "stage2"))
  return dict(workdir=workdir, data_dir=data_dir, ckpt=os.path.join(workdir, "ldm", "checkpoints"),
              task=task, state=state, result=result, p=p, seconds=seconds, cpu_seconds=cpu)


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
  """style -> `_fine_tune`'s dict, each fine-tuned once."""
  made = {}

  def get(style):
    if style not in made:
      made[style] = _fine_tune(style, str(tmp_path_factory.mktemp(style) / "run"))
    return made[style]
  return get


def _torch(a):
  return torch.from_numpy(np.ascontiguousarray(a))


def _check_outputs(task, state, pipe, trainable: bool) -> dict:
  """ldm_jax's modules on the exported (EMA) weights vs diffusers' from the export, each
  to <= 1e-4; returns the max abs differences."""
  err = {}
  close = lambda name, a, b: (err.__setitem__(name, float(np.abs(np.asarray(a) - b).max())),
                              np.testing.assert_allclose(a, b, atol=1e-4, rtol=0, err_msg=name))
  rng = np.random.default_rng(0)
  ema = state["ema"]
  cond = (ema if trainable else state["frozen"])["cond"]
  ids = task.cond.tokenizer(["a cat", ""])
  ours = task.cond.text_model.apply(cond, ids)
  with torch.no_grad():
    theirs = pipe.text_encoder(_torch(ids).long()).last_hidden_state.numpy()
  close("text", ours, theirs)
  x = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
  t = np.array([5, 901], np.int32)
  ours = jax.jit(task.unet.apply)(ema["unet"], x, t, np.asarray(theirs))  # jit: far cheaper than eager
  with torch.no_grad():
    ref = pipe.unet(_torch(x).permute(0, 3, 1, 2), _torch(t), encoder_hidden_states=_torch(theirs))
  close("unet", ours, ref.sample.permute(0, 2, 3, 1).numpy())
  first = task.first.model
  ours = jax.jit(lambda v, z: first.apply(v, z, method=first.decode))(
      state["frozen"]["first_stage"], x)
  img = rng.uniform(-1, 1, (1, 16, 16, 3)).astype(np.float32)
  mean = jax.jit(lambda v, x: first.apply(v, x, method=first.encode).mean)(
      state["frozen"]["first_stage"], img)
  with torch.no_grad():
    dec = pipe.vae.decode(_torch(x).permute(0, 3, 1, 2)).sample.permute(0, 2, 3, 1).numpy()
    enc = pipe.vae.encode(_torch(img).permute(0, 3, 1, 2)).latent_dist.mean
  close("vae.decode", ours, dec)
  close("vae.encode", mean, enc.permute(0, 2, 3, 1).numpy())
  return err


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_export_round_trip(style, tmp_path, tuned):
  from diffusers.loaders import single_file_utils as sfu
  t = tuned(style)
  ckpt, task, state = t["ckpt"], t["task"], t["state"]
  trainable = style == "sd1"

  folder = export.export_checkpoint(ckpt, str(tmp_path / "diffusers"))
  pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
  assert isinstance(pipe.scheduler, diffusers.DDIMScheduler)
  assert pipe.scheduler.config.prediction_type == ("v_prediction" if style == "sd2" else "epsilon")
  assert (pipe.scheduler.config.steps_offset, pipe.scheduler.config.set_alpha_to_one) == (1, False)
  assert pipe.vae.config.scaling_factor == pytest.approx(0.18215)
  err = _check_outputs(task, state, pipe, trainable)
  print(f"{style}: fine-tune {t['seconds']:.1f} s ({t['cpu_seconds']:.1f} s CPU); "
        f"export vs ldm_jax max |diff| {err}")

  # The single file with the trained (not EMA) weights; sd1's through the real entry
  # point (a process of its own), sd2's through the function it calls.
  single = str(tmp_path / "sd.safetensors")
  if style == "sd1":
    run = subprocess.run([sys.executable, "-m", "ldm_jax.export", f"--checkpoint={ckpt}",
                          "--format=single_file", "--noema", f"--out={single}"], cwd=ROOT,
                         capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT),
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
  else:
    export.export_checkpoint(ckpt, single, fmt="single_file", ema=False)
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


@pytest.mark.parametrize("style", ["sd1", "sd2"])
def test_fine_tune_trains_the_unet_and_keeps_the_frozen(style, tuned):
  """The steps trained the UNet (and sd1's text encoder); the VAE and sd2's frozen
  text encoder are the files' bit for bit; the losses are finite (sd2: bfloat16)."""
  t = tuned(style)
  state, p = t["state"], t["p"]
  assert [s for s, _ in t["result"]["logged"]] == list(range(1, STEPS + 1))
  assert all(np.isfinite(m["loss"]) for _, m in t["result"]["logged"])
  moved = lambda a, b: max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()),
                                                        a, b)))
  assert moved(state["params"]["unet"]["params"], p.params["unet"]) > 1e-4
  assert moved(state["ema"]["unet"]["params"], p.params["unet"]) > 0
  same = lambda a, b: all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))
  assert same(state["frozen"]["first_stage"]["params"], p.params["vae"])
  if style == "sd1":  # stage2.text.trainable=True
    assert "cond" not in state["frozen"]
    assert moved(state["params"]["cond"]["params"], p.params["text"]) > 1e-4
  else:  # sd2: the text encoder frozen, the latents cached, bfloat16
    assert "cond" not in state["params"]
    assert same(state["frozen"]["cond"]["params"], p.params["text"])
    assert files.isfile(os.path.join(t["workdir"], "ldm", "latents", "done.json"))
  samples = os.path.join(t["workdir"], "ldm", "samples")  # num_samples = 0: no grid
  assert os.path.isdir(samples) == (style == "sd1")
  assert float(state["scale_factor"]) == pytest.approx(p.scale_factor)


def test_fine_tune_resumes_from_its_checkpoint(tuned):
  """Run again, the finished fine-tune restores its own step-3 state (the files'
  weights are not put over it) and trains nothing more."""
  t = tuned("sd1")
  config, explicit = finetune_config("sd1", t["data_dir"])
  again = run.train_and_evaluate(config, t["workdir"], explicit=explicit)["ldm"]
  assert again["step"] == STEPS and again["logged"] == []
  for key in ("params", "ema", "frozen"):
    same = jax.tree.map(np.array_equal, jax.device_get(again["state"][key]), t["state"][key])
    assert all(jax.tree.leaves(same)), key


def test_export_dtype_and_existing_output(tmp_path, tuned):
  t = tuned("sd2")
  ckpt, task, state = t["ckpt"], t["task"], t["state"]
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
