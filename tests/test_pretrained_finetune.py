"""`config.pretrained`: the config a fine-tune of Stable Diffusion weights trains with,
and the errors it gives before anything compiles. The fine-tune itself runs in
tests/test_pretrained_export.py (3 steps, then exported)."""
import os
import subprocess
import sys

import pytest

from ldm_jax import config_lib
from ldm_jax.pretrained import finetune
from ldm_jax.training import run

pytest.importorskip("torch")
pytest.importorskip("diffusers")
from tests import sd_fixtures  # noqa: E402  (needs torch and diffusers)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(arg: str):
  txt2img = config_lib.sibling(os.path.join(ROOT, "configs", "txt2img.py"), "txt2img")
  return txt2img.get_config(arg).unlock()


def test_single_file_config_from_the_files_and_the_users_fields():
  """sd2's single file with its configs' folder: the files replace the recipe's SD 2
  presets; the fields a user may set against them stay the user's."""
  fx = sd_fixtures.build("sd2")
  config = _recipe("size=sd2")
  config.pretrained, config.pretrained_config = fx["file"], fx["folder"]
  config.data.resolution = 32
  config.stage2.unet.attention = "xla"
  config.stage2.prediction_type = "eps"  # SD 2.x base: what the file cannot tell
  out, p = finetune.resolve(config, ("pretrained", "pretrained_config", "data.resolution",
                                     "stage2.unet.attention", "stage2.prediction_type"))
  assert p.layout == "single_file"
  assert tuple(out.stages) == ("ldm",)
  assert dict(out.stage2.unet, attention="xla") == dict(p.unet, attention="xla")
  assert out.stage2.unet.attention == "xla"
  assert (out.data.resolution, out.stage1.image_size) == (32, 32)
  assert out.stage2.prediction_type == p.prediction_type == "eps"
  assert out.stage2.text.clip.to_dict() == p.text
  assert out.stage2.scale_factor == pytest.approx(p.scale_factor)
  assert not out.stage2.text.trainable  # SD sizes: the text encoder frozen by default
  # Nothing explicit: the files' prediction type (v, from the folder's scheduler).
  config.stage2.prediction_type = "eps"
  assert finetune.resolve(config)[0].stage2.prediction_type == "v"


def test_a_single_file_needs_a_tokenizer():
  config = _recipe("size=sd15")
  config.pretrained = sd_fixtures.build("sd1")["file"]
  with pytest.raises(ValueError, match="no tokenizer"):
    finetune.resolve(config)


def test_errors_before_anything_compiles(tmp_path):
  fx = sd_fixtures.build("sd1")
  config = _recipe("size=sd15")
  with pytest.raises(ValueError, match="config.pretrained is empty"):  # SD sizes train no stage 1
    run.train_and_evaluate(config, str(tmp_path / "a"))
  config.pretrained = fx["folder"]
  config.stages = ("autoencoder", "ldm")
  with pytest.raises(ValueError, match=r"config.stages=\('autoencoder', 'ldm'\) with config.pretrained"):
    run.train_and_evaluate(config, str(tmp_path / "b"), explicit=("pretrained", "stages"))
  config.stages = ("ldm",)
  config.stage2.scale_factor = 0.5
  with pytest.raises(ValueError, match=r"config.stage2.scale_factor=0.5, but .* has 0.18215"):
    run.train_and_evaluate(config, str(tmp_path / "c"), explicit=("stage2.scale_factor",))
  config.stage2.scale_factor = 0.18215  # the same value, explicit: fine
  assert finetune.resolve(config, ("stage2.scale_factor",))[1] is not None
  assert not os.path.exists(tmp_path / "c" / "ldm")


def test_train_cli_names_a_conflicting_override(tmp_path):
  """The command line's overrides are what the user set: one the files contradict
  fails naming the field and both values (and the recipe's SD 1.5 preset, which the
  tiny files contradict too, gives way silently)."""
  fx = sd_fixtures.build("sd1")
  out = subprocess.run(
      [sys.executable, "-m", "ldm_jax.train", "--config=configs/txt2img.py:size=sd15",
       f"--config.pretrained={fx['folder']}", "--config.stage2.unet.model_channels=64",
       f"--workdir={tmp_path / 'run'}", "--cpu_devices=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
  assert out.returncode != 0
  assert "config.stage2.unet.model_channels=64, but" in out.stderr, out.stderr[-2000:]
  assert "has 32" in out.stderr
  assert not (tmp_path / "run" / "ldm").exists()
