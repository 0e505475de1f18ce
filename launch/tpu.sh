#!/usr/bin/env bash
# Runs an experiment on every host of a TPU pod slice (v4/v5), multi-host through jax.distributed.
#
#   launch/tpu.sh [--dry-run] TPU_NAME ZONE EXPERIMENT_FILE[:ARG] WORKDIR [--config.x=y ...]
#   launch/tpu.sh my-v5p-128 us-east5-a experiments/m3rl_svkg.py:variant=72b,init=/mnt/runs/kg/policy /mnt/runs/svkg
#
# Idempotent: copies the repository, installs it (with the TPU extra) on every host, then starts
# `python -m safework.main` on all hosts at once; JAX finds each host's place in the slice itself. WORKDIR must be
# a directory every host sees (a Filestore/NFS or gcsfuse mount): checkpoints, the lock and the metrics live there.
# Hyperparameters live in the experiment file, not here. --dry-run prints the commands instead of running them.
set -euo pipefail
DRY_RUN=0
if [ "${1:-}" = "--dry-run" ]; then DRY_RUN=1; shift; fi
if [ $# -lt 4 ]; then
  sed -n '2,10p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=$(basename "$REPO")

# What every host runs (quoted once here, so the overrides reach python exactly as given).
printf -v MAIN '%q ' .venv/bin/python -m safework.main --config "$CONFIG" --workdir "$WORKDIR" "$@"
REMOTE="set -e; cd ~/$(printf '%q' "$REMOTE_DIR"); python3 -m venv .venv; .venv/bin/pip install -q -e '.[tpu]'; \
SAFEWORK_DISTRIBUTED=1 nohup ${MAIN% } > ~/safework.log 2>&1 & echo started on \$(hostname)"

run() {   # runs a command, or with --dry-run prints it, quoted as a shell would need it
  if [ "$DRY_RUN" = 0 ]; then "$@"; return; fi
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:=,@%+~-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  echo "${out[*]}"
}

run gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse --scp-flag=--exclude=.venv "$REPO" "$TPU_NAME:~/"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "$REMOTE"
