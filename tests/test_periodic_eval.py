"""Evaluation while stage 2 trains (`config.stage2.eval`): the scalars in the event
files and the JSON, the same numbers on 8 devices as on 1, metrics without their
weights skipped and said so, and bad settings failing by name before anything
compiles. The Inception is test_evaluate's random, calibrated one."""
import json
import logging
import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator

from ldm_jax import config_lib, parallel
from ldm_jax.evaluation import inception_features, periodic, prompts
from ldm_jax.training import run
from ldm_jax.training.first_stage import FirstStage
from ldm_jax.training.ldm import LDMTask
from tests import host_init
from tests.test_evaluate import BATCH, files, loaded, small_inception  # noqa: F401 (fixtures)
from tests.test_sampling import load_config


def _config(tmp_path, **eval_fields):
  """The tiny txt2img recipe shrunk to seconds, with `eval_fields` set."""
  c = load_config("txt2img").unlock()
  c.update(log_every=2, ckpt_every=4, sample_every=0, num_samples=8)
  c.stage2.update(total_steps=3, batch_size=8, latent_cache=False, warmup_steps=0)
  # one level: half the UNet's program, so a quicker compile
  c.stage2.unet.update(model_channels=16, norm_num_groups=8, channel_mult=(1,),
                       attention_resolutions=(1,))
  c.stage1.model.update(ch=8, norm_groups=4)
  c.data.shapes.update(num=64, shard_size=32)
  c.data.cache_dir = str(tmp_path / "cache")
  c.stage2.eval.update(eval_fields)
  return c.lock()


def test_eval_during_training_logs_scalars_and_json(files, tmp_path):
  c = _config(tmp_path, every=2, num=BATCH, batch=BATCH, steps=2, metrics="prompts,fid",
              inception_weights=files["inception"])
  periodic.check_config(c)
  c2 = config_lib.for_stage(c, "stage2")
  first = FirstStage.from_config(c2)  # a random autoencoder: the test is about the plumbing
  variables = host_init.variables(nn.unbox(jax.eval_shape(first.init, jax.random.key(0))))
  first = FirstStage.from_variables(c2, variables, 1.0,
                                    mesh=parallel.make_mesh(c2))
  res = run.train_ldm(c, str(tmp_path / "w"), first)
  assert [s for s, _ in res["evals"]] == [2, 3]  # every 2 steps, and the final state
  acc = event_accumulator.EventAccumulator(str(tmp_path / "w" / "ldm" / "tensorboard"),
                                           size_guidance={event_accumulator.SCALARS: 0})
  acc.Reload()
  tags = acc.Tags()["scalars"]
  want = ["eval/fid", "eval/seconds"] + ["eval/" + prompts.scalar_name(k) for k in prompts.KEYS]
  assert set(want) <= set(tags), tags
  for tag in want:
    assert [e.step for e in acc.Scalars(tag)] == [2, 3]
  fid3 = acc.Scalars("eval/fid")[1].value
  saved = json.load(open(tmp_path / "w" / "ldm" / "eval" / "train_step0000003.json"))
  assert saved["fid"] == pytest.approx(fid3, rel=1e-6) and saved["fid"] > 0
  assert saved["skipped"] == {} and saved["num"] == BATCH and saved["steps"] == 2
  assert 0 <= saved["prompts/colour_kind_position"] <= saved["prompts/colour"] + 1e-9
  assert os.path.basename(saved["reference"]).startswith("reference_shapes-heldout_r32_n16")
  assert res["evals"][1][1]["fid"] == saved["fid"]
  assert res["evals"][0][1]["fid"] != saved["fid"]  # another state, other samples


