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
  rl_trainer_from_config(config, workdir).run()


def run_sft(config, workdir: str) -> None:
  from safework import sharding
  from safework.data.user_builders import user_example
  from safework.experiment import settings
  from safework.models import save_pretrained
  from safework.policy import PolicySettings, load_policy
  from safework.rl.build import rules_of, user_rows
  from safework.rl.optim import OptimSettings
  from safework.sft import SFTSettings, SFTTrainer
  mesh, rules = sharding.make_mesh(dict(config.mesh)), rules_of(config)
  traces = [user_example(row) for row in user_rows(config, workdir)]
  missing = [i for i, (_, trace) in enumerate(traces) if not trace]
  if missing:
    raise ValueError(f"SFT rows need a 'response' trace; rows {missing[:10]} have none")
  model, params, processor = load_policy(settings(PolicySettings, config.model, seed=config.seed), mesh, rules, workdir)
  params = SFTTrainer(model=model, params=params, processor=processor, traces=traces,
                      settings=settings(SFTSettings, config.sft, seed=config.seed),
                      optim=settings(OptimSettings, config.optim), workdir=workdir, mesh=mesh, rules=rules).run()
  save_pretrained(os.path.join(workdir, "policy"), model, params)
  processor.save_pretrained(os.path.join(workdir, "policy"))


def run_safeladder(config, workdir: str) -> None:
  from safework.ladder import run_ladder
  report = run_ladder(config, workdir)
  logging.info("report written to %s", report)


JOBS = {"rl": run_rl, "sft": run_sft, "safeladder": run_safeladder}


def main(argv) -> None:
  del argv
  if os.environ.get("SAFEWORK_DISTRIBUTED") == "1":
    import jax
    jax.distributed.initialize()   # before anything touches the devices
  config = _CONFIG.value
  import jax
  # Compilations are cached on disk: a re-run (or a resumed run) does not compile again.
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/safework/jax")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if config.job not in JOBS:
    raise ValueError(f"config.job={config.job!r}; choose one of {sorted(JOBS)}")
  os.makedirs(_WORKDIR.value, exist_ok=True)
  from safework.preemption import Preempted
  try:
    JOBS[config.job](config, _WORKDIR.value)
  except Preempted as e:   # a checkpoint was saved: exit cleanly so the scheduler re-runs the same command
    logging.warning("%s", e)


if __name__ == "__main__":
  app.run(main)
