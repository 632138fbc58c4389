#!/usr/bin/env bash
# Cloud TPU VM / pod slice launcher for ldm_jax: create, set up, train, follow
# logs, ssh and delete. Every worker of a slice runs the same
# `python3 -m ldm_jax.train ... --multihost`; jax.distributed.initialize()
# finds the coordinator and process ids from the TPU metadata by itself.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=launch/common.sh
source "$SCRIPT_DIR/common.sh"
LOG_PREFIX="tpu_vm"

usage() {
  cat <<'USAGE'
Usage: launch/tpu_vm.sh SUBCOMMAND [options] [-- extra train flags | ssh command]

Subcommands:
  create   create the TPU VM / pod slice (optionally as a queued resource and
           wait until it is ACTIVE)
  setup    install ldm_jax on every worker: git clone REPO_URL (or scp and
           unpack a tarball / a local checkout), then pip install -e ".[tpu,gcs]"
  train    start `python3 -m ldm_jax.train --config=CONFIG --workdir=WORKDIR
           --multihost EXTRA_ARGS` on all workers in the background (nohup);
           each worker appends to ~/ldm_jax_logs/worker-N.log
  logs     follow the log of worker 0 (or --worker N)
  stop     stop the training process started by `train` on all workers
  ssh      ssh to worker 0 (or --worker N / all); words after -- are run there
  status   describe the TPU (or the queued resource)
  delete   delete the TPU VM (or the queued resource, with its node)

Options (environment variable in brackets; flags win):
  --project P            GCP project [PROJECT] (default: gcloud's configured one)
  --zone Z               zone, e.g. us-central2-b [ZONE]            (required)
  --name N               TPU name [TPU_NAME]                        (required)
  --accelerator-type T   v4-8, v5litepod-16, v5p-128, ... [ACCELERATOR_TYPE]
                         (default v4-8)
  --version V            runtime [RUNTIME_VERSION]; default from the type:
                         v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                         v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --queued               create/delete through a queued resource [QUEUED=1]
  --qr-id ID             queued-resource id [QR_ID] (default NAME-qr)
  --valid-until D        queued request expires after D, e.g. 6h [VALID_UNTIL]
  --spot                 spot capacity (tpu-vm and queued) [SPOT=1]
  --preemptible          preemptible TPU VM (not queued) [PREEMPTIBLE=1]
  --reserved             use a reservation (queued only) [RESERVED=1]
  --repo-url URL         git URL cloned by setup [REPO_URL]
  --ref REF              branch, tag or commit to check out [REPO_REF]
  --tarball PATH         setup from a .tar.gz, or from a local directory that
                         is packed first (uncommitted files included) [TARBALL]
  --extras E             pip extras installed by setup [PIP_EXTRAS] (tpu,gcs)
  --workdir DIR          checkpoint/log dir, a gs:// path on pods [WORKDIR]
  --config C             config, e.g. configs/txt2img.py:size=base [CONFIG]
                         (default configs/txt2img.py)
  --worker W             worker for logs/ssh: a number or all [WORKER] (0)
  --dry-run              print every command instead of running it [DRY_RUN=1]
  -h, --help             this help

EXTRA_ARGS (a whitespace-separated string) and the words after -- are added to
the train command, e.g. -- --config.lr=5e-5 --config.batch_size=256
USAGE
}

PROJECT="${PROJECT:-}"
ZONE="${ZONE:-}"
TPU_NAME="${TPU_NAME:-}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
QUEUED="${QUEUED:-0}"
QR_ID="${QR_ID:-}"
VALID_UNTIL="${VALID_UNTIL:-}"
SPOT="${SPOT:-0}"
PREEMPTIBLE="${PREEMPTIBLE:-0}"
RESERVED="${RESERVED:-0}"
REPO_URL="${REPO_URL:-}"
REPO_REF="${REPO_REF:-}"
TARBALL="${TARBALL:-}"
PIP_EXTRAS="${PIP_EXTRAS:-tpu,gcs}"
WORKDIR="${WORKDIR:-}"
CONFIG="${CONFIG:-configs/txt2img.py}"
WORKER="${WORKER:-0}"
POLL_SECONDS="${POLL_SECONDS:-60}"
# Paths on the workers, relative to the login home directory.
REMOTE_DIR="ldm_jax"
REMOTE_LOGS="ldm_jax_logs"

SUBCOMMAND=""
PASSTHROUGH=()
split_eq_args "$@"
set -- "${SPLIT_ARGS[@]+"${SPLIT_ARGS[@]}"}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry-run) DRY_RUN=1; shift ;;
    --project) need_value "$@"; PROJECT="$2"; shift 2 ;;
    --zone) need_value "$@"; ZONE="$2"; shift 2 ;;
    --name|--tpu-name) need_value "$@"; TPU_NAME="$2"; shift 2 ;;
    --accelerator-type) need_value "$@"; ACCELERATOR_TYPE="$2"; shift 2 ;;
    --version|--runtime-version) need_value "$@"; RUNTIME_VERSION="$2"; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --qr-id) need_value "$@"; QR_ID="$2"; shift 2 ;;
    --valid-until) need_value "$@"; VALID_UNTIL="$2"; shift 2 ;;
    --spot) SPOT=1; shift ;;
    --preemptible) PREEMPTIBLE=1; shift ;;
    --reserved) RESERVED=1; shift ;;
    --repo-url) need_value "$@"; REPO_URL="$2"; shift 2 ;;
    --ref) need_value "$@"; REPO_REF="$2"; shift 2 ;;
    --tarball) need_value "$@"; TARBALL="$2"; shift 2 ;;
    --extras) need_value "$@"; PIP_EXTRAS="$2"; shift 2 ;;
    --workdir) need_value "$@"; WORKDIR="$2"; shift 2 ;;
    --config) need_value "$@"; CONFIG="$2"; shift 2 ;;
    --worker) need_value "$@"; WORKER="$2"; shift 2 ;;
    --) shift; PASSTHROUGH=("$@"); break ;;
    -*) die "unknown option $1 (see --help)" ;;
    *)
      [[ -z "$SUBCOMMAND" ]] || die "only one subcommand allowed, got '$SUBCOMMAND' and '$1'"
      SUBCOMMAND="$1"; shift ;;
  esac
