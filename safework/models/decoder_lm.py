"""The half every family shares: token embeddings, the scanned decoder and the output head.

A family subclasses `DecoderLM`, calls `setup_decoder()` from its own `setup` (after adding its vision tower, if
any) and writes `embed`; `decode`, `output_embedding` and `logits` (`models.protocol.CausalLM`) come from here.

Axis legend: B batch, T time, D hidden, V vocab.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from safework.models.inputs import text_positions
from safework.models.layers import Dtype, default_kernel_init, logical_param
from safework.models.text import ATTENTION, KVCache, TextDecoder


class DecoderLM(nn.Module):
  config: Any   # the family's config: .text (TextConfig), .tie_word_embeddings
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention: str = "einsum"   # the attention kernel of the decoder (and vision tower): models.text.ATTENTION

  def setup_decoder(self) -> None:
    cfg = self.config
    if self.attention not in ATTENTION:
      raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION}")
    vocab, hidden = cfg.text.vocab_size, cfg.text.hidden_size
    self.decoder = TextDecoder(cfg.text, dtype=self.dtype, param_dtype=self.param_dtype,
                               remat_policy=self.remat_policy, attention=self.attention)
    self.embed_tokens = logical_param(self, "embed_tokens", (vocab, hidden), ("vocab", "embed"), default_kernel_init,
                                      self.param_dtype)
    if not cfg.tie_word_embeddings:
      self.lm_head = logical_param(self, "lm_head", (vocab, hidden), ("vocab", "embed"), default_kernel_init,
                                   self.param_dtype)

  def token_embeddings(self, input_ids: jax.Array) -> jax.Array:
    return jnp.take(self.embed_tokens, input_ids, axis=0).astype(self.dtype)

  def decode(self, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array, cache: KVCache | None = None,
             write_index: jax.Array | int = 0, attend_slots: int | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final hidden states [B, T, D] (and the updated cache) from embeddings and positions [3, B, T]; attention
    is causal over the valid keys (see `models.text.TextDecoder`)."""
    return self.decoder(embeds, positions, key_valid, cache, write_index, attend_slots)

  def decode_1d(self, embeds: jax.Array, attention_mask: jax.Array | None = None,
                position_ids: jax.Array | None = None) -> jax.Array:
    """Final hidden states [B, T, D] of a whole sequence with 1D positions: `position_ids` [B, T] (or its three
    rows), by default counted over the unpadded tokens, as `generate` numbers a left-padded batch."""
    b, t = embeds.shape[:2]
    key_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
    positions = text_positions(key_valid) if position_ids is None else jnp.broadcast_to(position_ids, (3, b, t))
    return self.decode(embeds, positions, key_valid)[0]

  def decode_layers(self, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array) -> jax.Array:
    """Every decoder layer's output [Y, B, T, D] (the residual stream before the final norm), for analysis."""
    return self.decoder(embeds, positions, key_valid, collect=True)[2]

  def output_embedding(self) -> jax.Array:
    """The [V, D] matrix that maps hidden states to logits (the input embedding when tied)."""
    return self.embed_tokens if self.config.tie_word_embeddings else self.lm_head

  def logits(self, hidden: jax.Array) -> jax.Array:
    return jnp.einsum("btd,vd->btv", hidden, self.output_embedding().astype(self.dtype))
