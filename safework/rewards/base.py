"""The reward interface: a batch of (prompt, response) pairs in, a total and named components out."""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from safework.data.example import Example


@dataclasses.dataclass(frozen=True)
class Rewards:
  """total [n] and each component [n]; every component is reported as its own metric."""
  total: np.ndarray
  components: dict[str, np.ndarray]

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


class RewardFunction(Protocol):
  def __call__(self, examples: Sequence[Example], responses: Sequence[str]) -> Rewards: ...
