"""Advantage estimators over groups of G samples per prompt. Rewards arrive as [P, G] (prompt-major).

Each returns one advantage per sequence [P, G]; the loss broadcasts it over the sequence's tokens. A group whose
rewards are all equal carries no preference: its advantages are exactly 0, whatever float rounding of the group
mean would give (with the z-score, (0.1 - mean) / (std + eps) is about -0.9 for eight rewards of 0.1 in fp32:
an all-refuse group would be pushed down). Rewards are reduced in float64 for the same reason.
"""

from __future__ import annotations

import numpy as np

ESTIMATORS = ("group_zscore", "group_mean_centered", "length_conditional")


def _all_equal(rewards) -> np.ndarray:
  return np.max(rewards, axis=-1, keepdims=True) == np.min(rewards, axis=-1, keepdims=True)


def group_zscore(rewards, eps: float = 1e-9) -> np.ndarray:
  """GRPO: (r - mean_G r) / (std_G r + eps), with the unbiased (G - 1) standard deviation, as the paper's scripts."""
  r = np.asarray(rewards, np.float64)
  centred = r - r.mean(axis=-1, keepdims=True)
  std = np.std(r, axis=-1, keepdims=True, ddof=1)
  return np.where(_all_equal(r), 0.0, centred / (std + eps)).astype(np.float32)


def group_mean_centered(rewards) -> np.ndarray:
  """Dr.GRPO: r - mean_G r, no division by the standard deviation (no difficulty bias)."""
  r = np.asarray(rewards, np.float64)
  return np.where(_all_equal(r), 0.0, r - r.mean(axis=-1, keepdims=True)).astype(np.float32)


def length_conditional(rewards, lengths, lam: float = 0.5, alpha: float = 0.9, beta: float = 0.0,
                       scale: float = 1.0) -> np.ndarray:
  """Safe-and-efficient RL's length-conditional advantage (CANON form, safework_r1.md section 1, stage 3).

  Per prompt, the samples split by length into a short part S (length <= the group's median) and a long part L,
  with mean rewards mu_S, mu_L:
    long i:  A_i = [lam * (alpha * r_i - mu_S + beta) + (1 - lam) * (r_i - mu_L)] / scale
    short i: A_i = [lam * (r_i - alpha * mu_L - beta) + (1 - lam) * (r_i - mu_S)] / scale
  A long answer is credited only for beating the short ones by more than its discount: among answers that all
  earn r, the short ones get lam * ((1 - alpha) * r - beta) and the long ones its negative, so alpha < 1 (or
  beta < 0) prefers brevity; alpha = 1, beta = 0 is plain mean-centring. A group whose lengths are all
  equal has no short/long split and is mean-centred; one whose rewards and lengths are all equal gets 0.
  CANON divides by L_max for a token-sum loss; with this project's sequence-mean aggregations that would shrink
  the policy gradient thousands of times below the KL term, so `scale` defaults to 1.
  """
  r = np.asarray(rewards, np.float64)
  n = np.asarray(lengths, np.float64)
  is_long = n > np.median(n, axis=-1, keepdims=True)
  n_long = is_long.sum(axis=-1, keepdims=True)
  mu_long = np.where(is_long, r, 0).sum(axis=-1, keepdims=True) / np.maximum(n_long, 1)
  mu_short = np.where(~is_long, r, 0).sum(axis=-1, keepdims=True) / np.maximum(r.shape[-1] - n_long, 1)
  long_adv = lam * (alpha * r - mu_short + beta) + (1 - lam) * (r - mu_long)
  short_adv = lam * (r - alpha * mu_long - beta) + (1 - lam) * (r - mu_short)
  split = np.where(is_long, long_adv, short_adv)
  centred = np.where(_all_equal(r), 0.0, r - r.mean(axis=-1, keepdims=True))
  return (np.where(n_long > 0, split, centred) / scale).astype(np.float32)


def compute_advantages(name: str, rewards, lengths, **kwargs) -> np.ndarray:
  if name == "group_zscore":
    return group_zscore(rewards, **kwargs)
  if name == "group_mean_centered":
    return group_mean_centered(rewards)
  if name == "length_conditional":
    return length_conditional(rewards, lengths, **kwargs)
  raise ValueError(f"unknown advantage estimator {name!r}; choose one of {ESTIMATORS}")

