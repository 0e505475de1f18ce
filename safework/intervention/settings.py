"""Settings of the step search (configurable from experiment files as a section)."""

from __future__ import annotations

import dataclasses

MODES = ("rerank", "mask", "rerank+mask")


@dataclasses.dataclass(frozen=True)
class SearchSettings:
  """How the verifier-guided step search explores and what it keeps.

  `candidates` K continuations per beam and step (1: no re-ranking); `beam` W kept per prompt (1: greedy step
  selection). A step ends after a `delimiters` string or `step_tokens` tokens (no delimiters: fixed-size steps, for
  short answers). `threshold` (None: no masking): a beam whose candidates all score below it rolls back, masks the
  tokens that began them and resamples, at most `resamples` times per step. With `lookahead`, a candidate is scored
  by its greedy completion to the end of the answer (a value estimate: an outcome judge that reads only final
  answers then values reasoning steps too), else as it stands. With `greedy_first`, each beam's first candidate is
  its greedy continuation, so where the verifiers are indifferent (ties) the search says what greedy decoding
  would. `recipes`: per row label, the verifiers that judge it and their weights (a candidate's score is their
  weighted mean), "*" for every other label; a row whose label has no recipe is not judged and keeps its greedy
  continuation (only verifiers that need no gold answer can guide generation). `banned`: strings never emitted.
  Candidates are drawn at `temperature` and `top_p`.
  """
  candidates: int = 4
  beam: int = 1
  delimiters: tuple[str, ...] = ("\n\n",)
  step_tokens: int = 64
  threshold: float | None = None
  resamples: int = 2
  lookahead: bool = False
  greedy_first: bool = True
  recipes: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (("*", (("safety", 1.0),)),)
  temperature: float = 1.0
  top_p: float = 1.0
  banned: tuple[str, ...] = ()

  @classmethod
  def for_mode(cls, mode: str, candidates: int | None = None, threshold: float | None = None,
               **fields) -> "SearchSettings":
    """`rerank` keeps the best of K candidates; `mask` draws one and resamples it with masks while it scores below
    the threshold (default 0.5); `rerank+mask` does both."""
    if mode not in MODES:
      raise ValueError(f"intervention {mode!r} is not one of {MODES}")
    if mode == "mask" and candidates not in (None, 1):
      raise ValueError(f"intervention 'mask' draws one candidate per step (got {candidates}); re-ranking several is "
                       "'rerank+mask'")
    if mode == "rerank" and threshold is not None:
      raise ValueError("intervention 'rerank' does not mask: a threshold needs 'mask' or 'rerank+mask'")
    candidates = 1 if mode == "mask" else candidates or cls.candidates
    threshold = threshold if threshold is not None or mode == "rerank" else 0.5
    return cls(candidates=candidates, threshold=threshold, **fields).validate()

  @property
  def verifiers(self) -> set[str]:
    return {name for _, recipe in self.recipes for name, _ in recipe}

  def recipe(self, label: str) -> tuple[tuple[str, float], ...]:
    """The verifiers (and weights) that judge a row with this label; () when none do."""
    recipes = dict(self.recipes)
    return recipes.get(label, recipes.get("*", ()))

  @property
  def mode(self) -> str:
    return "+".join(m for m, on in (("rerank", self.candidates > 1), ("mask", self.threshold is not None)) if on)

  def validate(self) -> "SearchSettings":
    for name in ("candidates", "beam", "step_tokens"):
      if getattr(self, name) < 1:
        raise ValueError(f"search {name} must be at least 1, got {getattr(self, name)}")
    if self.resamples < 0:
      raise ValueError(f"search resamples must be >= 0, got {self.resamples}")
    if any(not recipe or any(w <= 0 for _, w in recipe) for _, recipe in self.recipes):
      raise ValueError(f"each search recipe must name at least one verifier, each with a positive weight: "
                       f"{self.recipes}")
    if any(not d for d in self.delimiters) or any(not b for b in self.banned):
      raise ValueError("search delimiters and banned strings must not be empty")
    if self.candidates > 1 and self.temperature <= 0:
      raise ValueError(f"{self.candidates} candidates drawn greedily would be identical: sample them "
                       "(temperature > 0)")
    return self
