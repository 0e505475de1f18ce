"""The attention kernels (blockwise flash attention in JAX, jax.nn.dot_product_attention, Pallas splash in its
interpreter) against the einsum reference: values, gradients, under a mesh, and through the model."""

import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

from safework.models import Qwen25VL, get_preset, init_params
from safework import sharding
from safework.models.attention import blockwise_attention, dot_product_attention, grouped_query_attention
from safework.models.splash import splash_attention
from safework.models.inputs import prepare_inputs
from safework.models.text import causal_padding_mask
from safework.rl.batch import build_sequences, prompt_feature_index
from safework.rl.logprobs import response_logprobs


KERNELS = {
    "blockwise": lambda q, k, v, valid, query_start, causal, block: blockwise_attention(
        q, k, v, valid, query_start, causal=causal, block=block),
    "dot_product": lambda q, k, v, valid, query_start, causal, block: dot_product_attention(
        q, k, v, _mask(valid, query_start, q.shape[1], causal)),
    "splash": lambda q, k, v, valid, query_start, causal, block: splash_attention(q, k, v, valid, causal=causal),
}


def _mask(valid, query_start, t, causal):
  b, s = valid.shape
  return causal_padding_mask(valid, query_start, t) if causal else jnp.broadcast_to(valid[:, None], (b, t, s))


@pytest.mark.parametrize("kind,query_start,causal,block", [
    ("blockwise", 0, True, 4), ("blockwise", 6, True, 3), ("blockwise", 0, False, 16),
    ("dot_product", 6, True, 0), ("dot_product", 0, False, 0),
    ("splash", 0, True, 0), ("splash", 0, False, 0)])
def test_kernels_equal_einsum_values_and_gradients(kind, query_start, causal, block):
  rng = np.random.default_rng(0)
  self_attention = kind == "splash"   # splash serves a block attending its own keys
  b, t, s, n, kv, h = 3, 5 if not self_attention else 11, 11, 4, 2, 8
  q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((b, t, n, h), (b, s, kv, h), (b, s, kv, h)))
  valid = np.ones((b, s), bool)
  valid[0, :3] = False           # left padding
  valid[2, 4:] = False           # a short row: its late queries see only early keys
  valid[1] = False               # no key at all: a padding row, whose output is unused
  valid = jnp.asarray(valid)
  mask = _mask(valid, query_start, t, causal)
  seen = np.asarray(mask.any(-1))
  if self_attention:              # a padding query's output is unused (rows read only valid slots)
    seen = seen & np.asarray(valid)
  weights = jnp.asarray(rng.normal(size=(b, t, n, h)), jnp.float32) * seen[..., None, None]

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  reference = lambda q, k, v: grouped_query_attention(q, k, v, mask)
  kernel = lambda q, k, v: KERNELS[kind](q, k, v, valid, query_start, causal, block)
  np.testing.assert_allclose(np.asarray(kernel(q, k, v))[seen], np.asarray(reference(q, k, v))[seen], atol=2e-6)
  if kind == "blockwise":
    assert not np.asarray(kernel(q, k, v))[1].any()   # no visible key: zeros
  expected = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(loss(kernel), argnums=(0, 1, 2))(q, k, v)
  for g, e in zip(got, expected):
    np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=5e-6)


@pytest.mark.parametrize("kind", ["blockwise", "dot_product", "splash"])
def test_the_training_log_probs_and_their_gradients_agree_through_the_model(kind):
  cfg = get_preset("tiny")
  einsum = Qwen25VL(cfg)
  params = nn.meta.unbox(init_params(einsum, jax.random.key(0)))
  rng = np.random.default_rng(1)
  ids = rng.integers(10, 400, size=(2, 24)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :9] = 0                 # a left-padded prompt
  prepared = prepare_inputs(cfg, ids, mask)
  responses = rng.integers(10, 400, size=(4, 20)).astype(np.int32)
  batch = build_sequences(ids, mask, prepared, prompt_feature_index(ids, cfg.placeholder_token_ids),
                          responses, np.array([20, 13, 7, 20], np.int32), np.zeros((4, 20), np.float32),
                          np.ones(4, np.float32))
  batch = jax.tree.map(jnp.asarray, batch)

  def total(model):
    def f(p):
      logp, _ = response_logprobs(model, p, batch, None, chunk=16)
      return jnp.sum(logp * batch.loss_mask), logp
    return jax.jit(jax.value_and_grad(f, has_aux=True))

  (_, expected), expected_grad = total(einsum)(params)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})   # splash runs per shard under shard_map
  with jax.set_mesh(mesh):
    (_, got), got_grad = total(einsum.clone(attention=kind))(params)
  # Splash lets a padding query see only padding keys, so log-probs agree where they count (the loss mask).
  compared = np.asarray(batch.loss_mask, bool) if kind == "splash" else np.ones(np.shape(got), bool)
  assert compared.sum() > 40
  np.testing.assert_allclose(np.asarray(got)[compared], np.asarray(expected)[compared], atol=2e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), got_grad, expected_grad)


