"""One prompt of a task: the question (with images or videos), its row label and reference answer."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Protocol

import numpy as np


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt as the policy sees it, plus what the rewards need to judge the response.

  `label` selects the reward recipe (safety, value, knowledge, ...); `answer` is the gold answer (if any);
  images are arrays, PIL images or paths; `meta` carries task-specific fields (harm category, ...).
  """
  question: str
  images: tuple[Any, ...] = ()
  videos: tuple[Any, ...] = ()
  label: str = "normal"
  answer: str | None = None
  system: str | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def messages(self) -> list[dict[str, Any]]:
    content = ([{"type": "image"}] * len(self.images) + [{"type": "video"}] * len(self.videos) +
               [{"type": "text", "text": self.question}])
    system = [{"role": "system", "content": self.system}] if self.system else []
    return system + [{"role": "user", "content": content}]


class PromptSource(Protocol):
  """Random access to a task's prompts (a list, a tfds data source, ...)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...


class ShuffledStream:
  """An endless stream over a source: epoch e visits the source in the permutation seeded by (seed, e).

  `take(position, count)` is a pure function of the position, so resuming a run at a saved position yields the
  same prompts as the uninterrupted run.
  """

  def __init__(self, source: PromptSource, seed: int):
    if len(source) == 0:
      raise ValueError("the prompt source is empty")
    self.source, self.seed = source, seed
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.source))}
    return self._orders[epoch]

  def take(self, position: int, count: int) -> list[Example]:
    n = len(self.source)
    out = []
    for i in range(position, position + count):
      epoch, offset = divmod(i, n)
      out.append(self.source[int(self._order(epoch)[offset])])
    return out