done
[[ -n "$SUBCOMMAND" ]] || { usage >&2; die "no subcommand given"; }

if [[ -z "$RUNTIME_VERSION" ]]; then
  case "$ACCELERATOR_TYPE" in
    v5litepod-*|v5e-*) RUNTIME_VERSION="v2-alpha-tpuv5-lite" ;;
    v5p-*) RUNTIME_VERSION="v2-alpha-tpuv5" ;;
    v6e-*) RUNTIME_VERSION="v2-alpha-tpuv6e" ;;
    *) RUNTIME_VERSION="tpu-ubuntu2204-base" ;;
  esac
fi
QR_ID="${QR_ID:-${TPU_NAME}-qr}"

# Location flags shared by every gcloud call.
gcloud_loc() {
  LOC=(--zone="$ZONE")
  if [[ -n "$PROJECT" ]]; then LOC+=(--project="$PROJECT"); fi
}

# on_workers WORKER REMOTE_COMMAND: run a shell command on one worker or all.
on_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$1" --command "$2"
}

cmd_create() {
  [[ "$SPOT" == 1 && ( "$PREEMPTIBLE" == 1 || "$RESERVED" == 1 ) ]] &&
    die "--spot cannot be combined with --preemptible or --reserved"
  if [[ "$QUEUED" == 1 ]]; then
    [[ "$PREEMPTIBLE" == 1 ]] && die "--preemptible is for plain TPU VMs; use --spot with --queued"
    local cmd=(gcloud compute tpus queued-resources create "$QR_ID" --node-id="$TPU_NAME"
               "${LOC[@]}" --accelerator-type="$ACCELERATOR_TYPE"
               --runtime-version="$RUNTIME_VERSION")
    if [[ "$SPOT" == 1 ]]; then cmd+=(--spot); fi
    if [[ "$RESERVED" == 1 ]]; then cmd+=(--reserved); fi
    if [[ -n "$VALID_UNTIL" ]]; then cmd+=(--valid-until-duration="$VALID_UNTIL"); fi
    run "${cmd[@]}"
    wait_active
  else
    [[ "$RESERVED" == 1 ]] && die "--reserved needs --queued"
    local cmd=(gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}"
               --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION")
    if [[ "$SPOT" == 1 ]]; then cmd+=(--spot); fi
    if [[ "$PREEMPTIBLE" == 1 ]]; then cmd+=(--preemptible); fi
    run "${cmd[@]}"
  fi
}

# A queued resource is granted whenever capacity frees up: poll its state.
wait_active() {
  local describe=(gcloud compute tpus queued-resources describe "$QR_ID" "${LOC[@]}"
                  --format='value(state.state)')
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '# poll every %ss until the state is ACTIVE:\n' "$POLL_SECONDS"
    run "${describe[@]}"
    return
  fi
  local state
  while true; do
    state="$("${describe[@]}")"
    log "queued resource $QR_ID: $state"
    case "$state" in
      ACTIVE) return ;;
      FAILED|SUSPENDED) die "queued resource $QR_ID is $state" ;;
    esac
    sleep "$POLL_SECONDS"
  done
}