@pytest.mark.parametrize("kind", ["blockwise", "dot_product", "splash"])
def test_the_vision_tower_encodes_alike_with_each_kernel(kind):
  cfg = get_preset("tiny")
  model = Qwen25VL(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  grids = np.array([[1, 4, 6], [1, 10, 14], [2, 4, 4]])   # frames of different sizes: padded segments
  patches = int(np.prod(grids, axis=1).sum())
  pixels = np.random.default_rng(0).normal(size=(patches, cfg.vision.patch_dim)).astype(np.float32)
  layout = prepare_inputs(cfg, np.array([[cfg.image_token_id] * (patches // 4)]), image_grid_thw=grids,
                          pixel_values=pixels).image_layout
  encode = lambda m: m.apply({"params": params}, pixels, layout, method=Qwen25VL.encode_vision)
  assert layout.frames.blocks.shape[1] >= 128   # the largest frame takes the splash kernel, not its einsum fallback
  np.testing.assert_allclose(np.asarray(encode(model.clone(attention=kind))), np.asarray(encode(model)), atol=2e-5)


def _shard_maps(jaxpr):
  """The params of every shard_map in a jaxpr, nested ones included."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "shard_map":
      yield eqn.params
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, (jax_core.ClosedJaxpr, jax_core.Jaxpr)):
          yield from _shard_maps(getattr(sub, "jaxpr", sub))


@pytest.mark.parametrize("rules,batch,heads", [
    (sharding.DEFAULT_RULES, ("data", "fsdp"), "tensor"),
    ((("batch", "data"), ("kv_heads", None)), "data", None),
    ((("batch", "fsdp"), ("kv_heads", ("data", "tensor"))), "fsdp", "data"),   # 2 kv heads: tensor would not divide
])
def test_splash_splits_its_work_as_the_rules_in_effect_split_the_model(rules, batch, heads):
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  q, kv, valid = jnp.zeros((4, 16, 4, 8)), jnp.zeros((4, 16, 2, 8)), jnp.ones((4, 16), bool)
  with jax.set_mesh(mesh), sharding.rules_in_effect(rules):
    jaxpr = jax.make_jaxpr(lambda *a: splash_attention(*a))(q, kv, kv, valid)   # a fresh trace per rules
  specs = {p["in_specs"][-4:] for p in _shard_maps(jaxpr.jaxpr)}   # q, k, v, segment ids
  rows = jax.sharding.PartitionSpec(batch, None, heads, None)
  assert specs == {(rows, rows, rows, jax.sharding.PartitionSpec(batch, None))}


def test_splash_pads_rows_that_do_not_divide_the_batch_shards_and_stays_exact():
  """3 rows on 4 batch shards (a prefill of fewer prompts than devices): padded to 4, one row per shard; a Mosaic
  kernel left outside shard_map could not be compiled for a TPU slice."""
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.normal(size=(3, 20, heads, 8)), jnp.float32) for heads in (4, 2, 2))
  valid = np.ones((3, 20), bool)
  valid[1, :7] = False
  valid = jnp.asarray(valid)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  with jax.set_mesh(mesh), sharding.rules_in_effect(sharding.DEFAULT_RULES):
    jaxpr = jax.make_jaxpr(lambda *a: splash_attention(*a))(q, k, k, valid)
    got = jax.jit(lambda *a: splash_attention(*a))(q, k, v, valid)
  segment_specs = {p["in_specs"][-1] for p in _shard_maps(jaxpr.jaxpr)}
  assert segment_specs == {jax.sharding.PartitionSpec(("data", "fsdp"), None)}
  expected = grouped_query_attention(q, k, v, causal_padding_mask(valid, 0, 20))
  np.testing.assert_allclose(np.asarray(got)[np.asarray(valid)], np.asarray(expected)[np.asarray(valid)], atol=2e-6)
