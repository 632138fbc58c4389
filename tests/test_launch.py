"""Tests of the launch scripts in launch/: dry-run plans, and the remote / job commands run against stubs.

The dry-run plans are checked for the pieces a launch cannot do without; the
commands that would run on a TPU worker or in a SLURM job are executed here
with stub `curl`, `python3`, `srun`, `scontrol` and `python`, so quoting and
the multi-host environment are checked, not just printed.
"""
import os
import pathlib
import shlex
import shutil
import signal
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = ROOT / "launch"
SCRIPTS = ["common.sh", "tpu_vm.sh", "slurm_gpu.sh", "slurm_gpu.sbatch"]
# Settings a caller may have exported; each test gives its own.
CLEAN_ENV = {k: v for k, v in os.environ.items() if k not in {
    "PROJECT", "ZONE", "TPU_NAME", "ACCELERATOR_TYPE", "RUNTIME_VERSION", "REPO_URL",
    "REPO_REF", "TARBALL", "WORKDIR", "CONFIG", "EXTRA_ARGS", "QUEUED", "SPOT", "DRY_RUN",
    "NODES", "GPUS_PER_NODE", "VENV", "REPO_DIR", "PARTITION", "WORKER"}}


def sh(*args, env=None, check=True, cwd=ROOT):
  """Runs a command; returns the CompletedProcess (text)."""
  proc = subprocess.run([str(a) for a in args], capture_output=True, text=True,
                        env={**CLEAN_ENV, **(env or {})}, cwd=cwd, timeout=60)
  if check and proc.returncode != 0:
    raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
  return proc


def plan(script, *args, env=None):
  """Dry-run commands of a script, each split into its words."""
  out = sh(script, "--dry-run", *args, env=env).stdout
  return [shlex.split(line[2:]) for line in out.splitlines() if line.startswith("+ ")]


def tpu(*args, env=None):
  return plan(LAUNCH / "tpu_vm.sh", "--zone=us-east5-a", "--name=ldm", *args, env=env)


def remote_command(cmd):
  """The --command value of a `gcloud ... ssh` plan line."""
  return cmd[cmd.index("--command") + 1]


def stub(directory, name, body):
  path = directory / name
  path.write_text("#!/usr/bin/env bash\n" + body)
  path.chmod(0o755)


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
  proc = sh("bash", LAUNCH / script, "--help")
  text = proc.stdout + proc.stderr
  assert "--dry-run" in text or "DRY_RUN" in text
  if script.endswith(".sbatch"):  # a job script: its header is its help
    assert "sbatch launch/slurm_gpu.sbatch" in text
  else:
    assert "Usage" in text


def test_tpu_queued_v5p_create_and_delete():
  (create, poll), = [tpu("create", "--accelerator-type=v5p-128", "--queued", "--spot")]
  assert create[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
  assert create[5] == "ldm-qr"
  for piece in ["--node-id=ldm", "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5",
                "--spot", "--zone=us-east5-a"]:
    assert piece in create
  assert poll[3:6] == ["queued-resources", "describe", "ldm-qr"]
  assert "--format=value(state.state)" in poll
  (delete,) = tpu("delete", "--queued")
  assert delete[3:6] == ["queued-resources", "delete", "ldm-qr"] and "--force" in delete


def test_tpu_vm_v4_create_and_delete():
  (create,) = tpu("create", "--accelerator-type=v4-8", "--preemptible", env={"PROJECT": "p"})
  assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "ldm"]
  for piece in ["--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base", "--preemptible",
                "--project=p"]:
    assert piece in create
  (delete,) = tpu("delete")
  assert delete[3:6] == ["tpu-vm", "delete", "ldm"] and "--quiet" in delete


def test_tpu_setup_git_and_tarball():
  (setup,) = tpu("setup", "--repo-url=https://example.com/ldm_jax.git", "--ref=v1")
  assert "--worker=all" in setup
  remote = remote_command(setup)
  assert "git clone https://example.com/ldm_jax.git ldm_jax" in remote
  assert "checkout v1" in remote and "pip install -e '.[tpu,gcs]'" in remote
  pack, scp, setup = tpu("setup", f"--tarball={ROOT}")
  assert pack[0] == "tar" and scp[3:5] == ["tpu-vm", "scp"] and "--worker=all" in scp
  assert "tar -xzf ldm_jax-src.tar.gz" in remote_command(setup)


def test_missing_settings_are_named():
  proc = sh(LAUNCH / "tpu_vm.sh", "create", "--dry-run", check=False)
  assert proc.returncode != 0 and "--zone" in proc.stderr and "TPU_NAME" in proc.stderr
  proc = sh(LAUNCH / "tpu_vm.sh", "train", "--dry-run", "--zone=z", "--name=n", check=False)
  assert proc.returncode != 0 and "WORKDIR" in proc.stderr
  proc = sh(LAUNCH / "tpu_vm.sh", "--zone", check=False)
  assert proc.returncode != 0 and "--zone needs a value" in proc.stderr


def _alive(pid):
  try:
    state = pathlib.Path(f"/proc/{pid}/status").read_text()
  except FileNotFoundError:
    return False
  return "\nState:\tZ" not in state


