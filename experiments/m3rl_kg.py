r"""SafeLadder stage 2A, M³-RL "kg": RL on knowledge and general data, from the SFT checkpoint.

  python -m safework.main --config experiments/m3rl_kg.py:variant=7b,init=/runs/sft_7b/policy,data=/data/kg \
      --workdir /runs/kg_7b

Stage A uses the PPO clipped-ratio surrogate (safework_r1.md section 2), k3 KL to the stage's start, beta 0.001.
"""

import ml_collections

from experiments import common
from safework.experiment import parse_arg

LABELS = ("general_rule", "knowledge_rule", "general", "knowledge", "normal", "muldimif")
RECIPES = {"general_rule": [["math_rule", 1.0]], "knowledge_rule": [["math_rule", 1.0], ["helpfulness", 1.0]],
           "general": [["graded_correctness", 1.0]], "knowledge": [["knowledge", 1.0], ["helpfulness", 1.0]],
           "normal": [["helpfulness", 1.0]], "muldimif": [["instruction_following", 1.0], ["helpfulness", 1.0]]}


def tiny_rl(rollouts: int, loss: str) -> ml_collections.ConfigDict:
  s = ml_collections.ConfigDict()
  s.kind = "rl"
  s.rollout = dict(common.PAPER_ROLLOUT, prompts_per_rollout=16, max_new_tokens=48, max_prompt_length=80,
                   minibatch_size=64)
  s.loss = dict(policy_loss=loss, clip_eps=0.2, eps_low=0.2, eps_high=0.28, drift_alpha=0.0, kl_estimator="k3",
                kl_beta=0.001, kl_in="loss", aggregation="seq-mean-token-mean")
  s.optim = dict(common.PAPER_OPTIM, learning_rate=5e-4, warmup_fraction=0.0)
  s.train = dict(common.PAPER_TRAIN, rollouts=rollouts, micro_batch_size=32, logprob_chunk=64, checkpoint_every=50,
                 keep_checkpoints=1)
  return s


def stage(variant: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  if variant == "tiny":
    s = tiny_rl(rollouts=5 if runlocal else 8, loss="ppo")
    s.labels = ["general_rule", "knowledge_rule"]
    s.reward = dict(format_weight=1.0, recipes={k: RECIPES[k] if k != "knowledge_rule" else [["math_rule", 1.0]]
                                                for k in s.labels}, rules={})
    return s
  s = ml_collections.ConfigDict()
  s.kind = "rl"
  s.labels = list(LABELS)
  s.rollout = dict(common.PAPER_ROLLOUT)
  s.loss = dict(policy_loss="ppo", clip_eps=0.2, eps_low=0.2, eps_high=0.28, drift_alpha=0.0, kl_estimator="k3",
                kl_beta=0.001, kl_in="loss", aggregation="seq-mean-token-mean")
  s.optim = dict(common.PAPER_OPTIM)
  s.train = dict(common.PAPER_TRAIN, rollouts=100)
  s.reward = dict(format_weight=1.0, recipes=RECIPES, rules={}, verifiers={})
  return s


def get_config(arg=None):
  arg = parse_arg(arg, variant="tiny", runlocal=False, init="", data="", knowledge_verifier="")
  config = common.base(arg.variant, "rl", arg.init or None)
  config.update(stage(arg.variant, arg.runlocal))
  config.task = "user"
  config.data = common.user_data(arg.data or None, config.labels)
  if arg.variant != "tiny":
    judge = lambda name: dict(path=arg.knowledge_verifier or None, judge=name, head="verdict", batch_size=16)
    config.reward.verifiers = {n: judge(n) for n in ("knowledge", "helpfulness", "graded_correctness")}
  return config
