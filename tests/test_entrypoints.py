"""The real entry points on a shrunk default config: train (both stages), sample,
evaluate_prompts, evaluate_autoencoder — as a user types them, with the workdir
given as a URL (file://), so every output must go through the storage layer."""
import glob
import json
import os
import subprocess
import sys

from tensorboard.backend.event_processing import event_accumulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=600, env=None, cwd=ROOT):
  env = dict(env or os.environ, PYTHONPATH=ROOT)  # the tree under test, from any cwd
  out = subprocess.run([sys.executable, "-m"] + args, cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env=env)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  return out.stdout + out.stderr


def events(logdir):
  """TensorBoard's own reading of the event files in `logdir`."""
  acc = event_accumulator.EventAccumulator(logdir, size_guidance={event_accumulator.IMAGES: 0,
                                                                  event_accumulator.SCALARS: 0})
  acc.Reload()
  return acc


def test_train_sample_evaluate(tmp_path):
  run_dir = tmp_path / "run"
  wd = f"file://{run_dir}"
  cwd = tmp_path / "cwd"  # where a path mistaken for a local one would land
  cwd.mkdir()
  shrink = ["--config.stage1.total_steps=3", "--config.stage2.total_steps=3",
            "--config.stage1.batch_size=8", "--config.stage2.batch_size=8",
            "--config.stage1.scale_batches=1", "--config.log_every=1", "--config.ckpt_every=2",
            "--config.sample_every=0", "--config.num_samples=8",
            "--config.stage2.sample.steps=3", "--config.stage2.eval.num=8",
            "--config.stage2.eval.batch=8", "--config.data.shapes.num=64",
            "--config.data.shapes.shard_size=32", f"--config.data.cache_dir={tmp_path}/cache"]
  # As a user runs it: no forced device count, so train splits the CPU, one device a core;
  # from another folder, so configs/ is found beside the package.
  env = dict(os.environ, XLA_FLAGS=" ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f))
  log = _run(["ldm_jax.train", "--config=configs/txt2img.py", f"--workdir={wd}"] + shrink,
             env=env, cwd=cwd)
  assert "step 3/3" in log and "scale_factor" in log
  cores = min(os.cpu_count() or 1, 8)
  expected = max(d for d in range(1, cores + 1) if 8 % d == 0)
  assert f"CPU host: {expected} device(s)" in log
  for stage in ("autoencoder", "ldm"):
    assert os.path.isdir(run_dir / stage / "checkpoints" / "3")
    assert glob.glob(str(run_dir / stage / "samples" / "step_0000003.png"))
    acc = events(str(run_dir / stage / "tensorboard"))
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in acc.Images("samples")] == [3]
  assert "sample/psnr" in events(str(run_dir / "autoencoder" / "tensorboard")).Tags()["scalars"]
  # The default's evaluation while training, run once at the end of this short stage 2.
  acc = events(str(run_dir / "ldm" / "tensorboard"))
  assert [e.step for e in acc.Scalars("eval/prompts/kind")] == [3]
  ev = json.load(open(run_dir / "ldm" / "eval" / "train_step0000003.json"))
  assert ev["metrics"][0] == "prompts" and ev["num"] == 8 and 0 <= ev["prompts/kind"] <= 1
  scale = json.load(open(run_dir / "autoencoder" / "scale_factor.json"))
  assert scale["source"]["stage1_step"] == 3 and scale["scale_factor"] > 0
  done = json.load(open(run_dir / "ldm" / "latents" / "done.json"))
  assert done["count"] == 64 and done["signature"]["first_stage"] == scale["source"]

  out = f"file://{tmp_path}/samples"
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a small green square at the top left on a white background\n")
  _run(["ldm_jax.sample", f"--workdir={wd}", "--prompt=a large red circle in the centre on a "
        "blue background", f"--prompts-file={prompts}", "--num=2", "--steps=3", f"--out={out}",
        "--guidance-interval=0.1,0.9"],
       cwd=cwd)
  assert os.path.isfile(tmp_path / "samples" / "grid.png")
  meta = [json.load(open(tmp_path / "samples" / f"{i:05d}.json")) for i in range(4)]
  assert all(m["steps"] == 3 and m["guidance_interval"] == [0.1, 0.9] for m in meta)
  assert {m["prompt"] for m in meta} == {"a large red circle in the centre on a blue background",
                                         "a small green square at the top left on a white background"}
  log = _run(["ldm_jax.evaluate_prompts", f"--workdir={wd}", "--num=4", "--steps=2", "--chunk=4"],
             cwd=cwd)
  assert "colour+kind+position" in log
  res = json.load(open(run_dir / "eval" / "results.json"))
  assert set(res["accuracy"]) >= {"colour", "kind", "position"} and res["num"] == 4
  assert os.path.isfile(run_dir / "eval" / "grid.png")
  _run(["ldm_jax.evaluate_autoencoder", f"--workdir={wd}", "--num=8", "--batch=8",
        "--latent_noise=0.2"], cwd=cwd)
  res = json.load(open(run_dir / "autoencoder" / "eval" / "results.json"))
  assert res["num"] == 8 and res["psnr"] > 0 and res["latent_noise"] == 0.2
  assert os.listdir(cwd) == []  # nothing went to a local folder named after the URL
