"""Every config file loads with every documented arg; bad fields fail by name."""
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
