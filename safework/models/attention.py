"""Attention kernels: grouped-query causal attention and segment-blocked attention, as plain einsums (the
reference), as blockwise flash attention in JAX (for long sequences and large frames), through
`jax.nn.dot_product_attention` (cuDNN's fused flash attention on GPU) and through Pallas splash attention on TPU
(`models.splash`).

The einsum kernels keep transformers' eager numerics: scores in the activation dtype, softmax in fp32,
probabilities cast back before the product with V; masked scores take the dtype's finite minimum, so a fully
masked row gives no NaN.

Axis legend: B batch, T query time, S key time, K kv heads, G query heads per kv head (N = K * G), H head dim,
R segments (rows of a block table), L block length, P patches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from safework.models import splash
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


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
  """`grouped_query_attention` through `jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU in bf16/fp16
  (the mask enters as a bias), XLA's implementation elsewhere. mask [B or 1, T, S]."""
  on_cudnn = jax.default_backend() == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16)
  return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation="cudnn" if on_cudnn else "xla")


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, segments: SegmentBlocks, kind: str = "einsum"
                      ) -> jax.Array:
  """Bidirectional attention within segments. q/k/v [P, N, H] -> [P, N, H].

  einsum scores each segment's [L, L] at once; blockwise (flash attention), dot_product (cuDNN on GPU) and splash
  (TPU) serve the full-attention blocks whose segments are whole frames (thousands of patches at the paper's image
  sizes). Segments shorter than one splash block (the 64-patch windows) take einsum under splash.
  """
  p = q.shape[0]
  blocks = jnp.asarray(segments.blocks)

  def gather(x):   # [P, N, H] -> [R, L, N, H], padding rows read an appended zero row
    return jnp.concatenate([x, jnp.zeros((1,) + x.shape[1:], x.dtype)])[blocks]

  qb, kb, vb = gather(q), gather(k), gather(v)
  valid = blocks < p
  if kind == "blockwise":
    out = blockwise_attention(qb, kb, vb, valid, causal=False)
  elif kind == "dot_product":
    out = dot_product_attention(qb, kb, vb, valid[:, None, :])
  elif kind == "splash" and blocks.shape[1] >= splash.KERNEL_BLOCK:
    out = splash.splash_attention(qb, kb, vb, valid, causal=False)
  else:
    scores = jnp.einsum("rqnh,rknh->rnqk", qb, kb) * jnp.asarray(q.shape[-1]**-0.5, q.dtype)
    probs = _masked_softmax(scores, valid[:, None, None, :], q.dtype)
    out = jnp.einsum("rnqk,rknh->rqnh", probs, vb)
  return out.reshape((-1,) + out.shape[2:])[jnp.asarray(segments.slots)]


# -- blockwise (flash) attention -----------------------------------------------------------------------------------
#
# Keys in blocks of `block` slots with an online softmax (running max and normaliser), so no [T, S] score matrix
# exists at once: memory grows with T * block, not T * S. The backward pass is flash attention's: it recomputes
# each block's probabilities from the saved log-normaliser instead of storing them. Scores, softmax and
# accumulation run in fp32. A query with no visible key (a padding row) gets zeros.


def _key_blocks(x: jax.Array, block: int) -> jax.Array:
  """[B, S, ...] -> [S / block, B, block, ...] (S padded to a multiple of block)."""
  s = x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, -s % block)] + [(0, 0)] * (x.ndim - 2))
  return jnp.swapaxes(x.reshape((x.shape[0], -1, block) + x.shape[2:]), 0, 1)


def _visible(key_valid_block, slots_block, query_slots, causal: bool) -> jax.Array:
  """[B, 1, 1, T, block]: which keys of the block each query sees."""
  seen = key_valid_block[:, None, None, None, :]
  if causal:
    seen = seen & (slots_block[None, None, None, None, :] <= query_slots[None, None, None, :, None])
  return seen


def _flash_forward(q, k, v, key_valid, query_start, causal: bool, block: int):
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  qg = q.reshape(b, t, kv_heads, n // kv_heads, h).astype(jnp.float32) * h**-0.5
  query_slots = query_start + jnp.arange(t)
  slots = jnp.arange(k.shape[1] + (-k.shape[1] % block)).reshape(-1, block)

  def step(carry, xs):
    running_max, normaliser, acc = carry             # [B, K, G, T], [B, K, G, T], [B, T, K, G, H]
    k_blk, v_blk, valid_blk, slots_blk = xs
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k_blk.astype(jnp.float32))
    scores = jnp.where(_visible(valid_blk, slots_blk, query_slots, causal), scores, -jnp.inf)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    safe_max = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    probs = jnp.exp(scores - safe_max[..., None])
    rescale = jnp.exp(running_max - safe_max)
    normaliser = normaliser * rescale + probs.sum(axis=-1)
    acc = acc * jnp.moveaxis(rescale, 3, 1)[..., None] + jnp.einsum("bkgts,bskh->btkgh", probs,
                                                                  v_blk.astype(jnp.float32))
    return (new_max, normaliser, acc), None

  g = n // kv_heads
  init = (jnp.full((b, kv_heads, g, t), -jnp.inf), jnp.zeros((b, kv_heads, g, t)),
          jnp.zeros((b, t, kv_heads, g, h)))
  xs = (_key_blocks(k, block), _key_blocks(v, block), _key_blocks(key_valid, block), slots)
  (running_max, normaliser, acc), _ = jax.lax.scan(step, init, xs)
  seen = normaliser > 0
  out = acc / jnp.moveaxis(jnp.where(seen, normaliser, 1.0), 3, 1)[..., None]
  log_normaliser = jnp.where(seen, running_max + jnp.log(jnp.where(seen, normaliser, 1.0)), jnp.inf)
  return out.reshape(b, t, n, h).astype(q.dtype), log_normaliser


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, key_valid, query_start, causal, block):
  return _flash_forward(q, k, v, key_valid, query_start, causal, block)[0]


def _flash_fwd(q, k, v, key_valid, query_start, causal, block):
  out, log_normaliser = _flash_forward(q, k, v, key_valid, query_start, causal, block)
  return out, (q, k, v, key_valid, query_start, out, log_normaliser)


def _flash_bwd(causal, block, residuals, d_out):
  q, k, v, key_valid, query_start, out, log_normaliser = residuals
  b, t, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  g = n // kv_heads
  scale = h**-0.5
  qg = q.reshape(b, t, kv_heads, g, h).astype(jnp.float32)
  dog = d_out.reshape(b, t, kv_heads, g, h).astype(jnp.float32)
  # D = rowsum(dO * O): the softmax's backward term, per query and head.
  delta = jnp.einsum("btkgh,btkgh->bkgt", dog, out.reshape(b, t, kv_heads, g, h).astype(jnp.float32))
  query_slots = query_start + jnp.arange(t)
  slots = jnp.arange(s + (-s % block)).reshape(-1, block)

  def step(dq, xs):
    k_blk, v_blk, valid_blk, slots_blk = xs
    k32, v32 = k_blk.astype(jnp.float32), v_blk.astype(jnp.float32)
    scores = jnp.einsum("btkgh,bskh->bkgts", qg, k32) * scale
    visible = _visible(valid_blk, slots_blk, query_slots, causal)
    probs = jnp.where(visible, jnp.exp(scores - log_normaliser[..., None]), 0.0)
    d_probs = jnp.einsum("btkgh,bskh->bkgts", dog, v32)
    d_scores = probs * (d_probs - delta[..., None]) * scale
    dq = dq + jnp.einsum("bkgts,bskh->btkgh", d_scores, k32)
    dk = jnp.einsum("bkgts,btkgh->bskh", d_scores, qg)
    dv = jnp.einsum("bkgts,btkgh->bskh", probs, dog)
    return dq, (dk, dv)

  xs = (_key_blocks(k, block), _key_blocks(v, block), _key_blocks(key_valid, block), slots)
  dq, (dk, dv) = jax.lax.scan(step, jnp.zeros(qg.shape, jnp.float32), xs)
  unblock = lambda x: jnp.swapaxes(x, 0, 1).reshape((b, -1) + x.shape[3:])[:, :s]
  return (dq.reshape(q.shape).astype(q.dtype), unblock(dk).astype(k.dtype), unblock(dv).astype(v.dtype),
          None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array,
                        query_start: jax.Array | int = 0, causal: bool = True, block: int = 512) -> jax.Array:
  """Flash attention in plain JAX: q [B, T, N, H], k/v [B, S, K, H], key_valid [B, S] -> [B, T, N, H].

  Query t sits at slot `query_start + t` and, when `causal`, sees the valid slots up to its own; otherwise every
  valid slot. Equal to `grouped_query_attention` with `causal_padding_mask` on every query that sees a key.
  """
  return _flash(q, k, v, key_valid.astype(bool), jnp.asarray(query_start, jnp.int32), causal,
                min(block, k.shape[1]))
