"""The jitted update: gradient accumulation over micro-batches, one optimizer step, a NaN guard.

`make_train_step` returns a pure function `(state, batch, vision, features) -> (state, metrics)` to jit with the
state donated; the objective is the RL policy loss or, for SFT, cross-entropy on the response tokens. The minibatch's normalisers (sequences and tokens) are global, so summing micro-batch losses gives
exactly the minibatch loss. A non-finite loss, gradient or update never reaches the parameters: it is dropped
and `metrics["finite"]` says so; the host then skips or stops as configured.

Axis legend: B rows of the minibatch, m micro-batches, b rows per micro-batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from safework.models.qwen2_5_vl import Qwen25VL
from safework.rl import losses
from safework.rl.batch import SequenceBatch, VisionInputs, vision_features
from safework.rl.logprobs import response_logprobs


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class StepSettings:
  micro_batches: int = 1
  logprob_chunk: int = 256
  vision_trainable: bool = False   # False: features are computed once per rollout, outside the gradient


def _split(batch: SequenceBatch, parts: int) -> SequenceBatch:
  """[B, ...] -> [m, B / m, ...]; micro-batch i takes rows i, i + m, ... so the batch sharding stays put."""
  def split(x):
    if x.shape[0] % parts:
      raise ValueError(f"a minibatch of {x.shape[0]} rows does not split into {parts} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // parts, parts) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def normalizers(batch: SequenceBatch) -> tuple[jax.Array, jax.Array]:
  """(sequences with at least one trained token, trained tokens) of a minibatch, at least 1 each."""
  per_row = batch.loss_mask.sum(axis=1)
  return jnp.maximum((per_row > 0).sum(), 1).astype(jnp.float32), jnp.maximum(per_row.sum(), 1.0)


# (log-probs [b, N], micro-batch, global sequence count, global token count) -> (loss, per-token metric sums)
Objective = Callable[[jax.Array, SequenceBatch, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def policy_gradient_objective(loss_settings: losses.LossSettings) -> Objective:
  uses_ref = loss_settings.kl_in == "loss" and loss_settings.uses_reference

  def objective(logp, micro: SequenceBatch, num_sequences, num_tokens):
    loss, sums = losses.policy_objective(
        loss_settings, logp, micro.old_logp, micro.ref_logp if uses_ref else None, micro.advantages, micro.loss_mask,
        num_sequences, num_tokens, micro.response_length)
    sums["sampler_mismatch_abs"] = (jnp.abs(micro.sampler_logp - micro.old_logp) * micro.loss_mask).sum()
    return loss, sums
  return objective


def cross_entropy_objective(logp, micro: SequenceBatch, num_sequences, num_tokens):
  """SFT: mean negative log-likelihood of the response tokens."""
  return -(logp * micro.loss_mask).sum() / num_tokens, {}


def make_train_step(model: Qwen25VL, tx: optax.GradientTransformation, objective: Objective,
                    settings: StepSettings) -> Callable:

  def micro_loss(params, micro: SequenceBatch, vision: VisionInputs, features, num_sequences, num_tokens):
    if settings.vision_trainable and not vision.empty:
      features = vision_features(model, params, vision)
    logp, entropy = response_logprobs(model, params, micro, features, settings.logprob_chunk)
    loss, sums = objective(logp, micro, num_sequences, num_tokens)
    return loss, {**sums, "entropy": (entropy * micro.loss_mask).sum()}

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def train_step(state: TrainState, batch: SequenceBatch, vision: VisionInputs, features):
    num_sequences, num_tokens = normalizers(batch)
    micro_batches = _split(batch, settings.micro_batches)

    def accumulate(carry, micro):
      grads, loss, sums = carry
      (micro_value, micro_sums), micro_grads = grad_fn(state.params, micro, vision, features, num_sequences,
                                                       num_tokens)
      add = lambda a, b: a + b
      return (jax.tree.map(add, grads, micro_grads), loss + micro_value, jax.tree.map(add, sums, micro_sums)), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    sum_names = jax.eval_shape(micro_loss, state.params, first, vision, features, num_sequences, num_tokens)[1]
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
            {k: jnp.zeros((), jnp.float32) for k in sum_names})
    (grads, loss, sums), _ = jax.lax.scan(accumulate, init, micro_batches)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    update_norm = optax.tree.norm(updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm, "finite": finite, "tokens": num_tokens,
               **{k: v / num_tokens for k, v in sums.items()}}
    return new_state, metrics

  return train_step


def make_logprob_fn(model: Qwen25VL, settings: StepSettings) -> Callable:
  """`(params, batch, features) -> log-probs [B, N]` of the response tokens, micro-batch by micro-batch."""
  def logprobs(params, batch: SequenceBatch, features):
    def one(micro):
      return response_logprobs(model, params, micro, features, settings.logprob_chunk)[0]
    per_micro = jax.lax.map(one, _split(batch, settings.micro_batches))   # [m, b, N]
    return jnp.swapaxes(per_micro, 0, 1).reshape(batch.loss_mask.shape)
  return logprobs
