"""The model interface the sampler, the RL loss, the verifiers and evaluation use: every family implements it.

The pieces are separate methods (not one forward) so that prefill, cached decoding and chunked log-probs never
materialise what they do not need: `embed` the tokens (vision features in place of their placeholders), `decode`
over a KV cache, and project only the hidden states that matter through `output_embedding`. Host-side positions
and vision layouts come from `models.prepare_inputs(model.config, ...)`, which dispatches on the config's type.

Axis legend: B batch, T time, S cache slots, D hidden, V vocab, M vision tokens.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from safework.models.text import KVCache


class CausalLM(Protocol):
  """A flax module; call its methods through `model.apply({"params": p}, ..., method="embed")`."""
  config: Any   # .text: the decoder's `TextConfig`; .bos/.eos/.pad_token_id; .tie_word_embeddings
  dtype: Any

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None,
            video_features: jax.Array | None = None) -> jax.Array:
    """Embeddings [B, T, D]; features [M, D] replace the placeholder tokens (a text-only family takes none)."""

  def decode(self, embeds: jax.Array, positions: jax.Array, key_valid: jax.Array, cache: KVCache | None = None,
             write_index: jax.Array | int = 0, attend_slots: int | None = None) -> tuple[jax.Array, KVCache | None]:
    """Final hidden states [B, T, D] from embeddings and positions [3, B, T] (see `models.text.TextDecoder`)."""

  def output_embedding(self) -> jax.Array:
    """The [V, D] matrix that maps hidden states to logits."""

  def logits(self, hidden: jax.Array) -> jax.Array:
    """Logits [B, T, V] of hidden states [B, T, D]."""


class VisionLM(CausalLM, Protocol):
  """A family that reads images: `encode_vision` turns pixels into the features `embed` merges."""

  def encode_vision(self, pixel_values: jax.Array, layout: Any) -> jax.Array:
    """Features [M, D] of the images of `layout` (from `prepare_inputs`)."""
