"""Label-gated rewards: r = w_format * format + sum over the row label's recipe of w * score.

Recipes are data (experiment files hold them): a row labelled `safety` is scored by the safety verifier only,
`knowledge_rule` by the math rule and helpfulness, and so on (safework_r1.md section 3). A row whose label has no
recipe is an error (a misspelt label would otherwise earn the format reward alone). Each scorer runs once per
batch on just the rows whose recipe names it, and every component is reported as its own metric over those rows.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np

from safework.data.example import Example
from safework.rewards.base import Rewards
from safework.verifiers import rules
from safework.verifiers.calibration import confidence_format

Scorer = Callable[[Sequence[Example], Sequence[str], np.ndarray], np.ndarray]
Recipes = Mapping[str, Sequence[tuple[str, float]]]

# The paper's recipes (all weights 1.0).
PAPER_RECIPES: dict[str, tuple[tuple[str, float], ...]] = {
    "safety": (("safety", 1.0),),
    "jailbreak": (("safety", 1.0),),
    "value": (("value", 1.0),),
    "knowledge": (("knowledge", 1.0), ("helpfulness", 1.0)),
    "knowledge_rule": (("math_rule", 1.0), ("helpfulness", 1.0)),
    "normal": (("helpfulness", 1.0),),
    "general": (("graded_correctness", 1.0),),
    "general_rule": (("math_rule", 1.0),),
    "muldimif": (("instruction_following", 1.0), ("helpfulness", 1.0)),
}


RULES = ("math_rule", "refusal", "compliance", "refusal_correct", "instruction_following", "efficiency",
         "confidence_format")


def rule_scorer(name: str, max_tokens: int = 1024, target_tokens: int = 0) -> Scorer:
  """A rule verifier as a batch scorer: math_rule, refusal, compliance, refusal_correct (refuse exactly the rows
  whose `meta["harmful"]` is true), instruction_following, efficiency, confidence_format (the answer states its
  confidence)."""
  per_row = {
      "math_rule": lambda e, r, n: rules.math_correct(r, e.answer),
      "refusal": lambda e, r, n: float(rules.is_refusal(r)),
      "compliance": lambda e, r, n: 1.0 - float(rules.is_refusal(r)),
      "refusal_correct": lambda e, r, n: float(rules.is_refusal(r) == bool(e.meta.get("harmful", False))),
      "instruction_following": lambda e, r, n: rules.follows_instructions(r, e.meta.get("constraints", {})),
      "efficiency": lambda e, r, n: rules.length_efficiency(int(n), max_tokens, target_tokens),
      "confidence_format": lambda e, r, n: confidence_format(r),
  }
  if name not in per_row:
    raise KeyError(f"unknown rule verifier {name!r}; choose one of {sorted(per_row)}")
  fn = per_row[name]
  return lambda examples, responses, lengths: np.array(
      [fn(e, r, n) for e, r, n in zip(examples, responses, lengths)], np.float32)


class RecipeReward:
  """A `RewardFunction` combining scorers through per-label recipes."""

  def __init__(self, scorers: Mapping[str, Scorer], recipes: Recipes = PAPER_RECIPES, format_weight: float = 1.0):
    missing = sorted({name for recipe in recipes.values() for name, _ in recipe} - set(scorers))
    if missing:
      raise ValueError(f"recipes use components {missing} that have no scorer; scorers: {sorted(scorers)}")
    self.scorers, self.recipes, self.format_weight = dict(scorers), recipes, format_weight

  def __call__(self, examples: Sequence[Example], responses: Sequence[str], lengths: np.ndarray) -> Rewards:
    unknown = sorted({e.label for e in examples} - set(self.recipes))
    if unknown:
      raise ValueError(f"rows labelled {unknown} have no reward recipe; the recipes cover {sorted(self.recipes)}")
    n = len(responses)
    lengths = np.asarray(lengths)
    fmt = np.array([rules.format_ok(r) for r in responses], np.float32)
    total = self.format_weight * fmt
    components, applicable = {"format": fmt}, {}
    for name, scorer in self.scorers.items():
      weights = np.array([dict(self.recipes.get(e.label, ())).get(name, 0.0) for e in examples], np.float32)
      rows = np.nonzero(weights)[0]
      if not rows.size:
        continue
      scores = np.asarray(scorer([examples[i] for i in rows], [responses[i] for i in rows], lengths[rows]), np.float32)
      full = np.zeros(n, np.float32)
      full[rows] = scores
      total = total + weights * full
      components[name], applicable[name] = full, weights != 0
    return Rewards(total=total, components=components, applicable=applicable)
