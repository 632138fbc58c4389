"""SIGTERM in a two-stage run: the job stops with EXIT_PREEMPTED before stage 2 is
built on an unfinished first stage, and the same command resumes; stage 2's inputs
(scale factor, latent cache) record the first stage they came from."""
import json
import os
import signal
import subprocess
import sys

from ldm_jax import config_lib
from ldm_jax.training import first_stage, loop
from ldm_jax.training.run import EXIT_PREEMPTED
from tests.test_configs import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGE1_STEPS = 12


def test_the_flag_survives_between_stages():
  with loop.Preemption() as job:
    with loop.Preemption():  # stage 1's loop
      pass
    os.kill(os.getpid(), signal.SIGTERM)  # between the stages: still caught
    with loop.Preemption() as stage2:  # stage 2's loop does not clear it
      assert stage2.requested and job.requested
  with loop.Preemption() as next_job:  # a new job starts clear
    assert not next_job.requested


def test_sigterm_in_stage1_stops_the_job_and_the_same_command_resumes(tmp_path):
  wd = tmp_path / "run"
  overrides = {"stage1.total_steps": STAGE1_STEPS, "stage1.batch_size": 2,
               "stage1.scale_batches": 1, "stage1.model.ch": 8}
  cmd = [sys.executable, "-m", "ldm_jax.train", "--config=configs/txt2img.py", f"--workdir={wd}",
         "--cpu_devices=1", "--config.stage2.total_steps=2", "--config.stage2.batch_size=2",
         "--config.log_every=1", "--config.ckpt_every=1000", "--config.sample_every=0",
         "--config.num_samples=0", "--config.stage2.eval.every=0",
         "--config.data.shapes.num=32", "--config.stage2.unet.channel_mult=(1,)",
         "--config.stage2.unet.attention_resolutions=(1,)",
         "--config.data.shapes.shard_size=16", f"--config.data.cache_dir={tmp_path}/cache"]
  cmd += [f"--config.{k}={v}" for k, v in overrides.items()]
  # One device (not the suite's 8 on 2 cores), XLA's optimisations still off.
  env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1",
             XLA_FLAGS="--xla_backend_optimization_level=0")
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  log = []
  for line in proc.stdout:
    log.append(line)
    if f"step 2/{STAGE1_STEPS}" in line:
      proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=600) == EXIT_PREEMPTED, "".join(log[-40:])
  log = "".join(log)
  assert "SIGTERM: saved step" in log and "stopped after stage 1" in log
  ckpts = [int(s) for s in os.listdir(wd / "autoencoder" / "checkpoints") if s.isdigit()]
  assert ckpts and max(ckpts) < STAGE1_STEPS
  assert not (wd / "ldm").exists()  # nothing of stage 2 was built
  assert not (wd / "autoencoder" / "scale_factor.json").exists()

  # A scale factor left from an earlier, shorter first stage must not be reused.
  c = load("txt2img").unlock()
  for k, v in overrides.items():
    *path, name = k.split(".")
    node = c
    for part in path:
      node = node[part]
    node[name] = v
  fp = first_stage.fingerprint(config_lib.for_stage(c, "stage1"))
  stale = {"scale_factor": 123.0, "batches": 1,
           "source": {"stage1_step": max(ckpts), "stage1_config": fp}}
  (wd / "autoencoder" / "scale_factor.json").write_text(json.dumps(stale))

  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert f"at step {max(ckpts)}" in out.stdout and f"step {STAGE1_STEPS}/{STAGE1_STEPS}" in out.stdout
  scale = json.loads((wd / "autoencoder" / "scale_factor.json").read_text())
  assert scale["source"] == {"stage1_step": STAGE1_STEPS, "stage1_config": fp}
  assert scale["scale_factor"] != 123.0
  done = json.loads((wd / "ldm" / "latents" / "done.json").read_text())
  assert done["signature"]["first_stage"] == scale["source"]
  assert os.path.isdir(wd / "ldm" / "checkpoints" / "2")
