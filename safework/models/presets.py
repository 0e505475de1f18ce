"""Named model shapes: the released Qwen2.5-VL sizes, the paper's other backbones (InternVL3, DeepSeek-R1-Distill-
Llama and -Qwen), and tiny ones for tests and CPU runs.

The released shapes come from the checkpoints' own `config.json` files (Qwen2.5-VL's vision MLP is 3420 for
3B/7B, 3456 for 32B/72B; the tech report's table is wrong there). A real checkpoint's `config.json` always wins
over a preset.
"""

from __future__ import annotations

from safework.models.config import Llama3RopeScaling, ModelConfig, TextConfig, VisionConfig
from safework.models.internvl_config import InternVisionConfig, InternVLConfig, text_config
from safework.models.text_lm_config import TextLMConfig, text_only


def _released(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int, vision_mlp: int,
              tied: bool) -> ModelConfig:
  return ModelConfig(
      text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads),
      vision=VisionConfig(intermediate_size=vision_mlp, out_hidden_size=hidden),
      tie_word_embeddings=tied)


# Token ids of the tiny tokenizer (safework.tokenizer builds it with these specials first, in this order).
TINY_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                       "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

# InternVL3: InternViT, pixel shuffle and an MLP projector before a Qwen2.5 language model.
def _qwen25(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> TextConfig:
  """A Qwen2.5 language model as InternVL3 ships it: its vocabulary grown to 151674 for <img>/<IMG_CONTEXT>/..."""
  return text_config(vocab_size=151674, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=1e-6, rope_theta=1e6,
                     max_position_embeddings=32768)


# InternViT-300M-448px-V2_5 (LayerNorm, q/k/v biases) and InternViT-6B-448px-V2_5 (45 of its 48 layers, RMSNorm,
# QK-norm, no q/k/v biases).
_VIT_300M = InternVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               attention_bias=True)
_VIT_6B = InternVisionConfig(hidden_size=3200, intermediate_size=12800, num_hidden_layers=45, num_attention_heads=25,
                             norm_type="rms_norm", use_qk_norm=True, attention_bias=False)

# Token ids of the tiny preset: the tiny tokenizer's specials (models.presets.TINY_SPECIAL_TOKENS, ids 0-7), then
# these three (train_tokenizer(..., extra_tokens=INTERNVL_TINY_EXTRA_TOKENS) gives them ids 8, 9, 10).
INTERNVL_TINY_EXTRA_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>")

_INTERNVL3 = {
    "internvl3_8b": InternVLConfig(text=_qwen25(3584, 28, 28, 4, 18944), vision=_VIT_300M, dynamic_rope_factor=2.0),
    "internvl3_78b": InternVLConfig(text=_qwen25(8192, 80, 64, 8, 29568), vision=_VIT_6B, dynamic_rope_factor=2.0),
    # 56x56 tiles of 4x4 patches: 4 tokens per tile.
    "internvl_tiny": InternVLConfig(
        text=text_config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096),
        vision=InternVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=56),
        image_seq_length=4, tie_word_embeddings=True, image_token_id=10, bos_token_id=0, eos_token_id=2,
        pad_token_id=0),
}

# Llama 3.1 / 3.3 (the bases of DeepSeek-R1-Distill-Llama-8B / -70B): 128k context by scaling 8k RoPE.
_LLAMA3 = dict(model_type="llama", rope_theta=500000.0, max_positions=131072, eps=1e-5,
               rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192), bos_token_id=128000, eos_token_id=128001)
# Qwen2.5-Math-7B and Qwen2.5-32B (the bases of DeepSeek-R1-Distill-Qwen-7B / -32B).
_QWEN2 = dict(model_type="qwen2", max_positions=131072, bos_token_id=151646, eos_token_id=151643)

PRESETS: dict[str, ModelConfig | TextLMConfig | InternVLConfig] = {
    "3b": _released(2048, 36, 16, 2, 11008, 151936, 3420, tied=True),
    "7b": _released(3584, 28, 28, 4, 18944, 152064, 3420, tied=False),
    "32b": _released(5120, 64, 40, 8, 27648, 152064, 3456, tied=False),
    "72b": _released(8192, 80, 64, 8, 29568, 152064, 3456, tied=False),
    "tiny": ModelConfig(
        text=TextConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                        num_attention_heads=4, num_key_value_heads=2, mrope_section=(4, 6, 6),
                        max_position_embeddings=4096),
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, window_size=56,
                            fullatt_block_indexes=(1,), out_hidden_size=128),
        tie_word_embeddings=True,
        bos_token_id=0, pad_token_id=0, eos_token_id=2, vision_start_token_id=3, vision_end_token_id=4,
        image_token_id=6, video_token_id=7),
    "r1_distill_llama_8b": text_only(4096, 32, 32, 8, 14336, 128256, **_LLAMA3),
    "r1_distill_llama_70b": text_only(8192, 80, 64, 8, 28672, 128256, **_LLAMA3),
    "r1_distill_qwen_7b": text_only(3584, 28, 28, 4, 18944, 152064, rope_theta=10000.0, eps=1e-6, **_QWEN2),
    "r1_distill_qwen_32b": text_only(5120, 64, 40, 8, 27648, 152064, rope_theta=1e6, eps=1e-5, **_QWEN2),
    # The tiny decoder as a Llama (no biases, Llama 3.1 RoPE scaling), for text-only runs on a CPU.
    "llama_tiny": text_only(128, 4, 4, 2, 256, 512, model_type="llama", rope_theta=500000.0, max_positions=4096,
                            eps=1e-5, tied=True, rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 1024),
                            bos_token_id=0, pad_token_id=0, eos_token_id=2),
    **_INTERNVL3,
}


def get_preset(name: str) -> ModelConfig | TextLMConfig | InternVLConfig:
  try:
    return PRESETS[name].validate()
  except KeyError:
    raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
