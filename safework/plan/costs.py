"""FLOPs and HBM bytes of a stage's programs, counted from the model's shapes.

XLA's `cost_analysis()` counts a loop body once: the scanned layers, the decode loop and the micro-batches would
be undercounted by their trip counts. The planner counts the work itself, the usual way: a matmul costs 2 FLOPs
per weight per token, attention 4 * heads * head_dim per (query, key) pair (QK^T and PV), a backward pass twice
the forward and a rematerialised layer one forward more. Bytes are the weights read once per pass (once per step
when decoding) plus, when decoding, the KV cache read every step. Activations are left out: these are the
roofline's lower bounds, not predictions.
"""

from __future__ import annotations

import dataclasses
import functools

from safework.models.config import ModelConfig
from safework.models.internvl_config import InternVLConfig


@dataclasses.dataclass(frozen=True)
class Work:
  flops: float
  bytes: float

  def __add__(self, other: "Work") -> "Work":
    return Work(self.flops + other.flops, self.bytes + other.bytes)

  def __mul__(self, factor: float) -> "Work":
    return Work(self.flops * factor, self.bytes * factor)


def decoder_weights(cfg: ModelConfig) -> int:
  """Weights a token meets in the decoder layers (embedding lookup excluded, output head separate)."""
  t = cfg.text
  attention = t.hidden_size * t.head_dim * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
  return t.num_hidden_layers * (attention + 3 * t.hidden_size * t.intermediate_size)


def vision_weights(cfg: ModelConfig) -> int:
  v = cfg.vision
  blocks = v.depth * (4 * v.hidden_size**2 + 3 * v.hidden_size * v.intermediate_size)
  wide = v.hidden_size * v.merge_unit
  return v.patch_dim * v.hidden_size + blocks + (wide * wide + wide * cfg.text.hidden_size) // v.merge_unit


def head_weights(cfg: ModelConfig) -> int:
  return cfg.text.vocab_size * cfg.text.hidden_size


def decoder_pass(cfg: ModelConfig, tokens: float, pairs: float, logit_tokens: float, weight_bytes: float) -> Work:
  """A forward pass of `tokens` tokens with `pairs` attended (query, key) pairs and `logit_tokens` output logits."""
  t = cfg.text
  flops = (2 * decoder_weights(cfg) * tokens + 4 * t.num_hidden_layers * t.num_attention_heads * t.head_dim * pairs
           + 2 * head_weights(cfg) * logit_tokens)
  return Work(flops, weight_bytes * (decoder_weights(cfg) + head_weights(cfg)))


def causal_pairs(rows: float, length: float) -> float:
  return rows * length * (length + 1) / 2


@functools.singledispatch
def vision_pass(cfg, images: int, extent: int, weight_bytes: float) -> Work:
  """The vision tower on `images` images of `extent` each (Qwen2.5-VL: patches; InternVL: tiles)."""
  raise TypeError(f"no vision cost for a {type(cfg).__name__}")


@vision_pass.register
def _windowed(cfg: ModelConfig, images: int, patches_per_image: int, weight_bytes: float) -> Work:
  """Qwen2.5-VL's tower: windowed attention in most blocks, full attention in `fullatt_block_indexes`."""
  v = cfg.vision
  window = (v.window_size // v.patch_size) ** 2
  full = len(v.fullatt_block_indexes)
  pairs = images * patches_per_image * (full * patches_per_image + (v.depth - full) * min(window, patches_per_image))
  patches = images * patches_per_image
  return Work(2 * vision_weights(cfg) * patches + 4 * v.num_heads * v.head_dim * pairs,
              weight_bytes * vision_weights(cfg))


def internvl_vision_weights(cfg: InternVLConfig) -> int:
  v = cfg.vision
  layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
  wide = v.hidden_size * cfg.shuffle_factor**2
  return v.num_channels * v.patch_size**2 * v.hidden_size + v.num_hidden_layers * layer + (
      wide * cfg.text.hidden_size + cfg.text.hidden_size**2) // cfg.shuffle_factor**2


@vision_pass.register
def _tiled(cfg: InternVLConfig, images: int, tiles_per_image: int, weight_bytes: float) -> Work:
  """InternViT: full attention within each tile of g^2 patches and a class token; the projector on the shuffled
  tokens (counted per patch, so the weights term stays one product)."""
  v = cfg.vision
  tiles, tokens = images * tiles_per_image, v.num_patches + 1
  pairs = tiles * tokens * tokens * v.num_hidden_layers
  return Work(2 * internvl_vision_weights(cfg) * tiles * tokens + 4 * v.num_attention_heads * v.head_dim * pairs,
              weight_bytes * internvl_vision_weights(cfg))


def decode_loop(cfg: ModelConfig, rows: int, prompt: int, steps: int, weight_bytes: float, cache_bytes: float) -> Work:
  """`steps` decode steps of `rows` rows whose context grows from `prompt` to `prompt + steps` (mean context)."""
  t = cfg.text
  context = prompt + steps / 2
  step = decoder_pass(cfg, rows, rows * context, rows, weight_bytes)
  cache = rows * context * t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * cache_bytes
  return Work(step.flops, step.bytes + cache) * steps


def train_pass(forward: Work, remat: str) -> Work:
  """Forward + backward (twice the forward's FLOPs), + one more forward when layers are rematerialised."""
  recompute = 1.0 if remat == "full" else 0.0
  return Work(forward.flops * (3 + recompute), forward.bytes * 3)
