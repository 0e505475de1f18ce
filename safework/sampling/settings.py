"""Static settings of the sampler: everything jit treats as a compile-time constant."""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax

# logits [B, V] (fp32), generated tokens so far [B, N], step -> processed logits. Must be hashable (a function).
LogitsProcessor = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How to decode.

  temperature 0 is greedy. `top_k` truncates before the cumulative sum of `top_p`, so nucleus sampling never
  sorts the whole vocabulary; with `top_p < 1` and no `top_k`, the nucleus is searched among the
  `nucleus_candidates` most likely tokens. `vocab_limit` masks the padding rows of the vocabulary (a checkpoint's
embedding has more rows than its tokenizer has tokens). `stop_sequences` are token-id sequences that end a row (step
  delimiters, tool calls); `eos_ids` end a row on one token. Two log-probs are returned per token: the policy's
  (temperature 1, no truncation, over the first `vocab_limit` ids) and the behaviour's (the distribution the
  token was really drawn from), whose ratio an RL trainer corrects for.
  """
  max_new_tokens: int = 64
  temperature: float = 1.0
  top_k: Optional[int] = None
  top_p: float = 1.0
  nucleus_candidates: int = 1024
  eos_ids: tuple[int, ...] = ()
  stop_sequences: tuple[tuple[int, ...], ...] = ()
  pad_id: int = 0
  vocab_limit: Optional[int] = None   # ids >= this are never drawn (embedding rows beyond the tokenizer)
  logits_processor: Optional[LogitsProcessor] = None

  def validate(self) -> "SamplingSettings":
    if self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be positive, got {self.max_new_tokens}")
    if self.temperature < 0:
      raise ValueError(f"temperature must be >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if self.top_k is not None and self.top_k < 1:
      raise ValueError(f"top_k must be positive, got {self.top_k}")
    if any(len(s) == 0 for s in self.stop_sequences):
      raise ValueError("stop sequences must not be empty")
    return self

  def ends(self, tokens) -> bool:
    """Whether host tokens (a row's response so far) end with an end token or a stop sequence."""
    tokens = tuple(tokens)
    return bool(tokens) and (tokens[-1] in self.eos_ids or any(tokens[-len(s):] == tuple(s)
                                                               for s in self.stop_sequences))

  def replace(self, **changes) -> "SamplingSettings":
    return dataclasses.replace(self, **changes).validate()
