"""A toy RL task a tiny model learns on a CPU in minutes: answer with the digit the prompt asks for.

Prompts name a digit ("write the digit seven"). The reward is half the share of the response's characters that are
digits and half the share that are the requested digit: a random policy already sees a signal (any digit), and
the optimum (only the requested digit) needs the prompt.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from safework.data.example import Example
from safework.rewards.base import Rewards

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def examples(count: int = 100, seed: int = 0) -> list[Example]:
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    digit = int(rng.integers(10))
    question = f"write the digit {WORDS[digit]}"
    out.append(Example(question=question, answer=str(digit), label="toy_digits"))
  return out


def corpus() -> list[str]:
  """Text for training the tiny tokenizer of this task."""
  lines = [f"write the digit {w} {d} {str(d) * 3}" for d, w in enumerate(WORDS)]
  return lines * 20


def reward(examples: Sequence[Example], responses: Sequence[str], lengths=None) -> Rewards:
  share = lambda text, chars: sum(text.count(c) for c in chars) / max(len(text), 1)
  any_digit = np.array([share(r, "0123456789") for r in responses], np.float32)
  requested = np.array([share(r, e.answer) for e, r in zip(examples, responses)], np.float32)
  return Rewards(total=0.5 * (any_digit + requested), components={"any_digit": any_digit, "requested": requested})
