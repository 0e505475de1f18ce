"""Tokenizers: the Qwen2-VL chat template, and small byte-level BPE tokenizers trained locally.

Real checkpoints bring their own tokenizer files; the tiny preset (tests, CPU runs) uses a tokenizer trained here
from the project's own corpus, with Qwen's special tokens first so their ids match `presets.TINY_SPECIAL_TOKENS`.
"""

from __future__ import annotations

import json
from typing import Iterable

import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from safework.models.presets import TINY_SPECIAL_TOKENS

# The Qwen2-VL chat format: a default system turn, images and videos as vision-start/pad/end triplets.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# InternVL's: one <IMG_CONTEXT> per image, which the processor expands to the image's tiles.
TILE_CHAT_TEMPLATE = CHAT_TEMPLATE.replace("<|vision_start|><|image_pad|><|vision_end|>", "<IMG_CONTEXT>")


def train_tokenizer(corpus: Iterable[str], vocab_size: int, extra_tokens: tuple[str, ...] = (),
                    chat_template: str = CHAT_TEMPLATE) -> transformers.PreTrainedTokenizerBase:
  """A byte-level BPE tokenizer (Qwen2 style) whose first ids are Qwen's special tokens, then `extra_tokens`."""
  specials = list(TINY_SPECIAL_TOKENS) + list(extra_tokens)
  bpe = Tokenizer(models.BPE())
  bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  bpe.decoder = decoders.ByteLevel()
  bpe.train_from_iterator(corpus, trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  model = json.loads(bpe.to_str())["model"]
  tokenizer = transformers.Qwen2TokenizerFast(
      vocab=model["vocab"], merges=[tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]],
      unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>")
  tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})
  tokenizer.chat_template = chat_template
  ids = tokenizer.convert_tokens_to_ids(specials)
  if ids != list(range(len(specials))):
    raise RuntimeError(f"special tokens got ids {ids}; expected 0..{len(specials) - 1}")
  return tokenizer
