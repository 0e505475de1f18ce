"""The Qwen2 / Llama decoder with M-RoPE: GQA attention (Qwen2: q/k/v bias, no o bias; Llama: all four biased or
none), SwiGLU MLP, RMSNorm.

The layers are one `nn.scan` over a layer stacked along a leading "layers" axis, so compile time does not grow
with depth (80 layers at 72B); `models.hf_keys` maps the stacked parameters to Hugging Face's per-layer tensors.

The caller owns the KV cache: one `KVCache` [Y, B, S, K, H] for all layers, carried through the scan; layer y
writes its new keys into slice y in place (no per-layer copy of the cache). Keys are stored already rotated and
indexed by *slot*; positions are tracked separately (an image of n tokens advances the M-RoPE position by only
max(lh, lw)), so the slot index is never used as a position.

Axis legend: Y layers, B batch, T query time, S cache slots, D hidden, N heads, K kv heads, H head dim, F MLP width.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from safework.models import rope
from safework.models.attention import blockwise_attention, dot_product_attention, grouped_query_attention
from safework.models.splash import splash_attention
from safework.models.config import TextConfig
from safework.models.layers import Dtype, Einsum, GatedMLP, RMSNorm
from safework.models.remat import remat_module


@flax.struct.dataclass
class KVCache:
  """Every layer's keys and values, [Y, B, S, K, H] each; slot s holds the token written at write index s."""
  k: jax.Array
  v: jax.Array


def causal_padding_mask(key_valid: jax.Array, query_start: jax.Array | int, num_queries: int) -> jax.Array:
  """Causal + padding mask [B, T, S]: query t (at slot query_start + t) sees valid slots s <= its own slot."""
  slots = jnp.arange(key_valid.shape[-1])
  query_slots = query_start + jnp.arange(num_queries)
  return (slots[None, None, :] <= query_slots[None, :, None]) & key_valid[:, None, :].astype(bool)


ATTENTION = ("einsum", "blockwise", "dot_product", "splash")


def attend(q: jax.Array, keys: jax.Array, values: jax.Array, key_valid: jax.Array, query_start, kind: str
           ) -> jax.Array:
  """Causal attention of queries at slots query_start + t over keys [B, S] (valid where `key_valid`).

  einsum: the reference (the [T, S] scores at once); blockwise: flash attention in JAX (scores a block of keys at
  a time); dot_product: `jax.nn.dot_product_attention` (cuDNN flash attention on GPU); splash: the Pallas TPU
  kernel, for self-attention (a block attending its own keys: training, prefill); a block attending a cache prefix
  from another slot takes blockwise under splash, since splash's masks are static. One query (a decode step) has
  no [T, S] problem: it always takes einsum.
  """
  t = q.shape[1]
  if t == 1 or kind == "einsum":
    return grouped_query_attention(q, keys, values, causal_padding_mask(key_valid, query_start, t))
  if kind == "dot_product":
    return dot_product_attention(q, keys, values, causal_padding_mask(key_valid, query_start, t))
  if kind == "splash" and isinstance(query_start, int) and query_start == 0 and keys.shape[1] == t:
    return splash_attention(q, keys, values, key_valid)
  return blockwise_attention(q, keys, values, key_valid, query_start)


