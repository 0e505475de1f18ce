"""Token masks: sequences a row must never emit (a logits processor), and per-row masks of a prefix's next token.

A static mask is a `BannedSequences` in `SamplingSettings.logits_processor`: the last token of a banned sequence
is masked whenever the row's recent tokens spell the rest of it. A dynamic mask changes between decode calls (a
rejected step's first tokens), so it is written into the prefix's `last_logits`, which predict each row's next
token: no program is recompiled for it.

Axis legend: B rows, V vocab, N tokens generated so far, M masked (row, token) pairs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safework.sampling.sampler import Prefix
from safework.sampling.shapes import bucket_length
from safework.sampling.tokens import NO_TOKEN


@dataclasses.dataclass(frozen=True)
class BannedSequences:
  """A logits processor that never lets a row complete one of `sequences` (token-id tuples) within a decode call."""
  sequences: tuple[tuple[int, ...], ...]

  def __call__(self, logits: jax.Array, history: jax.Array, step: jax.Array) -> jax.Array:
    """logits [B, V], history [B, N] (NO_TOKEN where not yet drawn), step: tokens drawn so far."""
    for sequence in self.sequences:
      *head, last = sequence
      hit = jnp.ones(logits.shape[0], bool)
      if head:   # the last len(head) drawn tokens, NO_TOKEN before the first
        padded = jnp.pad(history, ((0, 0), (len(head), 0)), constant_values=NO_TOKEN)
        recent = jax.lax.dynamic_slice_in_dim(padded, step, len(head), axis=1)
        hit = jnp.all(recent == jnp.asarray(head, history.dtype), axis=1)
      logits = logits.at[:, last].set(jnp.where(hit, -jnp.inf, logits[:, last]))
    return logits


@dataclasses.dataclass(frozen=True)
class GreedyEvery:
  """A logits processor under which every `period`-th row (0, period, 2 period, ...) decodes greedily: with G
  samples per row, each row's first sample is its greedy continuation."""
  period: int

  def __call__(self, logits: jax.Array, history: jax.Array, step: jax.Array) -> jax.Array:
    greedy = (jnp.arange(logits.shape[0]) % self.period == 0)[:, None]
    best = logits == jnp.max(logits, axis=-1, keepdims=True)
    return jnp.where(greedy & ~best, -jnp.inf, logits)


@dataclasses.dataclass(frozen=True)
class Chain:
  """Logits processors applied in order."""
  processors: tuple

  def __call__(self, logits: jax.Array, history: jax.Array, step: jax.Array) -> jax.Array:
    for processor in self.processors:
      logits = processor(logits, history, step)
    return logits


def banned_next(tokens: Sequence[int], sequences: Sequence[Sequence[int]]) -> set[int]:
  """The tokens that would complete a banned sequence right after `tokens` (a row's response so far, on the host):
  what a decode call that resumes there masks first, since its processor sees only the tokens the call draws (a
  sequence whose head straddles the boundary, partly before and partly drawn in the call, is not caught)."""
  tokens, out = list(tokens), set()
  for sequence in sequences:
    head = list(sequence[:-1])
    if head and len(tokens) >= len(head) and tokens[-len(head):] == head:
      out.add(sequence[-1])
  return out


@jax.jit
def _mask_pairs(logits: jax.Array, rows: jax.Array, tokens: jax.Array) -> jax.Array:
  return logits.at[rows, tokens].set(-jnp.inf, mode="drop")   # padding pairs point past the last row


def mask_next_tokens(prefix: Prefix, masked: Sequence[set[int]]) -> Prefix:
  """The prefix with `masked[row]` (token ids) impossible as each row's next token. The pairs are padded to a
  power of two (few shapes compile)."""
  pairs = [(row, token) for row, tokens in enumerate(masked) for token in sorted(tokens)]
  if not pairs:
    return prefix
  width = bucket_length(len(pairs), minimum=8)
  rows = np.full(width, len(masked), np.int32)   # out of range: dropped
  tokens = np.zeros(width, np.int32)
  rows[:len(pairs)], tokens[:len(pairs)] = zip(*pairs)
  return prefix.replace(last_logits=_mask_pairs(prefix.last_logits, jnp.asarray(rows), jnp.asarray(tokens)))


def end_rows(prefix: Prefix, rows: np.ndarray, eos_ids: Sequence[int]) -> Prefix:
  """The prefix with an end token certain as the next token of the rows where `rows` [B] is true: a finished row
  ends its (ignored) tokens at once, so it does not hold up a decode call. Unchanged without end tokens."""
  rows = np.asarray(rows, bool)
  if not eos_ids or not rows.any():
    return prefix
  vocab = jnp.arange(prefix.last_logits.shape[-1])
  only = jnp.where(vocab == min(eos_ids), 0.0, -jnp.inf)
  return prefix.replace(last_logits=jnp.where(jnp.asarray(rows)[:, None], only, prefix.last_logits))
