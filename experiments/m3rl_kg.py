r"""SafeLadder stage 2A, M³-RL "kg": RL on knowledge and general data, from the SFT checkpoint.

  python -m safework.main --config experiments/m3rl_kg.py:variant=7b,init=/runs/sft_7b/policy,data=/data/kg,\
knowledge_verifier=/ckpt/SafeWork-RM-Knowledge-72B --workdir /runs/kg_7b

Stage A uses the PPO clipped-ratio surrogate (safework_r1.md section 2), k3 KL to the stage's start, beta 0.001.
The stage trains on the rows whose labels have a recipe; rows with other known labels are left out.
"""

import ml_collections

from experiments import common
from safework.experiment import parse_arg, section
from safework.rl.losses import LossSettings
from safework.rl.optim import OptimSettings
from safework.rl.rollout import RolloutSettings
from safework.training import TrainSettings

RECIPES = {"general_rule": [["math_rule", 1.0]], "knowledge_rule": [["math_rule", 1.0], ["helpfulness", 1.0]],
           "general": [["graded_correctness", 1.0]], "knowledge": [["knowledge", 1.0], ["helpfulness", 1.0]],
           "normal": [["helpfulness", 1.0]], "muldimif": [["instruction_following", 1.0], ["helpfulness", 1.0]]}


def tiny_rl(rollouts: int, loss: str) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.kind = "rl"
  s.rollout = section(RolloutSettings, num_rollouts=rollouts, prompts_per_rollout=16, max_new_tokens=48,
                      max_prompt_length=80, minibatch_size=64)
  s.loss = section(LossSettings, policy_loss=loss, eps_high=0.28)
  s.optim = section(OptimSettings, learning_rate=5e-4, warmup_fraction=0.0)
  s.train = section(TrainSettings, micro_batch_size=32, logprob_chunk=64, checkpoint_every=50, keep_checkpoints=1)
  return s


def stage(variant: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  if variant == "tiny":
    s = tiny_rl(rollouts=7 if runlocal else 8, loss="ppo")
    s.reward = dict(format_weight=1.0, recipes={"general_rule": RECIPES["general_rule"],
                                                "knowledge_rule": [["math_rule", 1.0]]})
    return s
  s = ml_collections.ConfigDict()
  s.kind = "rl"
  s.rollout = section(RolloutSettings, num_rollouts=100, **common.PAPER_ROLLOUT)
  s.loss = section(LossSettings, policy_loss="ppo", eps_high=0.28)
  s.optim = section(OptimSettings)
  s.train = common.paper_train()
  s.reward = dict(format_weight=1.0, recipes=RECIPES, rules={}, verifiers={})
  return s


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", runlocal=False, init="", data="", knowledge_verifier="")
  config = common.base(arg.variant, arg.init or None)
  config.update(stage(arg.variant, arg.runlocal))
  config.task = "user"
  config.data = common.user_data(arg.data or None)
  if arg.variant != "tiny":
    config.reward.verifiers = {n: common.judge(arg.knowledge_verifier, n, "knowledge")
                               for n in ("knowledge", "helpfulness", "graded_correctness")}
  return config