def test_tpu_train_command_runs_on_a_worker(tmp_path):
  (train,) = tpu("train", "--workdir=gs://b/run", "--config=configs/txt2img.py:size=base",
                 "--", "--config.lr=5e-5", "--config.name=a b",
                 env={"EXTRA_ARGS": "--config.total_steps=10"})
  (stop,) = tpu("stop")
  assert "--worker=all" in train and "--worker=all" in stop
  remote = remote_command(train)
  assert "nohup python3 -m ldm_jax.train" in remote and "--multihost" in remote
  # Run what the worker would run, with worker number 3 from the metadata stub.
  home, bin_dir = tmp_path / "home", tmp_path / "bin"
  (home / "ldm_jax").mkdir(parents=True)
  bin_dir.mkdir()
  stub(bin_dir, "curl", "echo 3\n")
  stub(bin_dir, "python3", 'printf "%s\\n" "$@"\nexec sleep 30\n')
  env = {"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}"}
  sh("bash", "-c", remote, env=env, cwd=home)
  pid = int((home / "ldm_jax_logs/train.pid").read_text())
  try:
    time.sleep(0.5)
    args = (home / "ldm_jax_logs/worker-3.log").read_text().splitlines()
    assert args == ["-m", "ldm_jax.train", "--config=configs/txt2img.py:size=base",
                    "--workdir=gs://b/run", "--multihost", "--config.total_steps=10",
                    "--config.lr=5e-5", "--config.name=a b"]
    again = sh("bash", "-c", remote, env=env, cwd=home, check=False)
    assert again.returncode != 0 and "already running" in again.stderr
    sh("bash", "-c", remote_command(stop), env=env, cwd=home)
    for _ in range(50):
      if not _alive(pid):
        break
      time.sleep(0.1)
    assert not _alive(pid)
  finally:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)
  (logs,) = tpu("logs", "--worker=3")
  assert "--worker=3" in logs and "worker-3.log" in remote_command(logs)


def slurm_plan(tmp_path, *args):
  """(job script text, sbatch command words) from slurm_gpu.sh --dry-run."""
  out = sh(LAUNCH / "slurm_gpu.sh", "--dry-run", f"--script-dir={tmp_path}", *args).stdout
  lines = out.splitlines()
  start, end = lines.index(next(l for l in lines if l.startswith("# job script "))), \
      lines.index("# end of job script")
  (sbatch,) = [shlex.split(l[2:]) for l in lines if l.startswith("+ ")]
  return "\n".join(lines[start + 1:end]) + "\n", sbatch


def test_slurm_dry_run(tmp_path):
  script, sbatch = slurm_plan(tmp_path, "--nodes=4", "--partition=gpu", "--workdir=/shared/run")
  assert sbatch[0] == "sbatch" and sbatch[-1].startswith(str(tmp_path))
  for piece in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu"]:
    assert piece in sbatch
  assert "scontrol show hostnames" in script and "LDM_COORDINATOR" in script
  assert "srun " in script and "python -m ldm_jax.train" in script and "--multihost" in script
  assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_slurm_job_script_runs(tmp_path):
  """Runs the generated job script with a 2-node srun stub; checks each task's view."""
  script, _ = slurm_plan(tmp_path, "--gpus-per-node=4", "--workdir=/shared/run", "--port=1234",
                         f"--repo-dir={tmp_path}", "--", "--config.lr=5e-5", "--config.name=a b")
  job = tmp_path / "job.sbatch"
  job.write_text(script)
  bin_dir, out = tmp_path / "bin", tmp_path / "out"
  bin_dir.mkdir()
  out.mkdir()
  stub(bin_dir, "scontrol", 'echo gpu-node7; echo gpu-node8\n')
  # srun: drop its own options, start one task per node with SLURM_PROCID set.
  stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\n'
       'for ((i = 0; i < SLURM_NNODES; i++)); do SLURM_PROCID=$i "$@" || exit 1; done\n')
  stub(bin_dir, "python", f'f={out}/task-$LDM_PROCESS_ID\n'
       'printf "%s\\n" "$@" > "$f.args"\n'
       'echo "$LDM_COORDINATOR $LDM_NUM_PROCESSES $JAX_LOCAL_DEVICE_IDS" > "$f.env"\n')
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "77", "SLURM_NNODES": "2",
         "SLURM_JOB_NODELIST": "gpu-node[7-8]"}
  dry = sh("bash", job, "--dry-run", env=env, cwd=tmp_path).stdout
  assert "+ srun " in dry and "--multihost" in dry and not list(out.iterdir())
  sh("bash", job, env=env, cwd=tmp_path)
  for task in (0, 1):
    args = (out / f"task-{task}.args").read_text().splitlines()
    assert args == ["-m", "ldm_jax.train", "--config=configs/txt2img.py", "--workdir=/shared/run",
                    "--multihost", "--config.lr=5e-5", "--config.name=a b"]
    assert (out / f"task-{task}.env").read_text().split() == ["gpu-node7:1234", "2", "0,1,2,3"]


def test_shellcheck(tmp_path):
  shutil.which("shellcheck") or pytest.skip("shellcheck not installed")
  script, _ = slurm_plan(tmp_path, "--workdir=/shared/run", "--", "--config.lr=5e-5")
  generated = tmp_path / "generated.sbatch"
  generated.write_text(script)
  files = [LAUNCH / s for s in SCRIPTS] + [generated]
  proc = sh("shellcheck", "-x", "--shell=bash", *files, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