cmd_setup() {
  local fetch
  if [[ -n "$TARBALL" ]]; then
    local archive="$TARBALL"
    if [[ -d "$TARBALL" ]]; then
      archive="${TMPDIR:-/tmp}/ldm_jax-src.tar.gz"
      run tar -czf "$archive" --exclude=.git --exclude='*.egg-info' --exclude=__pycache__ \
        -C "$TARBALL" .
    elif [[ "$DRY_RUN" != 1 && ! -f "$TARBALL" ]]; then
      die "--tarball $TARBALL: no such file or directory"
    fi
    run gcloud compute tpus tpu-vm scp "$archive" "$TPU_NAME:ldm_jax-src.tar.gz" \
      "${LOC[@]}" --worker=all
    fetch="rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar -xzf ldm_jax-src.tar.gz -C $REMOTE_DIR"
  else
    [[ -n "$REPO_URL" ]] || die "setup needs REPO_URL (env) / --repo-url, or TARBALL / --tarball"
    fetch="rm -rf $REMOTE_DIR && git clone $(shell_quote "$REPO_URL") $REMOTE_DIR"
    if [[ -n "$REPO_REF" ]]; then
      fetch+=" && git -C $REMOTE_DIR checkout $(shell_quote "$REPO_REF")"
    fi
  fi
  # setuptools>=64 is needed for editable installs from setup.py (PEP 660).
  on_workers all "set -e; $fetch; python3 -m pip install -U pip 'setuptools>=64' wheel; \
cd $REMOTE_DIR && python3 -m pip install -e $(shell_quote ".[$PIP_EXTRAS]")"
}

cmd_train() {
  require WORKDIR
  [[ "$WORKDIR" == gs://* ]] ||
    log "warning: WORKDIR=$WORKDIR is not a gs:// path; workers of a pod slice do not share disks"
  split_words "${EXTRA_ARGS:-}"
  local train=(python3 -m ldm_jax.train --config="$CONFIG" --workdir="$WORKDIR" --multihost
               "${WORDS[@]+"${WORDS[@]}"}" "${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}")
  local pidfile="$REMOTE_LOGS/train.pid"
  # agent-worker-number is the index gcloud's --worker uses, so `logs --worker N`
  # finds worker N's file. A live pid file means the TPU is still held.
  # shellcheck disable=SC2016  # $W, $! and $(...) expand on the worker
  on_workers all "set -e; cd $REMOTE_DIR; mkdir -p ~/$REMOTE_LOGS; \
if [ -f ~/$pidfile ] && kill -0 \"\$(cat ~/$pidfile)\" 2>/dev/null; then \
echo \"training already running (pid \$(cat ~/$pidfile)); run stop first\" >&2; exit 1; fi; \
"'W=$(curl -sf -H Metadata-Flavor:Google http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || hostname); '"\
nohup $(shell_quote "${train[@]}") >> ~/$REMOTE_LOGS/worker-\$W.log 2>&1 < /dev/null & \
echo \$! > ~/$pidfile; echo \"worker \$W: pid \$!, log ~/$REMOTE_LOGS/worker-\$W.log\""
}

cmd_stop() {
  on_workers all "if [ -f ~/$REMOTE_LOGS/train.pid ]; then \
kill \"\$(cat ~/$REMOTE_LOGS/train.pid)\" 2>/dev/null || true; rm -f ~/$REMOTE_LOGS/train.pid; fi"
}

cmd_logs() {
  [[ "$WORKER" =~ ^[0-9]+$ ]] || die "logs needs one worker number, got --worker $WORKER"
  on_workers "$WORKER" "tail -n 200 -F ~/$REMOTE_LOGS/worker-$WORKER.log"
}

cmd_ssh() {
  local cmd=(gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$WORKER")
  if [[ ${#PASSTHROUGH[@]} -gt 0 ]]; then cmd+=(--command "${PASSTHROUGH[*]}"); fi
  run "${cmd[@]}"
}

cmd_status() {
  if [[ "$QUEUED" == 1 ]]; then
    run gcloud compute tpus queued-resources describe "$QR_ID" "${LOC[@]}"
  else
    run gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}"
  fi
}

cmd_delete() {
  if [[ "$QUEUED" == 1 ]]; then
    # --force also deletes the TPU node the queued resource created.
    run gcloud compute tpus queued-resources delete "$QR_ID" "${LOC[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}" --quiet
  fi
}

case "$SUBCOMMAND" in
  create|setup|train|stop|logs|ssh|status|delete) ;;
  *) die "unknown subcommand '$SUBCOMMAND' (see --help)" ;;
esac
require ZONE TPU_NAME
gcloud_loc
"cmd_$SUBCOMMAND"
