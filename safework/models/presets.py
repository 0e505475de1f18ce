"""Named Qwen2.5-VL shapes: the four released sizes and a tiny one for tests and CPU runs.

The released shapes come from the checkpoints' own `config.json` files (vision MLP 3420 for 3B/7B, 3456 for
32B/72B; the tech report's table is wrong there). A real checkpoint's `config.json` always wins over a preset.
"""

from __future__ import annotations

from safework.models.config import ModelConfig, TextConfig, VisionConfig


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

PRESETS: dict[str, ModelConfig] = {
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
}


def get_preset(name: str) -> ModelConfig:
  try:
    return PRESETS[name].validate()
  except KeyError:
    raise KeyError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}") from None