class DecoderLayer(nn.Module):
  cfg: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"
  collect: bool = False   # also output the layer's residual stream (stacked over layers by the scan)

  @nn.compact
  def __call__(self, carry: tuple[jax.Array, KVCache | None], layer: jax.Array, cos: jax.Array, sin: jax.Array,
               key_valid: jax.Array, write_index: jax.Array | int, attend_slots: int | None
               ) -> tuple[tuple[jax.Array, KVCache | None], jax.Array | None]:
    """Layer number `layer` on the scan's carry (hidden [B, T, D], cache); outputs its hidden states when
    collecting, else nothing."""
    x, cache = carry
    cfg, common = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    d, n, k, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    norm = lambda name: RMSNorm(d, cfg.rms_norm_eps, name=name, **common)

    y = norm("input_norm")(x)
    qkv_bias = 2 if cfg.qkv_bias else 0
    q = Einsum("btd,dnh->btnh", (d, n, h), ("embed", "heads", "head_dim"), bias_rank=qkv_bias, name="q_proj",
               **common)(y)
    kv = dict(equation="btd,dkh->btkh", shape=(d, k, h), axes=("embed", "kv_heads", "head_dim"), bias_rank=qkv_bias)
    keys = Einsum(**kv, name="k_proj", **common)(y)
    values = Einsum(**kv, name="v_proj", **common)(y)
    q, keys = rope.apply_rope(q, cos, sin), rope.apply_rope(keys, cos, sin)
    query_start = write_index
    if cache is not None:
      start = (layer, 0, write_index, 0, 0)
      cache = KVCache(k=jax.lax.dynamic_update_slice(cache.k, keys.astype(cache.k.dtype)[None], start),
                      v=jax.lax.dynamic_update_slice(cache.v, values.astype(cache.v.dtype)[None], start))
      if attend_slots is not None:   # the block attends the cache's first attend_slots slots
        keys, values = cache.k[layer, :, :attend_slots].astype(self.dtype), cache.v[layer, :, :attend_slots].astype(
            self.dtype)
      else:                          # the block attends its own keys only (a prefill of an empty cache)
        query_start = 0
    attended = attend(q, keys, values, key_valid, query_start, self.attention)
    x = x + Einsum("btnh,nhd->btd", (n, h, d), ("heads", "head_dim", "embed"), bias_rank=int(cfg.output_bias),
                   name="o_proj", **common)(attended)
    mlp = GatedMLP(d, cfg.intermediate_size, use_bias=False, name="mlp", **common)
    x = x + mlp(norm("post_attention_norm")(x))
    return (x, cache), (x if self.collect else None)


class TextDecoder(nn.Module):
  """Decoder layers (scanned) and the final norm, from input embeddings to final hidden states."""
  cfg: TextConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, key_valid: jax.Array, cache: KVCache | None = None,
               write_index: jax.Array | int = 0, attend_slots: int | None = None, collect: bool = False
               ) -> tuple[jax.Array, KVCache | None] | tuple[jax.Array, KVCache | None, jax.Array]:
    """x [B, T, D], positions [3, B, T] -> hidden [B, T, D] and the updated cache (and with `collect`, every
    layer's output [Y, B, T, D], the residual stream before the final norm, as transformers' hidden_states[1:]).

    Without a cache the block attends itself (causally; `key_valid` [B, T]). With one, the block is written at
    `write_index` and attends the cache's first `attend_slots` slots (`key_valid` [B, attend_slots]); with
    `attend_slots=None` it attends its own keys only (`key_valid` [B, T]): a prefill that writes an empty cache
    and costs what the prompt costs, not what the cache reserves.
    """
    cfg = self.cfg
    if self.attention not in ATTENTION:
      raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION}")
    cos, sin = rope.mrope_cos_sin(positions, cfg.rope_theta, cfg.head_dim, cfg.mrope_section, self.dtype,
                                  cfg.rope_scaling)
    layer = remat_module(DecoderLayer, self.remat_policy, in_scan=True, static_argnums=(7,))   # attend_slots
    layers = nn.scan(layer, variable_axes={"params": 0},
                     split_rngs={"params": True}, length=cfg.num_hidden_layers,
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                     metadata_params={nn.PARTITION_NAME: "layers"})
    (x, cache), per_layer = layers(cfg, self.dtype, self.param_dtype, self.attention, collect, name="layers")(
        (x, cache), jnp.arange(cfg.num_hidden_layers), cos, sin, key_valid, write_index, attend_slots)
    x = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, name="norm", dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return (x, cache, per_layer) if collect else (x, cache)
