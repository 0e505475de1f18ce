"""Attention kernels in plain einsums: grouped-query causal attention, and segment-blocked attention.

Eager numerics of transformers: scores in the activation dtype, softmax in fp32, probabilities cast back before
the product with V; masked scores take the dtype's finite minimum, so a fully masked row gives no NaN.

Axis legend: B batch, T query time, S key time, K kv heads, G query heads per kv head (N = K * G), H head dim,
R segments (rows of a block table), L block length, P patches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from safework.models.vision_layout import SegmentBlocks


def _masked_softmax(scores: jax.Array, mask: jax.Array, dtype) -> jax.Array:
  scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
  return jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(dtype)


def grouped_query_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] (True = attend) -> [B, T, N, H].

  Query head n reads kv head n // G (repeat-interleave), expressed by splitting N into (K, G): no KV copies.
  """
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(b, t, kv_heads, n // kv_heads, h)
  scores = jnp.einsum("btkgh,bskh->bkgts", q, k) * jnp.asarray(h**-0.5, q.dtype)
  probs = _masked_softmax(scores, mask[:, None, None, :, :], q.dtype)
  out = jnp.einsum("bkgts,bskh->btkgh", probs, v)
  return out.reshape(b, t, n, h)


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: SegmentBlocks) -> jax.Array:
  """Bidirectional attention within segments. q/k/v [P, N, H] -> [P, N, H]."""
  p = q.shape[0]
  blocks = jnp.asarray(segments.blocks)

  def gather(x):   # [P, N, H] -> [R, L, N, H], padding rows read an appended zero row
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[blocks]

  qb, kb, vb = gather(q), gather(k), gather(v)
  scores = jnp.einsum("rqnh,rknh->rnqk", qb, kb) * jnp.asarray(q.shape[-1]**-0.5, q.dtype)
  probs = _masked_softmax(scores, (blocks < p)[:, None, None, :], q.dtype)
  out = jnp.einsum("rnqk,rknh->rqnh", probs, vb)
  return out.reshape((-1,) + out.shape[2:])[jnp.asarray(segments.slots)]
