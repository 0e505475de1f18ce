"""A label-gated reward from an experiment config's `reward` section.

  config.reward = dict(
      format_weight=1.0,
      recipes=dict(safety=[["safety", 1.0]], knowledge_rule=[["math_rule", 1.0], ["helpfulness", 1.0]], ...),
      verifiers=dict(safety=dict(path="/ckpt/SafeWork-RM-Safety-7B", judge="safety", head="verdict"), ...),
      rules=dict(efficiency=dict(max_tokens=1024, target_tokens=256)))

Every component a recipe names must be a model verifier (loaded from `path`, a saved verifier or a Hugging Face
judge checkpoint) or a rule verifier.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax

from safework import sharding
from safework.models import from_pretrained
from safework.models.checkpoint import abstract_params
from safework.processing import Processor
from safework.verifiers.judges import JUDGES
from safework.verifiers.model_verifier import ModelVerifier
from safework.verifiers.recipes import PAPER_RECIPES, RecipeReward, Scorer, rule_scorer
from safework.verifiers.train import load_verifier

RULES = ("math_rule", "refusal", "compliance", "refusal_correct", "instruction_following", "efficiency")


def model_verifier(spec: Mapping[str, Any], mesh: jax.sharding.Mesh, rules: sharding.Rules) -> ModelVerifier:
  """A verifier from {path, judge?, head?, batch_size?}: a saved verifier (verifier.json) or a judge checkpoint."""
  path = Path(spec["path"])
  batch_size = int(spec.get("batch_size", 16))
  if (path / "verifier.json").is_file():
    return load_verifier(path, mesh=mesh, rules=rules, batch_size=batch_size)
  judge = spec.get("judge")
  if judge not in JUDGES:
    raise ValueError(f"verifier at {path}: judge {judge!r} is not one of {sorted(JUDGES)}")
  model, params = from_pretrained(path, shardings=lambda m: sharding.param_shardings(abstract_params(m), mesh, rules))
  return ModelVerifier(model, params, Processor.from_pretrained(path), JUDGES[judge], head=spec.get("head", "verdict"),
                       mesh=mesh, rules=rules, batch_size=batch_size)


def reward_from_config(section: Mapping[str, Any], mesh: jax.sharding.Mesh, rules: sharding.Rules,
                       extra_scorers: Mapping[str, Scorer] | None = None) -> RecipeReward:
  recipes = {label: tuple((name, float(w)) for name, w in items)
             for label, items in dict(section.get("recipes") or PAPER_RECIPES).items()}
  needed = {name for recipe in recipes.values() for name, _ in recipe}
  scorers: dict[str, Scorer] = {n: s for n, s in (extra_scorers or {}).items() if n in needed}
  rule_args = dict(section.get("rules") or {})
  verifier_specs = dict(section.get("verifiers") or {})
  for name in sorted(needed - set(scorers)):
    if name in verifier_specs:
      scorers[name] = model_verifier(verifier_specs[name], mesh, rules)
    elif name in RULES:
      scorers[name] = rule_scorer(name, **dict(rule_args.get(name) or {}))
    else:
      raise ValueError(f"reward component {name!r} is neither a configured verifier ({sorted(verifier_specs)}) nor a "
                       f"rule ({list(RULES)})")
  return RecipeReward(scorers, recipes, float(section.get("format_weight", 1.0)))
