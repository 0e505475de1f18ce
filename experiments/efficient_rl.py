r"""SafeLadder stage 3, safe-and-efficient RL: the svkg rewards with the length-conditional advantage.

  python -m safework.main --config experiments/efficient_rl.py:variant=7b,init=/runs/svkg_7b/policy,data=/data/svkg \
      --workdir /runs/efficient_7b

Long answers earn advantage only by beating the short ones of their group (safework_r1.md section 1, stage 3),
which trims overthinking without giving up correctness or safety.
"""

import ml_collections

from experiments import m3rl_svkg
from safework.experiment import parse_arg


def stage(variant: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  s = m3rl_svkg.stage(variant, runlocal)
  s.rollout.advantage = "length_conditional"
  s.rollout.length_lambda, s.rollout.length_alpha, s.rollout.length_beta = 0.5, 1.0, 0.0
  if variant == "tiny":
    s.train.rollouts = 2 if runlocal else 4
    # CANON divides by L_max for token-sum losses; with the sequence-mean loss and the KL term that makes the
    # policy gradient vanish next to the KL, so the tiny run keeps advantages on the GRPO scale.
    s.rollout.length_scale = 1.0
    s.rollout.length_alpha = 0.95   # long answers keep 95% of their reward against the short half's mean
    s.optim.learning_rate = 1e-4    # a gentle last stage: trim length, keep what the earlier stages gained
  else:
    s.train.rollouts = 50
  return s


def get_config(arg=None):
  config = m3rl_svkg.get_config(arg)   # the same knobs
  knobs = parse_arg(arg, variant="tiny", runlocal=False, init="", data="", safety_verifier="", value_verifier="",
                    knowledge_verifier="")
  config.update(stage(knobs.variant, knobs.runlocal))
  return config
