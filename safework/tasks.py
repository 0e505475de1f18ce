"""Built-in tasks by name: prompts, a reward and a tokenizer corpus in one (a stage's data, `StageData`)."""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from safework.data import toy_digits
from safework.data.example import Example
from safework.experiment import close_matches
from safework.rewards.base import RewardFunction


@dataclasses.dataclass(frozen=True)
class TaskData:
  examples: Callable[[int], Sequence[Example]]   # seed -> prompts
  reward: RewardFunction
  corpus: Callable[[], Sequence[str]]            # text for a tokenizer trained from scratch
  seed: int = 0
  search_corpus: str | None = None               # no documents for a search tool

  def prompts(self, labels, processor, max_length) -> Sequence[Example]:
    rows = self.examples(self.seed)
    for i, example in enumerate(rows):
      tokens = example.prompt_tokens(processor)
      if tokens > max_length:
        raise ValueError(f"prompt {i} of the task has {tokens} tokens, more than max_prompt_length={max_length}")
    return rows

  def traces(self, processor, max_length):
    raise ValueError("this task has no SFT traces")


TASKS: dict[str, TaskData] = {
    "toy_digits": TaskData(examples=lambda seed: toy_digits.examples(200, seed), reward=toy_digits.reward,
                           corpus=toy_digits.corpus),
}


def get_task(name: str, seed: int = 0) -> TaskData:
  if name not in TASKS:
    raise KeyError(f"unknown task {name!r}{close_matches(name, TASKS)}; choose one of {sorted(TASKS)}")
  return dataclasses.replace(TASKS[name], seed=seed)
