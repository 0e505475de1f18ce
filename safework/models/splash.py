"""Pallas splash attention (the TPU flash-attention kernel) for self-attention over padded rows.

Padding is expressed by segment ids (valid slots 1, padding 0), so neither causal rows nor the vision tower's
whole-frame blocks need a [T, S] mask: a valid query sees only valid keys, a padding query only padding keys
(never none, so never NaN; its output is discarded). Grouped-query heads run as the kernel's multi-query form, one
call per kv head. Sequences are padded to a multiple of the kernel block.

The kernel runs per device. Under a mesh (`jax.set_mesh`) it is wrapped in `shard_map`: batch and kv heads split
over the mesh axes the sharding rules in effect give "batch" and "kv_heads" (`sharding.rules_in_effect`), rows
padded to a multiple of the batch shards, kv heads over the axes that divide them. Off TPU the same kernel runs in
Pallas' interpreter, chosen at lowering time, so the planner compiles the real kernel for a TPU slice and tests on
CPU check it against the einsum reference.

Axis legend: B batch, T time (queries and keys), N query heads, K kv heads, G query heads per kv head, H head dim.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernels
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks
from jax.sharding import PartitionSpec as P

from safework import sharding

KERNEL_BLOCK = 128   # the kernel's smallest block; lengths are padded to a multiple of it


def _kernel(length: int, heads: int, causal: bool, interpret: bool):
  """Built per trace (the kernel holds arrays; caching it across traces would leak tracers)."""
  block = next(b for b in (512, 256, KERNEL_BLOCK) if length % b == 0)
  sizes = kernels.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                             block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  shape = (length, length)
  mask = masks.MultiHeadMask([masks.CausalMask(shape) if causal else masks.FullMask(shape)] * heads)
  return kernels.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)


def _attend_shard(q, k, v, segments, causal: bool, interpret: bool):
  """One device's rows: q [B, T, N, H], k/v [B, T, K, H], segments [B, T] -> [B, T, N, H]."""
  b, t, n, h = q.shape
  kv_heads = k.shape[2]
  kernel = _kernel(t, n // kv_heads, causal, interpret)
  qg = jnp.einsum("btkgh->bkgth", q.reshape(b, t, kv_heads, n // kv_heads, h)) * jnp.asarray(h**-0.5, q.dtype)
  call = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=kernels.SegmentIds(q=s1, kv=s1))
  per_row = jax.vmap(jax.vmap(call, in_axes=(0, 0, 0, None)), in_axes=(0, 0, 0, 0))
  out = per_row(qg, jnp.einsum("btkh->bkth", k), jnp.einsum("btkh->bkth", v), segments)   # [B, K, G, T, H]
  return jnp.einsum("bkgth->btkgh", out).reshape(b, t, n, h)


def _dividing_axes(mesh, candidates: tuple[str, ...], size: int) -> tuple[str, ...]:
  """The candidate mesh axes, in order, whose running product divides `size`."""
  chosen: list[str] = []
  for axis in candidates:
    if axis in mesh.shape and size % (math.prod(mesh.shape[a] for a in chosen) * mesh.shape[axis]) == 0:
      chosen.append(axis)
  return tuple(chosen)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, causal: bool = True
                     ) -> jax.Array:
  """Self-attention: q [B, T, N, H], k/v [B, T, K, H] at the same slots, key_valid [B, T] -> [B, T, N, H].

  Equal to `grouped_query_attention` with the causal (or, with `causal=False`, full) padding mask on every valid
  query.
  """
  b, t = q.shape[:2]
  mesh = jax.sharding.get_abstract_mesh()
  rules = sharding.active_rules()
  # Inside a shard_map (the vision shards) its axes are taken.
  free = lambda axes: tuple(a for a in axes if a in mesh.shape and a not in mesh.manual_axes)
  batch = () if mesh.empty else free(sharding.mesh_axes(rules, "batch"))
  heads = () if mesh.empty else _dividing_axes(mesh, free(sharding.mesh_axes(rules, "kv_heads")), k.shape[2])
  heads = tuple(a for a in heads if a not in batch)
  # Rows padded to a multiple of the batch shards (a padding row is all padding: segment 0), so every device runs
  # its own rows even when they do not divide (8 prompts' prefill on 16 devices); a Mosaic kernel cannot be left
  # to GSPMD, which would have to replicate it.
  rows_pad = -b % math.prod(mesh.shape[a] for a in batch)
  pad = lambda x, time: jnp.pad(x, [(0, rows_pad), (0, time)] + [(0, 0)] * (x.ndim - 2))
  time_pad = -t % KERNEL_BLOCK
  q, k, v = pad(q, time_pad), pad(k, time_pad), pad(v, time_pad)
  segments = pad(key_valid.astype(jnp.int32), time_pad)

  def run(interpret: bool):
    attend = functools.partial(_attend_shard, causal=causal, interpret=interpret)
    if mesh.empty:
      return attend
    rows = P(batch or None, None, heads or None, None)
    # Manual over every free axis: those that split nothing run the kernel on their replicas.
    return jax.shard_map(attend, in_specs=(rows, rows, rows, P(batch or None, None)), out_specs=rows,
                         axis_names=frozenset(free(mesh.axis_names)), check_vma=False)

  out = jax.lax.platform_dependent(q, k, v, segments, tpu=run(interpret=False), default=run(interpret=True))
  return out[:b, :t]
