"""The reward interface: a batch of (prompt, response) pairs in, a total and named components out."""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from safework.data.example import Example


@dataclasses.dataclass(frozen=True)
class Rewards:
  """total [n] and each component [n]; `applicable[name]` marks the rows a component was computed for (all rows
  when absent), so each component's metric averages over the rows it applies to."""
  total: np.ndarray
  components: dict[str, np.ndarray]
  applicable: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def check(self, n: int) -> "Rewards":
    arrays = {"total": self.total, **self.components}
    for name, value in arrays.items():
      if np.shape(value) != (n,):
        raise ValueError(f"reward {name!r} has shape {np.shape(value)}, expected ({n},)")
      bad = ~np.isfinite(np.asarray(value, np.float64))
      if bad.any():
        raise FloatingPointError(f"reward {name!r} is not finite for responses {np.nonzero(bad)[0].tolist()}: "
                                 "fix the reward function (a verifier returning NaN?) before training on it")
    return self

  def means(self) -> dict[str, float]:
    """Mean of the total and of each component over the rows it applies to (NaN when it applies to none)."""
    out = {"total": float(np.mean(self.total))}
    for name, value in self.components.items():
      rows = self.applicable.get(name, np.ones(len(value), bool))
      out[name] = float(np.mean(value[rows])) if rows.any() else float("nan")
    return out


class RewardFunction(Protocol):
  """Scores responses; `lengths` are the responses' token counts (for length-aware rewards)."""

  def __call__(self, examples: Sequence[Example], responses: Sequence[str], lengths: np.ndarray) -> Rewards: ...
