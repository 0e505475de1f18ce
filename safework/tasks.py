"""Tasks by name: where a run's prompts come from, how its responses are rewarded, what its tokenizer reads."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from safework.data import toy_digits
from safework.data.example import PromptSource
from safework.rewards.base import RewardFunction


@dataclasses.dataclass(frozen=True)
class Task:
  source: Callable[[int], PromptSource]   # seed -> prompts
  reward: RewardFunction
  corpus: Callable[[], Sequence[str]]     # text for a tokenizer trained from scratch


TASKS: dict[str, Task] = {
    "toy_digits": Task(source=lambda seed: toy_digits.examples(200, seed), reward=toy_digits.reward,
                       corpus=toy_digits.corpus),
}


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}; choose one of {sorted(TASKS)}")
  return TASKS[name]

