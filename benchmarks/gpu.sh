#!/usr/bin/env bash
# The GPU checks of issue #11 on one H100/H200, in under 8 minutes; prints one JSON line per measurement.
#
#   bash benchmarks/gpu.sh            # on the GPU machine, from the repository root
#
# It uses the machine's own python3 with its JAX (CUDA) and PyTorch (for the transformers peer); the repository is
# put on PYTHONPATH, nothing is installed. Goals (issue #11): 3B bf16 decode at 64 prompts x 8 samples >= 50% of
# the copy-bandwidth roofline and >= 5x transformers generate; batch-1 decode >= 80% of the roofline; 3B train
# step MFU >= 40%. Record the numbers in benchmarks/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=.90
PY=${PYTHON:-python3}
run() { echo "### $*" >&2; timeout "${STEP_TIMEOUT:-240}" "$PY" -m safework.bench "$@"; }

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >&2 || true
# 1. 3B decode, 64 prompts x 8 samples, bf16 (the sampling copy production decodes from), with transformers.
run sampler --preset 3b --dtype bfloat16 --batch 64 --group 8 --prompt_len 256 --gen_len 256
# 2. Batch-1 decode (weight bandwidth bound).
run sampler --preset 3b --dtype bfloat16 --batch 1 --group 1 --prompt_len 256 --gen_len 256 --no_peer
# 3. Decode cost against the reserved cache, and ragged row lengths.
run sampler --case cache_cost --preset 3b --dtype bfloat16 --batch 64 --prompt_len 64 --gen_len 64
run sampler --case ragged --preset 3b --dtype bfloat16 --batch 64 --prompt_len 64
# 4. The 3B train step (bf16 compute, fp32 masters, full remat): tokens/s and MFU.
run train --preset 3b --dtype bfloat16 --remat full --batch 16 --micro_batch 8 --prompt_len 1024 --gen_len 1024
