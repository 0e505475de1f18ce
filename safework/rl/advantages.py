"""Advantage estimators over groups of G samples per prompt. Rewards arrive as [P, G] (prompt-major).

Each returns one advantage per sequence [P, G]; the loss broadcasts it over the sequence's tokens.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_zscore(rewards: jax.Array, eps: float = 1e-9) -> jax.Array:
  """GRPO: (r - mean_G r) / (std_G r + eps), with the unbiased (G - 1) standard deviation, as the paper's scripts."""
  mean = rewards.mean(axis=-1, keepdims=True)
  std = jnp.std(rewards, axis=-1, keepdims=True, ddof=1)
  return (rewards - mean) / (std + eps)


def group_mean_centered(rewards: jax.Array) -> jax.Array:
  """Dr.GRPO: r - mean_G r, no division by the standard deviation (no difficulty bias)."""
  return rewards - rewards.mean(axis=-1, keepdims=True)


def length_conditional(rewards: jax.Array, lengths: jax.Array, max_length: float, lam: float = 0.5,
                       alpha: float = 1.0, beta: float = 0.0) -> jax.Array:
  """Safe-and-efficient RL's length-conditional advantage (CANON form, safework_r1.md section 1, stage 3).

  Per prompt, the G samples split by length into a short half S and a long half L (ties broken by index), with
  mean rewards mu_S, mu_L:
    long i:  A_i = [lam * (alpha * r_i - mu_S + beta) + (1 - lam) * (r_i - mu_L)] / L_max
    short i: A_i = [lam * (r_i - alpha * mu_L - beta) + (1 - lam) * (r_i - mu_S)] / L_max
  A long answer is credited only for beating the short ones (and vice versa), which rewards brevity whenever
  short answers do as well.
  """
  g = rewards.shape[-1]
  rank = jnp.argsort(jnp.argsort(lengths, axis=-1, stable=True), axis=-1)   # 0 = shortest
  is_long = rank >= (g + 1) // 2   # with G odd, the middle sample counts as short
  n_long = is_long.sum(axis=-1, keepdims=True)
  mu_long = jnp.where(is_long, rewards, 0).sum(axis=-1, keepdims=True) / jnp.maximum(n_long, 1)
  mu_short = jnp.where(~is_long, rewards, 0).sum(axis=-1, keepdims=True) / jnp.maximum(g - n_long, 1)
  long_adv = lam * (alpha * rewards - mu_short + beta) + (1 - lam) * (rewards - mu_long)
  short_adv = lam * (rewards - alpha * mu_long - beta) + (1 - lam) * (rewards - mu_short)
  return jnp.where(is_long, long_adv, short_adv) / max_length


ESTIMATORS = ("group_zscore", "group_mean_centered", "length_conditional")


def compute_advantages(name: str, rewards: jax.Array, lengths: jax.Array, max_length: int, **kwargs) -> jax.Array:
  if name == "group_zscore":
    return group_zscore(rewards, **kwargs)
  if name == "group_mean_centered":
    return group_mean_centered(rewards)
  if name == "length_conditional":
    return length_conditional(rewards, lengths, max_length, **kwargs)
  raise ValueError(f"unknown advantage estimator {name!r}; choose one of {ESTIMATORS}")
