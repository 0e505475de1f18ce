"""Tiny random `transformers` Qwen2.5-VL models, built locally, as the reference for parity tests."""

from __future__ import annotations

import numpy as np
import torch
import transformers

# Token ids of the tiny reference vocabulary.
PAD, IM_START, IM_END, VISION_START, VISION_END, IMAGE, VIDEO = 0, 1, 2, 3, 4, 6, 7
VOCAB = 320   # room for a byte-level BPE tokenizer (256 bytes + specials + merges)


def tiny_config(tied: bool = False, kv_heads: int = 2, vision_depth: int = 4) -> transformers.Qwen2_5_VLConfig:
  return transformers.Qwen2_5_VLConfig(
      text_config=dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       rms_norm_eps=1e-6, tie_word_embeddings=tied, initializer_range=0.1,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]},
                       bos_token_id=PAD, eos_token_id=IM_END, pad_token_id=PAD),
      vision_config=dict(depth=vision_depth, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                         patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                         fullatt_block_indexes=[1, 3][: vision_depth // 2], tokens_per_second=2),
      image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VISION_START,
      vision_end_token_id=VISION_END, tie_word_embeddings=tied)


def tiny_model(config: transformers.Qwen2_5_VLConfig, seed: int = 0):
  """A random model in eager fp32 with randomised norm weights and biases, so a dropped one shows."""
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  model = transformers.Qwen2_5_VLForConditionalGeneration(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("bias") or "norm" in name or "ln_q" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p) if "norm" in name or "ln_q" in name else 0.2 * torch.randn_like(p))
  return model


def image_prompt(grids: list[tuple[int, int, int]], text: list[int], token: int = IMAGE, merge: int = 2) -> list[int]:
  """<im_start> text <vision_start><pad * n><vision_end> ... <im_end> <im_start>."""
  ids = [IM_START] + text
  for t, h, w in grids:
    ids += [VISION_START] + [token] * (t * h * w // merge**2) + [VISION_END] + text[:3]
  return ids + [IM_END, IM_START, 9]


def pixels(grids, patch_dim: int, seed: int = 0) -> np.ndarray:
  rows = sum(t * h * w for t, h, w in grids)
  return np.random.default_rng(seed).standard_normal((rows, patch_dim)).astype(np.float32)


def token_types(ids: np.ndarray) -> np.ndarray:
  return np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))


def hf_forward(model, **arrays):
  """The reference forward: logits, and the vision features of images and videos."""
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in arrays.items() if v is not None}
  if "input_ids" in tensors:
    tensors["mm_token_type_ids"] = torch.from_numpy(token_types(arrays["input_ids"]))
  with torch.no_grad():
    out = model(**tensors)
  return out
