"""Structural invariants of Qwen25VL: logical axes on every parameter, causality, remat, dtype split."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safework.models import Qwen25VL, get_preset, init_params
from safework.models.checkpoint import abstract_params
from safework.models.qwen2_5_vl import dummy_inputs

CFG = get_preset("tiny")
AXES = {"layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "vision_embed", "vision_heads", "vision_mlp",
        "vision_merge", None}


def test_every_parameter_has_logical_axes_of_its_rank():
  boxed = abstract_params(Qwen25VL(CFG))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  for leaf in leaves:
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXES


def _init(model):
  return nn.meta.unbox(jax.jit(init_params, static_argnums=0)(model, jax.random.key(0)))


def _text_logits_fn(model, params):
  def logits(embeds):
    b, t, _ = embeds.shape
    positions = jnp.broadcast_to(jnp.arange(t), (3, b, t))
    hidden, _ = model.apply({"params": params}, embeds, positions, jnp.ones((b, t), bool),
                            method=Qwen25VL.decode)
    return model.apply({"params": params}, hidden, method=Qwen25VL.logits)
  return logits


def test_causality_by_gradients():
  model = Qwen25VL(CFG)
  params = _init(model)
  embeds = jax.random.normal(jax.random.key(1), (1, 6, CFG.text.hidden_size))
  jac = jax.jit(jax.grad(lambda e: _text_logits_fn(model, params)(e)[0, 2].sum()))(embeds)   # d logits[2] / d embeds
  influence = np.abs(np.asarray(jac[0])).sum(-1)
  assert np.all(influence[:3] > 0) and np.all(influence[3:] == 0)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_give_the_same_gradients(policy):
  plain, remat = Qwen25VL(CFG), Qwen25VL(CFG, remat_policy=policy)
  params = _init(plain)
  inputs = dummy_inputs(CFG)

  def loss(model, p):
    return model.apply({"params": p}, **inputs).astype(jnp.float32).std()

  expected = jax.jit(jax.grad(lambda p: loss(plain, p)))(params)
  got = jax.jit(jax.grad(lambda p: loss(remat, p)))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), expected, got)


def test_compute_dtype_is_separate_from_parameter_dtype():
  model = Qwen25VL(CFG, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  params = _init(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert jax.jit(lambda p: model.apply({"params": p}, **dummy_inputs(CFG)))(params).dtype == jnp.bfloat16


def test_unknown_remat_policy_is_rejected():
  with pytest.raises(ValueError, match="unknown remat policy"):
    init_params(Qwen25VL(CFG, remat_policy="everything"), jax.random.key(0))
