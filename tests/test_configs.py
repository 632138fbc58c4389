"""Every config file loads with every documented arg; bad fields fail by name."""
import copy
import importlib.util
import os
import subprocess
import sys

import pytest

from ldm_jax import config_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DOCUMENTED = {
    "txt2img": [f"size={s},data={d}" for s in ("tiny", "base", "sd15", "sd2")
                for d in ("shapes", "wds", "tfds")],
    "unconditional": ["size=tiny", "size=base", "data=wds"],
    "class_cond": ["size=tiny", "size=base", "classes=10"],
    "super_resolution": ["size=tiny", "size=base"],
    "inpainting": ["size=tiny", "size=base", "size=sd2", "text=1"],
    "layout": ["size=tiny", "size=base", "data=wds"],
    "autoencoder_kl": [f"f={f},size={s}" for f in (4, 8, 16, 32) for s in ("tiny", "ref")],
    "autoencoder_vq": [f"f={f},size={s}" for f in (4, 8, 16) for s in ("tiny", "ref")],
}


def load(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_every_config_file_is_covered():
  files = {f[:-3] for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")}
  assert files == set(DOCUMENTED)


@pytest.mark.parametrize("name,arg", [(n, a) for n, args in DOCUMENTED.items()
                                      for a in [None] + args])
def test_config_loads_and_validates(name, arg):
  c = load(name, arg)
  config_lib.validate(c)
  assert c.is_locked
  for stage in c.stages:
    config_lib.validate(config_lib.for_stage(c, "stage1" if stage == "autoencoder" else "stage2"))


def test_sd_configs_have_reference_shapes():
  c = load("txt2img", "size=sd15")
  assert c.stage2.unet.model_channels == 320 and c.stage2.unet.context_dim == 768
  assert c.stage2.scale_factor == pytest.approx(0.18215)
  assert load("txt2img", "size=sd2").stage2.prediction_type == "v"


def test_unknown_arg_and_field_fail_by_name():
  with pytest.raises(ValueError, match="colour"):
    load("txt2img", "colour=red")
  c = load("txt2img")
  with pytest.raises(AttributeError, match="lrr"):
    c.stage2.lrr = 1.0


def test_cli_override_of_a_misspelt_field_fails_before_training(tmp_path):
  out = subprocess.run([sys.executable, "-m", "ldm_jax.train", "--config=configs/txt2img.py",
                        f"--workdir={tmp_path}", "--config.stage2.lerning_rate=1"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "lerning_rate" in out.stderr


@pytest.mark.parametrize("field,value,match", [
    ("dtype", "float16", "config.dtype"),
    ("grad_accum", 0, "config.grad_accum"),
])
def test_bad_values_name_the_field(field, value, match):
  c = load("txt2img")
  with c.unlocked():
    c[field] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(c)


def test_stage1_checkpoint_stays_valid_when_stage2_changes():
  from ldm_jax import checkpoint
  a = load("txt2img")
  b = load("txt2img").unlock()
  b.stage2.prediction_type = "x0"
  b.stage1.loss.kl_weight = 1e-3
  s1a, s1b = (config_lib.to_dict(config_lib.for_stage(c, "stage1")) for c in (a, b))
  assert "stage2" not in s1a
  assert checkpoint.config_differences(s1a, s1b) == [
      "stage1.loss.kl_weight: checkpoint 1e-06 vs config 0.001"]
  s2a, s2b = (config_lib.to_dict(config_lib.for_stage(c, "stage2")) for c in (a, b))
  assert "stage2.prediction_type: checkpoint 'v' vs config 'x0'" in (
      checkpoint.config_differences(s2a, s2b))
  # a checkpoint from before an option existed matches a config that leaves it off;
  # the sampler's settings never decide what the state holds
  old = copy.deepcopy(s1a)
  del old["stage1"]["loss"]["latent_noise"]
  s1a["stage1"]["loss"]["latent_noise"] = 0.0
  assert checkpoint.config_differences(old, s1a) == []
  s1a["stage1"]["loss"]["latent_noise"] = 0.2
  assert checkpoint.config_differences(old, s1a) == [
      "stage1.loss.latent_noise: checkpoint '<absent>' vs config 0.2"]
  del s2a["stage2"]["sample"]["guidance_interval"]
  s2a["stage2"]["sample"]["guidance"] = 7.0
  assert checkpoint.config_differences(s2a, config_lib.to_dict(
      config_lib.for_stage(a, "stage2"))) == []


def _leaves(d, prefix=""):
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _leaves(v, f"{prefix}{k}.")
    else:
      yield prefix + k


def test_print_config_lists_every_field_with_its_comment_and_starts_no_backend(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="no_such_platform")  # a backend would fail
  out = subprocess.run([sys.executable, "-m", "ldm_jax.train", "--config=configs/txt2img.py",
                        "--config.stage2.lr=5e-5", "--print_config",
                        "--config.mesh=(('data', -1), ('fsdp', 2), ('tensor', 1))"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  lines = out.stdout.splitlines()
  c = load("txt2img")
  names = list(_leaves(c.to_dict()))
  assert [l.split(" = ")[0] for l in lines] == names
  assert "stage2.lr = 5e-05  # AdamW's peak learning rate | (tiny) a high learning rate" in out.stdout
  assert "stage1.total_steps = 2400  # optimizer steps of this stage" in out.stdout
  assert "stage2.conditioning.context = 'text'  # 'text' (cross-attention)" in out.stdout
  assert "stage2.unet.model_channels = 32  # base width" in out.stdout
  assert "mesh = (('data', -1), ('fsdp', 2), ('tensor', 1))  # Mesh axes" in out.stdout
  assert not os.path.exists(tmp_path / "runs")


def test_comments_are_read_where_fields_are_defined(tmp_path):
  from ldm_jax import config_docs
  src = tmp_path / "cfg.py"
  src.write_text(
      "def get_config(arg):\n"
      "  c.a = 1  # the a\n"
      "  # the b,\n"
      "  # over two lines\n"
      "  c.sub.b = 2\n"
      "  c.d = ml_collections.ConfigDict(dict(\n"
      "      x=1,  # the x\n"
      "      y=2))\n"
      "  if arg.size == 'tiny':\n"
      "    c.a = 3  # smaller\n"
      "  c.e = 4\n")
  assert config_docs.comments(str(src)) == {
      "a": "(arg.size == 'tiny') smaller", "sub.b": "the b, over two lines", "d.x": "the x"}


def test_configs_ship_with_a_non_editable_install(tmp_path):
  """`pip install .` (a wheel) carries configs/ as ldm_jax/configs, and
  --config=configs/NAME.py finds them from any folder."""
  import shutil
  src = tmp_path / "src"
  src.mkdir()
  shutil.copy(os.path.join(ROOT, "setup.py"), src)
  for part in ("ldm_jax", "configs"):
    shutil.copytree(os.path.join(ROOT, part), src / part,
                    ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                  "--no-index", "--quiet", f"--target={tmp_path / 'site'}", str(src)],
                 check=True, timeout=300, capture_output=True)
  shipped = set(os.listdir(tmp_path / "site" / "ldm_jax" / "configs"))
  assert shipped >= {f for f in os.listdir(os.path.join(ROOT, "configs")) if f.endswith(".py")}
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  env = dict(os.environ, PYTHONPATH=str(tmp_path / "site"), JAX_PLATFORMS="no_such_platform")
  out = subprocess.run([sys.executable, "-m", "ldm_jax.train",
                        "--config=configs/class_cond.py:size=base", "--print_config"],
                       cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "stage2.conditioning.classes = 5" in out.stdout
  assert "stage2.sample.guidance = 1.5  # " in out.stdout
