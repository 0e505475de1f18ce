#!/usr/bin/env bash
# Plans paper-scale experiments on the slices they name and keeps the tables for benchmarks/PLAN.md:
#   bash benchmarks/plan.sh m3rl_svkg:3b m3rl_svkg:7b sft:3b ...   (default: every stage file x every variant)
# Each plan is written to benchmarks/plans/STAGE-VARIANT.{txt,json}. Needs libtpu (pip install -e '.[plan]').
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for stage in sft m3rl_kg m3rl_svkg efficient_rl deliberative_search; do for v in 3b 7b 32b 72b; do targets+=("$stage:$v"); done; done
fi
mkdir -p benchmarks/plans
for target in "${targets[@]}"; do
  stage=${target%%:*} variant=${target##*:}
  out=benchmarks/plans/$stage-$variant
  echo "### $stage $variant" >&2
  "$PY" -m safework.plan --config "experiments/$stage.py:variant=$variant" --json "$out.json" > "$out.txt"
  echo "exit $? ($stage $variant)" >&2
done
