"""MI peaks in a response, and the tokens found at them across responses.

Peak rule (the paper is silent; MI-Peaks reports peaks as a few sharp outliers): token t is a peak when its MI is a
local maximum over its valid neighbours and exceeds the response's mean MI by `threshold` standard deviations.
A response shorter than `min_tokens` has no peaks (its spread says nothing).
"""

from __future__ import annotations

import collections
import dataclasses
import re
from typing import Sequence

import numpy as np

# Words of refusal and safety reasoning; a peak token counts when its word (letters and apostrophes, lowercased)
# is one of these.
SAFETY_WORDS = frozenset({
    "sorry", "apologize", "apologise", "cannot", "can't", "won't", "unable", "refuse", "decline", "not", "harm",
    "harmful", "hurt", "dangerous", "danger", "illegal", "unsafe", "safe", "safety", "risk", "risky", "ethical",
    "unethical", "against", "policy", "inappropriate", "violence", "weapon", "warning", "caution", "careful",
    "responsible", "law", "laws", "crime", "criminal",
})


@dataclasses.dataclass(frozen=True)
class PeakRule:
  threshold: float = 2.0   # standard deviations above the response's mean MI
  min_tokens: int = 4


def find_peaks(mi: np.ndarray, rule: PeakRule = PeakRule()) -> np.ndarray:
  """Positions (into `mi`, one response's valid tokens in order) of its MI peaks."""
  mi = np.asarray(mi, np.float64)
  if len(mi) < rule.min_tokens:
    return np.zeros(0, np.int64)
  left = np.concatenate([[-np.inf], mi[:-1]])
  right = np.concatenate([mi[1:], [-np.inf]])
  high = mi > mi.mean() + rule.threshold * mi.std()
  return np.flatnonzero(high & (mi >= left) & (mi > right))


def word(token_text: str) -> str:
  """A token's word: its letters and apostrophes, lowercased ("▁Sorry," -> "sorry"); none for a special token
  ("<|im_end|>")."""
  if re.fullmatch(r"<\|.*\|>|<[^<>\s]+>", token_text):
    return ""
  return "".join(re.findall(r"[a-zA-Z']+", token_text)).lower()


@dataclasses.dataclass(frozen=True)
class PeakStatistics:
  responses: int
  peaks: int
  mean_peaks_per_response: float
  safety_share: float                      # share of the peaks on words that are SAFETY_WORDS
  top_tokens: tuple[tuple[str, int], ...]  # the most frequent peak words, with counts


def peak_statistics(peak_tokens: Sequence[Sequence[str]], top: int = 20) -> PeakStatistics:
  """Statistics over responses given each response's peak token texts."""
  peaks = sum(len(tokens) for tokens in peak_tokens)
  words = [w for tokens in peak_tokens for w in map(word, tokens) if w]   # special tokens and punctuation left out
  return PeakStatistics(
      responses=len(peak_tokens), peaks=peaks,
      mean_peaks_per_response=peaks / len(peak_tokens) if peak_tokens else 0.0,
      safety_share=sum(w in SAFETY_WORDS for w in words) / len(words) if words else 0.0,
      top_tokens=tuple(collections.Counter(words).most_common(top)))
