"""Stated confidence and how well it is calibrated: pure functions of responses and their correctness.

An answer states its confidence after the answer as `<confidence>p</confidence>`, p in [0, 1]. A missing or
malformed confidence is a format failure (`confidence_format` 0), and for the reliability measures it counts as
certainty (1.0): an answer that does not hedge asserts itself. A false-certain answer is wrong with a confidence
above the threshold; the constrained reward bounds their rate.
"""

from __future__ import annotations

import re

import numpy as np

from safework.verifiers.rules import final_answer, format_ok

_CONFIDENCE = re.compile(r"<confidence>\s*([0-9]*\.?[0-9]+)\s*</confidence>")
BINS = 10


def stated_confidence(response: str) -> float | None:
  """The last `<confidence>p</confidence>` of the final answer, if it is a number in [0, 1]."""
  found = _CONFIDENCE.findall(final_answer(response))
  if not found:
    return None
  value = float(found[-1])
  return value if 0.0 <= value <= 1.0 else None


def confidence_format(response: str) -> float:
  """1 if the response is `<think> ... </think> answer` and its answer states a confidence in [0, 1], else 0."""
  return float(format_ok(response) and stated_confidence(response) is not None)


def confidence_or_certain(response: str) -> float:
  value = stated_confidence(response)
  return 1.0 if value is None else value


def false_certain(correct: np.ndarray, confidence: np.ndarray, threshold: float) -> np.ndarray:
  """[n] 1 where the answer is wrong and its confidence above `threshold`."""
  return ((np.asarray(correct) < 0.5) & (np.asarray(confidence) > threshold)).astype(np.float32)


def expected_calibration_error(correct: np.ndarray, confidence: np.ndarray, bins: int = BINS) -> float:
  """Sum over equal-width confidence bins of (share of answers) x |accuracy - mean confidence|."""
  correct, confidence = np.asarray(correct, np.float64), np.asarray(confidence, np.float64)
  if not len(correct):
    return float("nan")
  which = np.minimum((confidence * bins).astype(int), bins - 1)
  error = 0.0
  for b in range(bins):
    members = which == b
    if members.any():
      error += members.mean() * abs(correct[members].mean() - confidence[members].mean())
  return float(error)


def calibration_metrics(correct: np.ndarray, confidence: np.ndarray, threshold: float) -> dict[str, float]:
  """Accuracy, false-certain rate, Brier score and ECE of answers with their confidences."""
  correct, confidence = np.asarray(correct, np.float64), np.asarray(confidence, np.float64)
  if not len(correct):
    return {}
  return {"accuracy": float(correct.mean()),
          "false_certain_rate": float(false_certain(correct, confidence, threshold).mean()),
          "brier": float(np.mean((confidence - correct) ** 2)),
          "ece": expected_calibration_error(correct, confidence)}
