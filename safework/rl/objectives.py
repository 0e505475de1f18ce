"""The objectives RL and SFT train through the core step (`safework.training.step`): per micro-batch, the
response tokens' log-probs under the policy, then the policy-gradient loss or the cross-entropy.

Both normalise by the minibatch's global counts (`totals`: sequences with a trained token, trained tokens), so
micro-batch contributions add up to exactly the minibatch's loss and metrics. With the vision tower frozen its
features come precomputed in the context; otherwise each micro-batch runs the tower inside the gradient.

Axis legend: B rows, N response tokens, m micro-batches, b rows per micro-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from safework.models.protocol import CausalLM
from safework.rl import losses
from safework.rl.batch import SequenceBatch, VisionContext, vision_features
from safework.rl.logprobs import narrowed_logprobs
from safework.training.step import split_micro_batches


def sequence_totals(batch: SequenceBatch) -> tuple[jax.Array, jax.Array]:
  """(sequences with at least one trained token, trained tokens) of a minibatch, at least 1 each."""
  per_row = batch.loss_mask.sum(axis=1)
  return jnp.maximum((per_row > 0).sum(), 1).astype(jnp.float32), jnp.maximum(per_row.sum(), 1.0)


@dataclasses.dataclass(frozen=True)
class _ResponseObjective:
  model: CausalLM
  logprob_chunk: int = 256
  vision_trainable: bool = False
  vocab_limit: int | None = None   # the tokenizer's size: ids beyond it are not in the policy's distribution
  # A micro-batch computes over the narrowest of these response widths holding its longest response (none: all
  # columns); the rows come ordered by length (`batch.micro_batch_layout`), so short micro-batches cost less.
  response_widths: tuple[int, ...] = ()

  def totals(self, batch: SequenceBatch):
    return sequence_totals(batch)

  def logprobs(self, params, micro: SequenceBatch, context: VisionContext) -> tuple[jax.Array, jax.Array]:
    features = context.features
    if self.vision_trainable and not context.vision.empty:
      features = vision_features(self.model, params, context.vision)
    return narrowed_logprobs(self.model, params, micro, features, self.logprob_chunk, self.vocab_limit,
                             self.response_widths)


@dataclasses.dataclass(frozen=True)
class PolicyGradientObjective(_ResponseObjective):
  """The RL policy loss (PPO / CPGD / GSPO, KL to the reference, behaviour-weighted) of `losses.py`."""
  loss: losses.LossSettings = losses.LossSettings()

  def __call__(self, params, micro: SequenceBatch, context: VisionContext, totals):
    num_sequences, num_tokens = totals
    logp, entropy = self.logprobs(params, micro, context)
    ref = micro.ref_logp if self.loss.kl_in == "loss" and self.loss.uses_reference else None
    loss, sums = losses.policy_objective(self.loss, logp, micro.old_logp, ref, micro.advantages, micro.loss_mask,
                                         num_sequences, num_tokens, micro.response_length, micro.behaviour_weight)
    mask = micro.loss_mask
    sums.update(entropy=(entropy * mask).sum(), sampler_mismatch_abs=(jnp.abs(micro.sampler_logp - micro.old_logp) *
                                                                      mask).sum())
    return loss, {k: v / num_tokens for k, v in sums.items()}


@dataclasses.dataclass(frozen=True)
class CrossEntropyObjective(_ResponseObjective):
  """SFT: the mean negative log-likelihood of the response tokens."""

  def __call__(self, params, micro: SequenceBatch, context: VisionContext, totals):
    _, num_tokens = totals
    logp, entropy = self.logprobs(params, micro, context)
    return -(logp * micro.loss_mask).sum() / num_tokens, {"entropy": (entropy * micro.loss_mask).sum() / num_tokens}


def make_logprob_fn(model: CausalLM, micro_batches: int, chunk: int, vocab_limit: int | None = None,
                    response_widths: tuple[int, ...] = ()) -> Callable:
  """`(params, batch, features) -> log-probs [B, N]` of the response tokens, micro-batch by micro-batch (each over
  the narrowest of `response_widths` holding it)."""
  def logprobs(params, batch: SequenceBatch, features):
    def one(micro):
      return narrowed_logprobs(model, params, micro, features, chunk, vocab_limit, response_widths)[0]
    per_micro = jax.lax.map(one, split_micro_batches(batch, micro_batches))   # [m, b, N]
    return jnp.swapaxes(per_micro, 0, 1).reshape(batch.loss_mask.shape)
  return logprobs
