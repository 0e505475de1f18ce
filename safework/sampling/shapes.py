"""Host-side shapes of what the sampler compiles: prompts and blocks padded to few widths, and the cache spans
decode steps attend (each distinct value is a program or a loop body to compile)."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def bucket_length(length: int, minimum: int = 16) -> int:
  """Prompts are padded to the next power of two (at least `minimum`), so few shapes get compiled."""
  return max(minimum, 1 << max(0, int(length) - 1).bit_length())


def attention_spans(capacity: int, min_span: int, filled: int = 0) -> list[int]:
  """Growing prefixes of the cache that decode steps attend: min_span, 2 min_span, 4 min_span, ..., capacity.

  Each span is a loop body to compile: one larger than half the capacity would save less than half a step's
  attention, so the last span before the capacity is at most half of it; one no larger than `filled` (slots the
  prompt already fills) is never attended."""
  spans = [min_span << k for k in range(max(0, capacity - 1).bit_length()) if 2 * (min_span << k) <= capacity]
  return [span for span in spans if span > filled] + [capacity]


def filled_floor(write_index: int) -> int:
  """The decode program's static `filled`: the prompt's slots rounded down to a power of two (few programs; spans
  no longer than it are never attended, so a long prompt compiles no loop bodies for short spans)."""
  return 1 << (write_index.bit_length() - 1) if write_index > 0 else 0


def left_padded_block(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Token lists as one block for `Sampler.extend`: tokens [B, w] and valid [B, w], each row's tokens ending at the
  block's end (w: the longest list, at least 1; an empty list writes nothing)."""
  width = max(1, max(map(len, rows), default=0))
  tokens, valid = np.zeros((len(rows), width), np.int32), np.zeros((len(rows), width), bool)
  for row, ids in enumerate(rows):
    if len(ids):
      tokens[row, width - len(ids):], valid[row, width - len(ids):] = ids, True
  return tokens, valid


def pad_left(ids: np.ndarray, mask: np.ndarray, width: int, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Left-pads token ids [B, T] (with `pad_id`) and their mask (with 0) to [B, width]."""
  pad = width - ids.shape[1]
  return np.pad(ids, ((0, 0), (pad, 0)), constant_values=pad_id), np.pad(mask, ((0, 0), (pad, 0)))
