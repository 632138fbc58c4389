"""Bad input: the per-stage settings checked before any stage starts."""
import os

import pytest

from ldm_jax import config_lib
from tests.test_configs import load


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", -4, "config.stage1.batch_size: must be positive"),
    ("total_steps", -5, "config.stage1.total_steps: must be >= 0"),
    ("total_steps", 0, "remove 'autoencoder' from config.stages"),
    ("grad_accum", 3, "config.stage1.batch_size: must be a multiple of grad_accum=3"),
])
def test_each_stage_is_validated_before_any_starts(tmp_path, field, value, match):
  from ldm_jax.training import run
  c = load("txt2img").unlock()
  c.stage1[field] = value
  with pytest.raises(ValueError, match=match):
    run.train_and_evaluate(c.lock(), str(tmp_path))
  assert not os.listdir(tmp_path)


def test_spine_fields_a_stage_does_not_set_are_named_at_the_top():
  c = load("txt2img").unlock()
  c.keep_ckpts = 0
  with pytest.raises(ValueError, match=r"^config.keep_ckpts"):
    config_lib.validate(c)
  c = load("txt2img").unlock()
  c.stages = ("autoencoder", "gan")
  with pytest.raises(ValueError, match="unknown stage"):
    config_lib.validate(c)
