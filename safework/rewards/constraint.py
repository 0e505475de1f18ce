"""Constrained RL for deliberative search: maximise correctness subject to "false-certain rate <= target".

The Lagrangian reward of a row is correctness - lambda * false_certain (wrong with a confidence above the
threshold); after each rollout the multiplier takes a dual-ascent step on the constraint's violation,
lambda <- clip(lambda + step_size * (rate - target), 0, max_multiplier), so it grows while the policy is too often
confidently wrong and decays to 0 once the constraint holds with slack. The multiplier is part of the run's
position in a checkpoint, so a resumed run continues with the same one.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from safework.data.example import Example
from safework.rewards.base import Rewards
from safework.verifiers.calibration import confidence_or_certain, false_certain

FALSE_CERTAIN = "false_certain"   # the reward component the constraint reads


@dataclasses.dataclass(frozen=True)
class ConstraintSettings:
  """`target`: the false-certain rate allowed (delta); `threshold`: confidence above which a wrong answer is
  false-certain; `step_size` of the dual ascent; the multiplier starts at `initial`, stays in [0, max_multiplier].
  The constraint applies to rows with one of `labels`, whose correctness is the reward component `correctness`."""
  labels: tuple[str, ...] = ("search",)
  correctness: str = "math_rule"
  target: float = 0.05
  threshold: float = 0.7
  step_size: float = 2.0
  initial: float = 0.0
  max_multiplier: float = 10.0

  def validate(self) -> "ConstraintSettings":
    if not 0 <= self.target < 1 or not 0 <= self.threshold < 1:
      raise ValueError(f"constraint target and threshold must be in [0, 1), got {self.target}, {self.threshold}")
    if self.step_size <= 0 or not 0 <= self.initial <= self.max_multiplier:
      raise ValueError("constraint step_size must be positive and 0 <= initial <= max_multiplier")
    return self


def with_false_certain(examples: Sequence[Example], responses: Sequence[str], scored: Rewards,
                       settings: ConstraintSettings) -> tuple[Rewards, np.ndarray]:
  """The rewards with two more components on the rows the constraint applies to (its labels, where its correctness
  component applies): `confidence` (stated; certainty when missing) and `false_certain`; and those rows [n]."""
  if settings.correctness not in scored.components:
    raise ValueError(f"the constraint reads correctness from reward component {settings.correctness!r}, which the "
                     f"reward does not compute (it has {sorted(scored.components)})")
  n = len(responses)
  rows = np.array([e.label in settings.labels for e in examples], bool)
  rows &= np.asarray(scored.applicable.get(settings.correctness, np.ones(n, bool)), bool)
  confidence = np.array([confidence_or_certain(r) for r in responses], np.float32) * rows
  flags = false_certain(scored.components[settings.correctness], confidence, settings.threshold) * rows
  return Rewards(total=scored.total, components={**scored.components, "confidence": confidence, FALSE_CERTAIN: flags},
                 applicable={**scored.applicable, "confidence": rows, FALSE_CERTAIN: rows}), rows


def dual_ascent(multiplier: float, rate: float, settings: ConstraintSettings) -> float:
  """The multiplier after a rollout whose applicable rows were false-certain at `rate`."""
  return float(np.clip(multiplier + settings.step_size * (rate - settings.target), 0.0, settings.max_multiplier))


def lagrangian(rewards: np.ndarray, flags: np.ndarray, applicable: np.ndarray, multiplier: float) -> np.ndarray:
  """Rewards with the multiplier's penalty on the false-certain rows the constraint applies to."""
  return np.asarray(rewards, np.float32) - multiplier * (np.asarray(flags, np.float32) * np.asarray(applicable))

