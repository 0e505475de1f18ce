r"""SafeLadder stage 3, safe-and-efficient RL: the svkg rewards with the length-conditional advantage.

  python -m safework.main --config experiments/efficient_rl.py:variant=7b,init=/runs/svkg_7b/policy,data=/data/svkg \
      --workdir /runs/efficient_7b

Long answers earn advantage only by beating the short ones of their group (safework_r1.md section 1, stage 3;
`safework.rl.advantages.length_conditional`), which trims overthinking without giving up correctness or safety.
Advantages stay on the reward's scale (length_scale 1): CANON's division by L_max = 8192 would leave the policy
gradient thousands of times below the KL term.
"""

import ml_collections

from experiments import m3rl_svkg


def stage(variant: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  s = m3rl_svkg.stage(variant, runlocal)
  s.rollout.advantage = "length_conditional"
  s.rollout.length_lambda, s.rollout.length_beta, s.rollout.length_scale = 0.5, 0.0, 1.0
  if variant == "tiny":
    s.rollout.num_rollouts = 2 if runlocal else 4
    s.rollout.length_alpha = 0.95   # long answers keep 95% of their reward against the short half's mean
    s.optim.learning_rate = 1e-4    # a gentle last stage: trim length, keep what the earlier stages gained
  else:
    s.rollout.num_rollouts = 50
    s.rollout.length_alpha = 0.9
  return s


def get_config(arg=None):
  return m3rl_svkg.get_config(arg, stage_fn=stage)   # the same knobs
