r"""The entry point: one experiment file, one work directory.

  python -m safework.main --config experiments/toy_rl.py --workdir /tmp/toy_rl
  python -m safework.main --config experiments/toy_rl.py:runlocal --workdir /tmp/toy --config.train.rollouts=3

Re-running the same command resumes from the work directory's latest checkpoint. On TPU pods,
`launch/tpu.sh` sets SAFEWORK_DISTRIBUTED=1 so that every host joins `jax.distributed` first.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (and :arguments).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: checkpoints, metrics, reports.", required=True)


def run_rl(config, workdir: str) -> None:
  from safework.rl.build import rl_trainer_from_config
  from safework.rl.trainer import Preempted
  try:
    rl_trainer_from_config(config, workdir).run()
  except Preempted as e:
    logging.warning("%s", e)


JOBS = {"rl": run_rl}


def main(argv) -> None:
  del argv
  if os.environ.get("SAFEWORK_DISTRIBUTED") == "1":
    import jax
    jax.distributed.initialize()
  config = _CONFIG.value
  if config.job not in JOBS:
    raise ValueError(f"config.job={config.job!r}; choose one of {sorted(JOBS)}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  JOBS[config.job](config, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