def test_eval_gives_the_same_numbers_on_8_devices_and_1(files, loaded, tmp_path):
  """The training path samples and measures through generated.evaluate, sharded
  over whatever mesh the loop has."""
  task, state, mesh, config = loaded
  c = ml_collections.ConfigDict(config.to_dict())
  c.stage2.eval.update(every=1, num=BATCH, batch=BATCH, steps=2, metrics="prompts,fid",
                       inception_weights=files["inception"])
  one = jax.devices()[:1]
  got = []
  for name, m, s in (("eight", mesh, state),
                     ("one", parallel.make_mesh(c, one), jax.device_put(state, one[0]))):
    got.append(periodic.Evaluator(task, c, str(tmp_path / name))(s, m))
  assert len(mesh.devices.flat) == 8
  for k in got[0]:
    if k != "seconds":
      assert got[1][k] == pytest.approx(got[0][k], rel=1e-4, abs=1e-4), k


def test_metrics_without_weights_are_skipped_and_said_once(tmp_path, monkeypatch, caplog):
  monkeypatch.delenv(inception_features.ENV, raising=False)
  c = _config(tmp_path, every=100, metrics="prompts,fid,is")
  periodic.check_config(c)  # the default's fid without weights is no error ...
  kept, skipped = periodic.available(c)
  assert kept == ["prompts"] and sorted(skipped) == ["fid", "is"]
  assert "LDM_INCEPTION_WEIGHTS" in skipped["fid"] and "pt_inception" in skipped["fid"]
  with caplog.at_level(logging.INFO, logger="ldm_jax"):
    ev = periodic.Evaluator(LDMTask(config_lib.for_stage(c, "stage2")),
                            config_lib.for_stage(c, "stage2"), str(tmp_path / "eval"))
  warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert ev.metrics == ["prompts"] and len(warned) == 2 and "fid skipped" in warned[0]
  monkeypatch.setenv(inception_features.ENV, str(tmp_path / "absent.pth"))
  with pytest.raises(FileNotFoundError, match="config.stage2.eval.inception_weights.*absent.pth"):
    periodic.check_config(c)  # ... but a named file that is missing is


@pytest.mark.parametrize("config_name,fields,match", [
    ("txt2img", dict(every=-1), r"config.stage2.eval.every: must be >= 0"),
    ("txt2img", dict(num=0), r"config.stage2.eval.num: must be positive"),
    ("txt2img", dict(metrics="fid,lpips"), r"config.stage2.eval.metrics: a comma list of"),
    ("txt2img", dict(every=5, metrics="fid"), r"config.stage2.eval.metrics: none can be"),
    ("txt2img", dict(every=5, metrics="prompts,kid", inception_weights="{w}"),
     r"config.stage2.eval.num: KID draws subsets of 1000"),
    ("txt2img", dict(every=5, inception_weights="{d}/nope.pth"),
     r"config.stage2.eval.inception_weights: FID Inception weights .*nope.pth' not found"),
    ("txt2img", dict(every=5, inception_weights="{w}", reference="{d}/nope.npz"),
     r"config.stage2.eval.reference: .*nope.npz' not found"),
    ("class_cond", dict(every=5, metrics="prompts"), r"config.stage2.eval.metrics: 'prompts'"),
    ("inpainting", dict(every=5, metrics="prompts"), r"config.stage2.eval.every: evaluation"),
])
def test_bad_eval_settings_fail_by_name_before_training(files, tmp_path, config_name, fields,
                                                        match):
  c = load_config(config_name).unlock()
  c.stage2.eval.update({k: v.format(d=tmp_path, w=files["inception"]) if isinstance(v, str)
                        else v for k, v in fields.items()})
  with pytest.raises((ValueError, FileNotFoundError), match=match):
    run.train_and_evaluate(c.lock(), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_fid_on_other_data_needs_a_reference(files, tmp_path):
  c = load_config("txt2img").unlock()
  c.data.source = "wds"
  c.stage2.latent_cache = False
  c.stage2.eval.update(every=5, metrics="fid", inception_weights=files["inception"])
  with pytest.raises(ValueError, match="config.stage2.eval.reference: fid and kid need "
                     "reference statistics of real images on data.source='wds'"):
    periodic.check_config(c.lock())
  np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
  c.stage2.eval.reference = str(tmp_path / "ref.npz")
  periodic.check_config(c)
