"""RL objectives as small pure functions over per-token log-probs. Nothing here knows about models.

Inputs are [B, T] log-probs of the sampled tokens under the current policy (`logp`), the policy that sampled
them (`old`), and the reference policy (`ref`); `mask` [B, T] marks the tokens that are trained on (response
tokens, not prompt, padding or tool output); advantages are per sequence [B].

Axis legend: B sequences, T response tokens.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

POLICY_LOSSES = ("ppo", "cpgd", "gspo")
KL_ESTIMATORS = ("k1", "k2", "k3")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
KL_PLACEMENTS = ("loss", "reward", "none")
BEHAVIOUR_CORRECTIONS = ("tis", "none")


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The policy objective. Defaults are the paper's stage-B script: CPGD, k3 KL in the loss, beta 0.001."""
  policy_loss: str = "cpgd"
  clip_eps: float = 0.2          # CPGD's trust region: log-ratio within [ln(1 - eps), ln(1 + eps)]
  eps_low: float = 0.2           # PPO / GSPO ratio clip below 1
  eps_high: float = 0.2          # ... and above 1 (DAPO's clip-higher when larger)
  drift_alpha: float = 0.0       # CPGD policy-drift coefficient (0.001 or 0.01 in the CPGD paper; 0 = off)
  kl_estimator: str = "k3"
  kl_beta: float = 0.001
  kl_in: str = "loss"            # "loss", "reward" (k1 penalty on the sequence reward) or "none"
  aggregation: str = "seq-mean-token-mean"
  # The sampler draws from its processed distribution mu (temperature, top-k, top-p), not from pi_old: "tis"
  # weights each token's policy-gradient term by the truncated importance ratio min(pi_old / mu, cap).
  behaviour_correction: str = "tis"
  behaviour_cap: float = 2.0

  def validate(self) -> "LossSettings":
    for value, allowed, name in ((self.policy_loss, POLICY_LOSSES, "policy_loss"),
                                 (self.kl_estimator, KL_ESTIMATORS, "kl_estimator"),
                                 (self.kl_in, KL_PLACEMENTS, "kl_in"), (self.aggregation, AGGREGATIONS, "aggregation"),
                                 (self.behaviour_correction, BEHAVIOUR_CORRECTIONS, "behaviour_correction")):
      if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")
    if not 0 < self.clip_eps < 1 or self.eps_low <= 0 or self.eps_high <= 0:
      raise ValueError("clip_eps must be in (0, 1) and eps_low / eps_high positive")
    if self.behaviour_cap < 1:
      raise ValueError(f"behaviour_cap must be at least 1, got {self.behaviour_cap}")
    return self

  @property
  def uses_reference(self) -> bool:
    return self.kl_in != "none" and self.kl_beta != 0


def ppo_clip(logp, old, advantages, eps_low: float, eps_high: float):
  """PPO's clipped ratio surrogate per token -> (loss [B, T], clip active [B, T]).

  The clip is asymmetric: ratio in [1 - eps_low, 1 + eps_high]. For negative advantages the min still applies
  (no flip to max), so the trust region holds on both sides.
  """
  a = advantages[:, None]
  ratio = jnp.exp(logp - old)
  unclipped = ratio * a
  clipped = jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a
  return -jnp.minimum(unclipped, clipped), clipped < unclipped


def cpgd(logp, old, advantages, eps: float):
  """CPGD's clipped log-prob objective per token -> (loss [B, T], clip active [B, T]).

  l = -A * clampA(log pi), clampA(u) = min(u, old + ln(1 + eps)) if A > 0 else max(u, old + ln(1 - eps)):
  the gradient is the plain policy gradient -A * grad log pi inside the trust region and zero outside.
  """
  a = advantages[:, None]
  upper, lower = old + jnp.log1p(eps), old + jnp.log1p(-eps)
  clamped = jnp.where(a > 0, jnp.minimum(logp, upper), jnp.maximum(logp, lower))
  outside = jnp.where(a > 0, logp > upper, logp < lower)
  return -a * clamped, outside


def cpgd_drift(logp, old, alpha: float):
  """CPGD's policy drift per token: alpha * sg(min(pi / pi_old - 1, 2)) * log pi; its gradient is that of
  alpha * KL(pi_old || pi) at the sampled tokens, pulling the policy back once it has moved."""
  pull = jax.lax.stop_gradient(jnp.minimum(jnp.exp(logp - old) - 1, 2.0))
  return alpha * pull * logp


