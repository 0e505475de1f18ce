"""A label-gated reward from an experiment's `reward` section: parsed and checked first, built when loading.

  config.reward = dict(
      format_weight=1.0,
      recipes=dict(safety=[["safety", 1.0]], knowledge_rule=[["math_rule", 1.0], ["helpfulness", 1.0]], ...),
      verifiers=dict(safety=dict(path="/ckpt/SafeWork-RM-Safety-7B", judge="safety", head="verdict"), ...),
      rules=dict(efficiency=dict(max_tokens=1024, target_tokens=256)))

`reward_spec` checks everything that can be checked without loading a model (unknown keys, judges, heads, rule
arguments, every component a recipe names); `build_reward` loads the verifiers. Every component must be a model
verifier (loaded from `path`: a saved verifier or a Hugging Face judge checkpoint), a rule, or a scorer the
caller brings (`extra_scorers`, e.g. the tiny ladder's trained judges).
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from safework import sharding
from safework.experiment import close_matches, settings
from safework.models import from_pretrained
from safework.models.checkpoint import abstract_params
from safework.processing import Processor
from safework.verifiers.heads import HEAD_KINDS
from safework.verifiers.judges import JUDGES
from safework.verifiers.model_verifier import ModelVerifier
from safework.verifiers.recipes import RULES, PAPER_RECIPES, RecipeReward, Scorer, rule_scorer
from safework.verifiers.train import load_verifier


@dataclasses.dataclass(frozen=True)
class VerifierSpec:
  path: str | None = None        # a saved verifier (verifier.json) or a Hugging Face judge checkpoint
  judge: str | None = None       # which judge prompt and verdicts (safework.verifiers.judges), for a checkpoint
  head: str = "verdict"
  batch_size: int = 16
  max_length: int = 2048         # judge prompt tokens (the question, the final answer, the judge's instructions)
  dtype: str = "float32"         # of the judge's weights and compute (bfloat16 at paper scale: judges only infer)
  preset: str | None = None      # the judge's shape when it has no path yet (safework.plan plans from it)

  def validate(self) -> "VerifierSpec":
    if self.head not in HEAD_KINDS:
      raise ValueError(f"verifier head {self.head!r} is not one of {HEAD_KINDS}")
    if self.judge is not None and self.judge not in JUDGES:
      raise ValueError(f"judge {self.judge!r}{close_matches(self.judge, JUDGES)} is not one of {sorted(JUDGES)}")
    if self.batch_size < 1 or self.max_length < 1:
      raise ValueError(f"verifier batch_size and max_length must be positive, got {self.batch_size}, "
                       f"{self.max_length}")
    try:
      jnp.dtype(self.dtype)
    except TypeError:
      raise ValueError(f"verifier dtype={self.dtype!r} is not a dtype (float32, bfloat16)") from None
    return self


@dataclasses.dataclass(frozen=True)
class RewardSpec:
  format_weight: float = 1.0
  recipes: Mapping[str, tuple[tuple[str, float], ...]] = dataclasses.field(default_factory=lambda: PAPER_RECIPES)
  verifiers: Mapping[str, VerifierSpec] = dataclasses.field(default_factory=dict)
  rules: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def labels(self) -> tuple[str, ...]:
    """The row labels this reward scores (a stage trains on these rows)."""
    return tuple(sorted(self.recipes))

  @property
  def components(self) -> set[str]:
    return {name for recipe in self.recipes.values() for name, _ in recipe}


def reward_spec(section: Mapping[str, Any], extra_scorers: tuple[str, ...] = ()) -> RewardSpec:
  """The checked spec of a `reward` section (no model is loaded)."""
  section = dict(section.to_dict() if hasattr(section, "to_dict") else section or {})
  known = {f.name for f in dataclasses.fields(RewardSpec)}
  unknown = sorted(set(section) - known)
  if unknown:
    raise ValueError(f"unknown keys {unknown} in the reward section{close_matches(unknown[0], known)}; "
                     f"known: {sorted(known)}")
  recipes = {label: tuple((str(name), float(w)) for name, w in items)
             for label, items in dict(section.get("recipes") or PAPER_RECIPES).items()}
  verifiers = {name: settings(VerifierSpec, spec) for name, spec in dict(section.get("verifiers") or {}).items()}
  rules = {name: dict(args or {}) for name, args in dict(section.get("rules") or {}).items()}
  for name, args in rules.items():
    if name not in RULES:
      raise ValueError(f"reward rule {name!r}{close_matches(name, RULES)} is not one of {list(RULES)}")
    accepted = set(inspect.signature(rule_scorer).parameters) - {"name"}
    if set(args) - accepted:
      raise ValueError(f"reward rule {name!r}: unknown arguments {sorted(set(args) - accepted)}; known: "
                       f"{sorted(accepted)}")
  spec = RewardSpec(format_weight=float(section.get("format_weight", 1.0)), recipes=recipes, verifiers=verifiers,
                    rules=rules)
  available = set(verifiers) | set(RULES) | set(extra_scorers)
  for label, recipe in recipes.items():
    for name, _ in recipe:
      if name not in available:
        raise ValueError(f"the recipe of label {label!r} uses {name!r}{close_matches(name, available)}, which is "
                         f"neither a configured verifier ({sorted(verifiers)}) nor a rule ({list(RULES)})")
      if name in verifiers and not verifiers[name].path and name not in extra_scorers:
        raise ValueError(f"verifier {name!r} needs a path (a saved verifier or a judge checkpoint directory); "
                         "pass it in the experiment argument or --config.reward.verifiers.NAME.path")
  return spec


def model_verifier(spec: VerifierSpec, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                   loaded: dict | None = None) -> ModelVerifier:
  """A verifier from its spec: a saved verifier (verifier.json) or a judge checkpoint. `loaded` caches judge
  checkpoints by (path, dtype), so verifiers that judge with one checkpoint share its weights in HBM."""
  path = Path(spec.path)
  dtype = jnp.dtype(spec.dtype)
  if (path / "verifier.json").is_file():
    return load_verifier(path, mesh=mesh, rules=rules, dtype=dtype, batch_size=spec.batch_size,
                         max_length=spec.max_length)
  if spec.judge is None:
    raise ValueError(f"verifier at {path}: not a saved verifier (no verifier.json), so give judge= (one of "
                     f"{sorted(JUDGES)})")
  loaded = {} if loaded is None else loaded
  key = (str(path.resolve()), dtype.name)
  if key not in loaded:
    model, params = from_pretrained(path, dtype=dtype,
                                    shardings=lambda m: sharding.param_shardings(abstract_params(m), mesh, rules))
    loaded[key] = (model, params, Processor.from_pretrained(path))
  model, params, processor = loaded[key]
  return ModelVerifier(model, params, processor, JUDGES[spec.judge], head=spec.head, mesh=mesh, rules=rules,
                       batch_size=spec.batch_size, max_length=spec.max_length)


def build_reward(spec: RewardSpec, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                 extra_scorers: Mapping[str, Scorer] | None = None) -> RecipeReward:
  """Loads the verifiers the recipes need and combines them with the rules."""
  needed = spec.components
  scorers: dict[str, Scorer] = {n: s for n, s in (extra_scorers or {}).items() if n in needed}
  loaded = {}
  for name in sorted(needed - set(scorers)):
    if name in spec.verifiers:
      scorers[name] = model_verifier(spec.verifiers[name], mesh, rules, loaded)
    else:
      scorers[name] = rule_scorer(name, **dict(spec.rules.get(name) or {}))
  return RecipeReward(scorers, spec.recipes, spec.format_weight)
