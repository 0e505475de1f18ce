r"""SafeLadder stage 2B, M³-RL "svkg": safety + value + knowledge + general, from the stage-A checkpoint.

  python -m safework.main --config experiments/m3rl_svkg.py:variant=72b,init=/runs/kg_72b/policy,data=/data/svkg,\
safety_verifier=/ckpt/SafeWork-RM-Safety-7B,value_verifier=/ckpt/SafeWork-RM-Value-72B,\
knowledge_verifier=/ckpt/SafeWork-RM-Knowledge-72B --workdir /runs/svkg_72b

The paper's stage-B objective: CPGD (eps 0.2), k3 KL in the loss (beta 0.001), seq-mean-token-mean; rewards are
format + the row label's recipe of verifier scores (safework_r1.md section 3).
"""

import ml_collections

from experiments import common, m3rl_kg
from safework.experiment import parse_arg
from safework.verifiers.recipes import PAPER_RECIPES

TINY_RECIPES = {"general_rule": [["math_rule", 1.0]], "knowledge_rule": [["math_rule", 1.0]],
                "safety": [["safety", 1.0]], "safety_rule": [["refusal_correct", 1.0]], "value": [["value", 1.0]]}


def stage(variant: str, runlocal: bool = False) -> ml_collections.ConfigDict:
  if variant == "tiny":
    s = m3rl_kg.tiny_rl(rollouts=10 if runlocal else 12, loss="cpgd")
    s.reward = dict(format_weight=1.0, recipes=TINY_RECIPES)
    return s
  s = m3rl_kg.stage(variant)
  s.loss.policy_loss = "cpgd"
  s.reward.recipes = {k: [list(c) for c in v] for k, v in PAPER_RECIPES.items()}
  return s


def get_config(arg=None, stage_fn=stage):
  """The config of this stage; efficient_rl.py reuses it with its own `stage_fn` (the same knobs)."""
  arg = parse_arg(arg, variant="tiny", runlocal=False, init="", data="", safety_verifier="", value_verifier="",
                  knowledge_verifier="")
  config = common.base(arg.variant, arg.init or None)
  config.update(stage_fn(arg.variant, arg.runlocal))
  config.task = "user"
  config.data = common.user_data(arg.data or None)
  if arg.variant != "tiny":
    config.reward.verifiers = {
        "safety": common.judge(arg.safety_verifier, "safety", "safety"),
        "value": common.judge(arg.value_verifier, "value", "value"),
        **{n: common.judge(arg.knowledge_verifier, n, "knowledge")
           for n in ("knowledge", "helpfulness", "graded_correctness")}}
  return config
