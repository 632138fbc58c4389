"""The real entry points on a shrunk default config: train (both stages), sample,
evaluate_prompts — as a user types them."""
import glob
import json
import os
import subprocess
import sys

from ldm_jax.training.summary import read_events

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600, env=None):
  out = subprocess.run([sys.executable, "-m"] + args, cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env=env)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout + out.stderr


def test_train_sample_evaluate(tmp_path):
  wd = str(tmp_path / "run")
  shrink = ["--config.stage1.total_steps=3", "--config.stage2.total_steps=3",
            "--config.stage1.batch_size=8", "--config.stage2.batch_size=8",
            "--config.stage1.scale_batches=1", "--config.log_every=1", "--config.ckpt_every=2",
            "--config.sample_every=0", "--config.num_samples=8",
            "--config.stage2.sample.steps=3", "--config.data.shapes.num=64",
            "--config.data.shapes.shard_size=32", f"--config.data.cache_dir={tmp_path}/cache"]
  # As a user runs it: no forced device count, so train splits the CPU, one device a core.
  env = dict(os.environ, XLA_FLAGS=" ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f))
  log = _run(["ldm_jax.train", "--config=configs/txt2img.py", f"--workdir={wd}"] + shrink, env=env)
  assert "step 3/3" in log and "scale_factor" in log
  cores = min(os.cpu_count() or 1, 8)
  expected = max(d for d in range(1, cores + 1) if 8 % d == 0)
  assert f"CPU host: {expected} device(s)" in log
  for stage in ("autoencoder", "ldm"):
    assert os.path.isdir(os.path.join(wd, stage, "checkpoints", "3"))
    assert glob.glob(os.path.join(wd, stage, "samples", "*.png"))
    events = glob.glob(os.path.join(wd, stage, "tensorboard", "events.out.tfevents.*"))
    assert events and len(list(read_events(events[0]))) > 3
  out = str(tmp_path / "samples")
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a small green square at the top left on a white background\n")
  _run(["ldm_jax.sample", f"--workdir={wd}", "--prompt=a large red circle in the centre on a "
        "blue background", f"--prompts-file={prompts}", "--num=2", "--steps=3", f"--out={out}"])
  assert os.path.isfile(os.path.join(out, "grid.png"))
  meta = [json.load(open(os.path.join(out, f"{i:05d}.json"))) for i in range(4)]
  assert all(m["steps"] == 3 for m in meta)
  assert {m["prompt"] for m in meta} == {"a large red circle in the centre on a blue background",
                                         "a small green square at the top left on a white background"}
  log = _run(["ldm_jax.evaluate_prompts", f"--workdir={wd}", "--num=4", "--steps=2", "--chunk=4"])
  assert "colour+kind+position" in log
  res = json.load(open(os.path.join(wd, "eval", "results.json")))
  assert set(res["accuracy"]) >= {"colour", "kind", "position"} and res["num"] == 4
