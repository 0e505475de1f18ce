"""The train state and its shardings: born sharded, restored into the same shardings.

Optimizer moments take their parameter's sharding (`optax.tree_map_params`); counters and other scalars are
replicated. Left to the compiler, the zeros of `tx.init` come out replicated: every chip would hold a full copy
of both Adam moments.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from safework import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array    # [] int32: optimizer steps taken (rejected updates count: the step was spent)
  params: Any
  opt_state: Any


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target of a checkpoint of it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any, mesh: jax.sharding.Mesh) -> TrainState:
  """Shardings of the state for parameters with the given (abstract, sharded) leaves."""
  replicated = sharding.replicated(mesh)
  param_shardings = jax.tree.map(lambda x: x.sharding, abstract_params)
  opt_shape = jax.eval_shape(tx.init, abstract_params)
  masked = lambda x: isinstance(x, optax.MaskedNode)   # frozen parameters have no moments
  opt_shardings = optax.tree_map_params(tx, lambda x, s: x if masked(x) else s, opt_shape, param_shardings,
                                        transform_non_params=lambda _: replicated, is_leaf=masked)
  return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings)


def abstract_state(tx: optax.GradientTransformation, abstract_params: Any, mesh: jax.sharding.Mesh) -> TrainState:
  """The state's shapes, dtypes and shardings, without allocating it (a checkpoint restores into it)."""
  shardings = state_shardings(tx, abstract_params, mesh)
  shapes = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=abstract_params,
                      opt_state=jax.eval_shape(tx.init, abstract_params))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def new_state(tx: optax.GradientTransformation, params: Any, mesh: jax.sharding.Mesh) -> TrainState:
  """Step 0 for `params` (sharded on `mesh`); the optimizer state is created in its shardings."""
  shardings = state_shardings(tx, abstract_of(params), mesh)
  init = jax.jit(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p)),
                 out_shardings=shardings)
  with jax.set_mesh(mesh):
    return init(params)
