#!/usr/bin/env bash
# Shared helpers for the ldm_jax launch scripts: logging, dry-run, argument parsing.
#
# Source it, do not run it:  source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# With DRY_RUN=1, `run` prints each command (shell-quoted, one per line, prefixed
# with "+ ") on stdout instead of running it, so a dry run is a readable,
# copy-pasteable plan. Log lines go to stderr so they never mix with that plan.

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  cat >&2 <<'USAGE'
Usage: source launch/common.sh   (a library for the other launch scripts)
Helpers: log, die, shell_quote, run (prints instead of running when DRY_RUN=1,
which the scripts' --dry-run sets), split_eq_args, need_value, require, split_words.
USAGE
  [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]] && exit 0
  exit 2
fi

DRY_RUN="${DRY_RUN:-0}"
LOG_PREFIX="${LOG_PREFIX:-ldm_jax}"

# log MESSAGE...: a timestamped line on stderr.
log() {
  printf '[%s %s] %s\n' "$LOG_PREFIX" "$(date '+%H:%M:%S')" "$*" >&2
}

# die MESSAGE...: log the message and exit 1.
die() {
  log "error: $*"
  exit 1
}

# shell_quote ARG...: print ARGs joined by spaces, each quoted only when it
# needs to be, so the line can be pasted into a shell and reads like one.
shell_quote() {
  local out="" arg
  for arg in "$@"; do
    if [[ -n "$arg" && "$arg" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ && "$arg" != "~"* ]]; then
      out+="$arg "
    else
      # Single quotes keep everything literal; an embedded ' becomes '\''.
      out+="'${arg//\'/\'\\\'\'}' "
    fi
  done
  printf '%s' "${out% }"
}

# run CMD ARG...: run the command, or print it when DRY_RUN=1.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+ %s\n' "$(shell_quote "$@")"
  else
    log "running: $(shell_quote "$@")"
    "$@"
  fi
}

# split_eq_args ARG...: sets the array SPLIT_ARGS to ARGs with every
# "--name=value" before a bare "--" turned into "--name" "value", so parsers
# only handle the "--name value" form. Arguments after "--" are left alone
# (they are passed on, e.g. "--config.lr=5e-5").
split_eq_args() {
  SPLIT_ARGS=()
  local passthrough=0 arg
  for arg in "$@"; do
    if [[ "$passthrough" == 1 ]]; then
      SPLIT_ARGS+=("$arg")
    elif [[ "$arg" == "--" ]]; then
      passthrough=1
      SPLIT_ARGS+=("$arg")
    elif [[ "$arg" == --*=* ]]; then
      SPLIT_ARGS+=("${arg%%=*}" "${arg#*=}")
    else
      SPLIT_ARGS+=("$arg")
    fi
  done
}

# need_value FLAG [VALUE]: fail unless the flag was given a value.
# Call as `need_value "$@"` inside a `case "$1"` branch, then `shift 2`.
need_value() {
  if [[ $# -lt 2 || "$2" == --* ]]; then
    die "flag $1 needs a value"
  fi
}

# require NAME...: fail naming each variable (and its flag) that is empty.
require() {
  local name flag missing=()
  for name in "$@"; do
    if [[ -z "${!name:-}" ]]; then
      flag="--$(tr '[:upper:]_' '[:lower:]-' <<<"$name")"
      missing+=("$name (env) / $flag")
    fi
  done
  if [[ ${#missing[@]} -gt 0 ]]; then
    die "missing required setting(s): ${missing[*]}"
  fi
}

# split_words STRING: sets the array WORDS to STRING split on whitespace
# (used for EXTRA_ARGS given as one environment variable).
# shellcheck disable=SC2034  # WORDS is read by the sourcing script
split_words() {
  WORDS=()
  if [[ -n "${1:-}" ]]; then
    read -r -a WORDS <<<"$1"
  fi
}
