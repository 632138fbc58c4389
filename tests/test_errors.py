"""Bad input to every entry point: one line naming the problem, exit code 2, before
anything compiles (JAX_LOG_COMPILES would print a compile on stderr); and the
per-stage settings checked before any stage starts."""
import concurrent.futures
import os
import subprocess
import sys
import time

import jax.numpy as jnp
import pytest

from ldm_jax import checkpoint, config_lib
from tests.test_configs import load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TXT2IMG = "--config=configs/txt2img.py"

# (module, arguments, a word the one line must hold); {d} is a scratch folder holding
# w/ (a stage-1 and a stage-2 checkpoint of step 3) and file (a plain file).
BAD_COMMANDS = [
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage2.lerning_rate=1"], "lerning_rate"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage1.batch_sise=8"], "batch_size"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage1.batch_size=-4"],
     "config.stage1.batch_size"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage1.total_steps=-5"],
     "config.stage1.total_steps"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage1.total_steps=0"], "config.stages"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage2.ckpt_every=0"],
     "config.stage2.ckpt_every"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage1.batch_size=abc"], "abc"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.mesh=[('data',3)]"], "config.mesh"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.dtype=float16"], "config.dtype"),
    ("train", ["--workdir={d}/t"], "--config"),
    ("train", ["--config=configs/nope.py", "--workdir={d}/t"], "nope.py"),
    ("train", [TXT2IMG + ":colour=red", "--workdir={d}/t"], "colour"),
    ("train", [TXT2IMG, "--workdir={d}/file/t"], "not writable"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--cpu_devices=0"], "cpu_devices"),
    ("train", ["configs/txt2img.py"], "unexpected argument"),
    ("train", ["--bogus"], "bogus"),
    ("sample", ["--workdir={d}/w", "--prompt=a", "--num=0", "--out={d}/o"], "--num"),
    ("sample", ["--workdir={d}/w", "--prompts_file={d}/none.txt", "--out={d}/o"], "none.txt"),
    ("sample", ["--workdir={d}/w", "--prompt=a", "--step=7", "--out={d}/o"], "step 7"),
    ("sample", ["--workdir={d}/none", "--prompt=a", "--out={d}/o"], "no checkpoint folder"),
    ("sample", ["--workdir={d}/w", "--sampler=euler"], "--sampler"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage2.eval.every=-1"],
     "config.stage2.eval.every"),
    ("train", [TXT2IMG, "--workdir={d}/t", "--config.stage2.eval.metrics=fid,lpips"],
     "config.stage2.eval.metrics"),
    ("evaluate", ["--workdir={d}/w", "--num=0"], "--num"),
    ("evaluate", ["--workdir={d}/w", "--guidance=3,x"], "--guidance"),
    ("evaluate", ["--workdir={d}/w", "--sampler=euler"], "--sampler"),
    ("evaluate", ["--workdir={d}/w", "--metrics=fid,lpips"], "--metrics"),
    ("evaluate_prompts", [], "--workdir"),
    ("evaluate_prompts", ["--workdir={d}/w", "--chunk=0"], "--chunk"),
    ("evaluate_autoencoder", ["--workdir={d}/w", "--step=9", "--out={d}/o"], "step 9"),
    ("evaluate_autoencoder", ["--workdir={d}/w", "--num=0"], "--num"),
    ("data.make_shapes", ["--out={d}/s", "--resolution=8"], "--resolution"),
    ("data.make_shapes", ["--num=3"], "--out"),
    ("export", ["--workdir={d}/w"], "--out"),
    ("export", ["--workdir={d}/none", "--out={d}/o"], "no checkpoint folder"),
]


def _run(module, args, env):
  t0 = time.time()
  out = subprocess.run([sys.executable, "-m", f"ldm_jax.{module}"] + args, cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env=env)
  return out, time.time() - t0


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
  d = tmp_path_factory.mktemp("errors")
  for stage, section in (("ldm", "stage2"), ("autoencoder", "stage1")):
    ck = checkpoint.Checkpointer(str(d / "w" / stage / "checkpoints"))
    ck.save(3, {"step": jnp.zeros((), jnp.int32)}, None, {"stages": [stage], section: {}})
    ck.close()
  (d / "file").write_text("")
  return d


def _env(**kw):
  """The environment a user has: no forced device count (train's --cpu_devices acts)."""
  xla = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)
  return dict(os.environ, XLA_FLAGS=xla, PYTHONPATH=ROOT, **kw)


def test_bad_commands_fail_in_one_line(scratch):
  env = _env(JAX_LOG_COMPILES="1")
  jobs = [(m, [a.format(d=scratch) for a in args], word) for m, args, word in BAD_COMMANDS]
  with concurrent.futures.ThreadPoolExecutor(4) as pool:  # each is mostly imports
    results = list(pool.map(lambda j: _run(j[0], j[1], env), jobs))
  problems = []
  for (module, args, word), (out, seconds) in zip(jobs, results):
    lines = out.stderr.strip().splitlines()
    if not (out.returncode == 2 and len(lines) == 1 and word in lines[0] and
            lines[0].startswith(f"ldm_jax.{module}: error: ")):
      problems.append(f"{module} {args}: rc {out.returncode}, stderr:\n{out.stderr[-2000:]}")
    elif seconds > 90:  # nothing compiled: the slowest is imports on a busy machine
      problems.append(f"{module} {args}: {seconds:.0f} s")
  assert not problems, "\n\n".join(problems)
  assert not os.path.exists(scratch / "t")  # nothing started


def test_debug_shows_the_traceback(scratch):
  out, _ = _run("evaluate_autoencoder", [f"--workdir={scratch}/w", "--step=9", "--debug"],
                _env())
  assert out.returncode == 1 and "Traceback" in out.stderr and "step 9" in out.stderr


@pytest.mark.parametrize("field,value,match", [
    ("batch_size", -4, "config.stage1.batch_size: must be positive"),
    ("total_steps", -5, "config.stage1.total_steps: must be >= 0"),
    ("total_steps", 0, "remove 'autoencoder' from config.stages"),
    ("grad_accum", 3, "config.stage1.batch_size: must be a multiple of grad_accum=3"),
    ("divergence_factor", -1.0, "config.stage1.divergence_factor"),
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
