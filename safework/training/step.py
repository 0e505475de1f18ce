"""The jitted update every trainer shares: gradient accumulation over micro-batches, one optimizer step, the guard.

An `Objective` gives the minibatch's global normalisers once (`totals`) and, per micro-batch, a loss and metrics
already divided by them, so summing over micro-batches gives exactly the minibatch's values. `context` is what
all micro-batches share (vision inputs and features, ...). The step is pure: `(state, batch, context) ->
(state, metrics)`, jitted by the loop with the state donated.

Axis legend: B rows of the minibatch, m micro-batches, b = B / m rows per micro-batch.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import optax

from safework.training import guard
from safework.training.state import TrainState


class Objective(Protocol):
  def totals(self, batch: Any) -> Any:
    """Global normalisers of a minibatch (e.g. trained sequences and tokens)."""

  def __call__(self, params: Any, micro: Any, context: Any, totals: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(loss, metrics) of one micro-batch, each divided by the minibatch's totals."""


def split_micro_batches(batch: Any, parts: int) -> Any:
  """[B, ...] -> [m, b, ...]; micro-batch i takes rows i, i + m, ... so the batch sharding stays put."""
  def split(x):
    if x.shape[0] % parts:
      raise ValueError(f"a minibatch of {x.shape[0]} rows does not split into {parts} micro-batches")
    return jnp.swapaxes(x.reshape((x.shape[0] // parts, parts) + x.shape[1:]), 0, 1)
  return jax.tree.map(split, batch)


def make_train_step(objective: Objective, tx: optax.GradientTransformation, micro_batches: int = 1,
                    max_update_ratio: float | None = None) -> Callable:
  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def train_step(state: TrainState, batch: Any, context: Any):
    totals = objective.totals(batch)
    micro = split_micro_batches(batch, micro_batches)

    def accumulate(carry, one):
      grads, loss, metrics = carry
      (value, values), g = grad_fn(state.params, one, context, totals)
      add = lambda a, b: a + b
      return (jax.tree.map(add, grads, g), loss + value, jax.tree.map(add, metrics, values)), None

    first = jax.tree.map(lambda x: x[0], micro)
    names = jax.eval_shape(objective, state.params, first, context, totals)[1]
    init = (jax.tree.map(jnp.zeros_like, state.params), jnp.zeros((), jnp.float32),
            jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), names))
    (grads, loss, metrics), _ = jax.lax.scan(accumulate, init, micro)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm, update_norm, param_norm = (optax.tree.norm(t) for t in (grads, updates, state.params))
    accepted = guard.accept(loss, grad_norm, update_norm, param_norm, max_update_ratio)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(accepted, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(optax.apply_updates(state.params, updates), state.params),
                           opt_state=keep(opt_state, state.opt_state))
    return new_state, {"loss": loss, "grad_norm": grad_norm, "update_norm": update_norm,
                       "update_ratio": update_norm / jnp.maximum(param_norm, 1.0), "accepted": accepted, **metrics}

  return train_step
