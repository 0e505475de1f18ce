#!/usr/bin/env bash
# Runs an experiment on every host of a TPU pod slice (v4/v5), multi-host through jax.distributed.
#
#   launch/tpu.sh TPU_NAME ZONE EXPERIMENT_FILE[:ARG] WORKDIR [--config.x=y ...]
#   launch/tpu.sh my-v5p-128 us-east5-a experiments/m3rl_svkg.py:variant=72b,init=gs://... gs://bucket/runs/svkg
#
# Idempotent: copies the repository, installs it (with the TPU extra) on every host, then starts
# `python -m safework.main` on all hosts at once. Hyperparameters live in the experiment file, not here.
set -euo pipefail
if [ $# -lt 4 ]; then
  sed -n '2,9p' "$0"; exit 2
fi
TPU_NAME=$1; ZONE=$2; CONFIG=$3; WORKDIR=$4; shift 4
REPO=$(cd "$(dirname "$0")/.." && pwd)
REMOTE_DIR=$(basename "$REPO")

gcloud compute tpus tpu-vm scp --zone "$ZONE" --worker=all --recurse \
  --scp-flag="--exclude=.venv" "$REPO" "$TPU_NAME:~/" >/dev/null
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  cd ~/$REMOTE_DIR
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[tpu]'
  SAFEWORK_DISTRIBUTED=1 nohup .venv/bin/python -m safework.main --config '$CONFIG' --workdir '$WORKDIR' $* \
    > ~/safework.log 2>&1 &
  echo started on \$(hostname)
"
