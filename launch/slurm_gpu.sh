#!/usr/bin/env bash
# Submits launch/slurm_gpu.sbatch: writes a job script with the settings given
# here filled in (kept beside the job's output, so a run can be repeated) and
# calls sbatch with the resource flags, which override the script's #SBATCH lines.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"
LOG_PREFIX="slurm_gpu"
TEMPLATE="$SCRIPT_DIR/slurm_gpu.sbatch"

usage() {
  cat <<'USAGE'
Usage: launch/slurm_gpu.sh [options] [-- extra train flags]

Writes a job script from launch/slurm_gpu.sbatch and submits it with sbatch.
Every node runs one `python -m ldm_jax.train --config=CONFIG --workdir=WORKDIR
--multihost` task that sees all GPUs of its node; the first node of
`scontrol show hostnames $SLURM_JOB_NODELIST` is the coordinator.
Install first, on a shared filesystem: pip install -e ".[cuda]" (in a venv).

Options (environment variable in brackets; flags win):
  --nodes N            number of nodes [NODES] (default 2)
  --gpus-per-node G    GPUs per node [GPUS_PER_NODE] (default 8)
  --cpus-per-task C    CPUs for each node's task [CPUS_PER_TASK] (default 32)
  --partition P        partition [PARTITION]
  --account A          account [ACCOUNT]
  --time T             time limit, e.g. 24:00:00 [TIME_LIMIT]
  --job-name J         job name [JOB_NAME] (default ldm_jax)
  --config C           config, e.g. configs/txt2img.py:size=base [CONFIG]
  --workdir DIR        checkpoint dir every node can write [WORKDIR] (required)
  --repo-dir DIR       checkout to run from [REPO_DIR] (default: this repo)
  --venv DIR           virtualenv activated on every node [VENV]
  --port P             coordinator port [COORDINATOR_PORT] (default from job id)
  --script-dir DIR     where the job script is written [SCRIPT_OUT_DIR]
                       (default ./slurm_jobs)
  --dry-run            print the job script and the sbatch command [DRY_RUN=1]
  -h, --help           this help

EXTRA_ARGS (a whitespace-separated string) and the words after -- are added to
the train command, e.g. -- --config.lr=5e-5
USAGE
}

NODES="${NODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
CPUS_PER_TASK="${CPUS_PER_TASK:-32}"
PARTITION="${PARTITION:-}"
ACCOUNT="${ACCOUNT:-}"
TIME_LIMIT="${TIME_LIMIT:-}"
JOB_NAME="${JOB_NAME:-ldm_jax}"
CONFIG="${CONFIG:-configs/txt2img.py}"
WORKDIR="${WORKDIR:-}"
REPO_DIR="${REPO_DIR:-$(cd "$SCRIPT_DIR/.." && pwd)}"
VENV="${VENV:-}"
COORDINATOR_PORT="${COORDINATOR_PORT:-}"
SCRIPT_OUT_DIR="${SCRIPT_OUT_DIR:-$PWD/slurm_jobs}"
PASSTHROUGH=()

split_eq_args "$@"
set -- "${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --nodes) need_value "$@"; NODES="$2"; shift 2 ;;
    --gpus-per-node) need_value "$@"; GPUS_PER_NODE="$2"; shift 2 ;;
    --cpus-per-task) need_value "$@"; CPUS_PER_TASK="$2"; shift 2 ;;
    --partition) need_value "$@"; PARTITION="$2"; shift 2 ;;
    --account) need_value "$@"; ACCOUNT="$2"; shift 2 ;;
    --time) need_value "$@"; TIME_LIMIT="$2"; shift 2 ;;
    --job-name) need_value "$@"; JOB_NAME="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --repo-dir) need_value "$@"; REPO_DIR="$2"; shift 2 ;;
    --venv) need_value "$@"; VENV="$2"; shift 2 ;;
    --port) need_value "$@"; COORDINATOR_PORT="$2"; shift 2 ;;
    --script-dir) need_value "$@"; SCRIPT_OUT_DIR="$2"; shift 2 ;;
    --) shift; PASSTHROUGH=("$@"); break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
require WORKDIR
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] ||
  die "--gpus-per-node must be a positive integer, got '$GPUS_PER_NODE'"

# The settings block replaces the template's "# @settings@" line; the
# template's own defaults below it only fill what is still unset.
settings_block() {
  local name
  echo "# Written by launch/slurm_gpu.sh on $(date '+%Y-%m-%d %H:%M:%S')"
  for name in CONFIG WORKDIR REPO_DIR VENV GPUS_PER_NODE COORDINATOR_PORT; do
    if [[ -n "${!name}" ]]; then
      printf '%s=%s\n' "$name" "$(shell_quote "${!name}")"
    fi
  done
  split_words "${EXTRA_ARGS:-}"
  local extra=("${WORDS[@]+"${WORDS[@]}"}" "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}")
  if [[ ${#extra[@]} -gt 0 ]]; then
    printf 'set -- %s "$@"\n' "$(shell_quote "${extra[@]}")"
  fi
}

generate_script() {
  local line
  while IFS= read -r line || [[ -n "$line" ]]; do
    if [[ "$line" == "# @settings@"* ]]; then
      settings_block
    else
      printf '%s\n' "$line"
    fi
  done <"$TEMPLATE"
}

JOB_SCRIPT="$SCRIPT_OUT_DIR/${JOB_NAME}-$(date '+%Y%m%d-%H%M%S').sbatch"
SBATCH=(sbatch --job-name="$JOB_NAME" --nodes="$NODES" --ntasks-per-node=1
        --gpus-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK")
if [[ -n "$PARTITION" ]]; then SBATCH+=(--partition="$PARTITION"); fi
if [[ -n "$ACCOUNT" ]]; then SBATCH+=(--account="$ACCOUNT"); fi
if [[ -n "$TIME_LIMIT" ]]; then SBATCH+=(--time="$TIME_LIMIT"); fi
SBATCH+=(--output="$SCRIPT_OUT_DIR/%x-%j.out" "$JOB_SCRIPT")

if [[ "$DRY_RUN" == 1 ]]; then
  printf '# job script %s:\n' "$JOB_SCRIPT"
  generate_script
  printf '# end of job script\n'
else
  mkdir -p "$SCRIPT_OUT_DIR"
  generate_script >"$JOB_SCRIPT"
  log "wrote $JOB_SCRIPT"
fi
run "${SBATCH[@]}"