def gspo(logp, old, advantages, mask, eps_low: float, eps_high: float):
  """GSPO: PPO clipping on the sequence ratio exp(mean_t(log pi - log old)) -> (loss [B, T], clip [B, T]).

  Each token carries its sequence's loss, so a sequence-mean aggregation gives the per-sequence objective.
  """
  count = jnp.maximum(mask.sum(axis=1), 1)
  ratio = jnp.exp(jnp.sum((logp - old) * mask, axis=1) / count)
  unclipped = ratio * advantages
  clipped = jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * advantages
  loss = -jnp.minimum(unclipped, clipped)
  return jnp.broadcast_to(loss[:, None], logp.shape), jnp.broadcast_to((clipped < unclipped)[:, None], logp.shape)


def behaviour_weights(old, behaviour, settings: LossSettings):
  """Per-token weights pi_old / mu of the sampled tokens, truncated at `behaviour_cap` (TIS); 1 when off.

  `old` are the policy's log-probs (temperature 1, full vocabulary), `behaviour` those of the distribution the
  sampler drew from, both [B, T].
  """
  if settings.behaviour_correction == "none":
    return jnp.ones_like(old)
  return jnp.minimum(jnp.exp(old - behaviour), settings.behaviour_cap)


def kl_penalty(logp, ref, estimator: str):
  """Per-token estimate of KL(pi || ref) from samples of pi.

  k1 = log pi - log ref (unbiased, but zero expected gradient: useless as a loss term), k2 = (log pi - log ref)^2
  / 2, k3 = ref/pi - log(ref/pi) - 1 (unbiased, non-negative; its gradient is that of the reverse KL).
  """
  log_ratio = ref - logp
  if estimator == "k1":
    return -log_ratio
  if estimator == "k2":
    return 0.5 * log_ratio**2
  if estimator == "k3":
    return jnp.exp(log_ratio) - log_ratio - 1
  raise ValueError(f"unknown KL estimator {estimator!r}; choose one of {KL_ESTIMATORS}")


def aggregate(per_token, mask, mode: str, num_sequences, num_tokens, max_length: int):
  """Reduces a per-token loss [B, T] to a scalar with global normalisers (so micro-batches add up exactly).

  token-mean: sum / num_tokens; seq-mean-token-mean (the paper's): mean over sequences of each sequence's token
  mean; seq-mean-token-sum-norm (Dr.GRPO): sum / (num_sequences * max_length).
  """
  masked = per_token * mask
  if mode == "token-mean":
    return masked.sum() / num_tokens
  if mode == "seq-mean-token-mean":
    return jnp.sum(masked.sum(axis=1) / jnp.maximum(mask.sum(axis=1), 1)) / num_sequences
  if mode == "seq-mean-token-sum-norm":
    return masked.sum() / (num_sequences * max_length)
  raise ValueError(f"unknown aggregation {mode!r}; choose one of {AGGREGATIONS}")


def policy_objective(settings: LossSettings, logp, old, ref, advantages, mask, num_sequences, num_tokens,
                     max_length: int, behaviour_weight=None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss to minimise and per-token metric sums (divide by the global token count to average).

  `behaviour_weight` [B, T] (from `behaviour_weights`) scales each token's policy-gradient term; the KL term is
  not reweighted.
  """
  mask = mask.astype(logp.dtype)
  if settings.policy_loss == "ppo":
    per_token, clipped = ppo_clip(logp, old, advantages, settings.eps_low, settings.eps_high)
  elif settings.policy_loss == "cpgd":
    per_token, clipped = cpgd(logp, old, advantages, settings.clip_eps)
  else:
    per_token, clipped = gspo(logp, old, advantages, mask, settings.eps_low, settings.eps_high)
  if settings.drift_alpha:
    per_token = per_token + cpgd_drift(logp, old, settings.drift_alpha)
  if behaviour_weight is not None:
    per_token = per_token * jax.lax.stop_gradient(behaviour_weight)
  kl = kl_penalty(logp, ref, settings.kl_estimator) if ref is not None else jnp.zeros_like(logp)
  if settings.kl_in == "loss" and ref is not None:
    per_token = per_token + settings.kl_beta * kl
  loss = aggregate(per_token, mask, settings.aggregation, num_sequences, num_tokens, max_length)
  log_ratio = logp - old
  sums = {
      "clip_fraction": (clipped * mask).sum(),
      "kl_ref": (kl * mask).sum(),
      # KL(old || pi) by k3 on samples of old: how far this update has moved the policy.
      "kl_to_sampler": ((jnp.exp(log_ratio) - 1 - log_ratio) * mask).sum(),
  }
  return loss, jax.tree.map(jax.lax.stop_gradient, sums)
