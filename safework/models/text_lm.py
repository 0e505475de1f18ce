"""A text-only causal language model (Llama 3.x, Qwen2/Qwen2.5) with the same interface as `Qwen25VL`.

The sampler, the RL loss and the verifiers call `embed`, `decode`, `logits` and `output_embedding` (see
`models.protocol.CausalLM`); here `embed` is a plain lookup and positions are 1D (three equal rows).

Axis legend: B batch, T time, D hidden, V vocab.
"""

from __future__ import annotations

import jax
import numpy as np

from safework.models.decoder_lm import DecoderLM
from safework.models.hf_keys import HfTensor, ParamPath, language_model_tensors
from safework.models.text_lm_config import TextLMConfig


class TextLM(DecoderLM):
  config: TextLMConfig

  def setup(self):
    self.setup_decoder()

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None,
            video_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, T, D]; a text-only model has no features to merge."""
    if image_features is not None or video_features is not None:
      raise ValueError(f"{self.config.model_type} is a text-only model: it takes no image or video features")
    return self.token_embeddings(input_ids)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               position_ids: jax.Array | None = None, return_hidden: bool = False) -> jax.Array:
    """Logits [B, T, V] (or final hidden states), like `LlamaForCausalLM.forward` with `position_ids` [B, T]
    (default: counted over the unpadded tokens, as `generate` does)."""
    hidden = self.decode_1d(self.embed(input_ids), attention_mask, position_ids)
    return hidden if return_hidden else self.logits(hidden)


def dummy_inputs(cfg: TextLMConfig) -> dict[str, np.ndarray]:
  return dict(input_ids=np.zeros((1, 1), np.int32))


def hf_tensor_map(cfg: TextLMConfig) -> dict[ParamPath, HfTensor]:
  """Every parameter path of `TextLM(cfg)` with its checkpoint tensor."""
  return language_model_tensors(cfg.text, cfg.tie_word_embeddings)
