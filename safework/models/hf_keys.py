"""The correspondence between our parameter tree and Hugging Face checkpoint tensors.

Each of our parameters maps to one checkpoint tensor, or, for the scanned decoder layers and vision blocks (stacked
along a leading layers axis), to one tensor per layer (`HfTensor.layers`; the key holds a `{layer}` field). A
`Linear` weight is stored (out, in) by PyTorch; our kernels are (in..., out...) with heads split out, so conversion
is a transpose plus reshapes, described by how many leading kernel dimensions are inputs (`num_in`). Checkpoints on disk use the legacy key layout (`model.*`,
`visual.*`, `lm_head.*`); the post-4.52 in-memory layout (`model.language_model.*`, `model.visual.*`) is accepted
on load.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from safework.models.config import ModelConfig, TextConfig

ParamPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HfTensor:
  key: str
  shape: tuple[int, ...]        # shape in the checkpoint
  num_in: int | None = None     # None: same values, only reshaped; else a transposed Linear/Conv weight
                                # whose first `num_in` kernel dimensions are inputs
  layers: int = 0               # > 0: our parameter stacks this many layers' tensors, key.format(layer=i)

  def per_layer(self) -> list[tuple[int | None, "HfTensor"]]:
    """(layer, tensor) for each checkpoint tensor of the parameter: [(None, self)] when it is not stacked."""
    if not self.layers:
      return [(None, self)]
    return [(i, dataclasses.replace(self, key=self.key.format(layer=i), layers=0)) for i in range(self.layers)]

  def read(self, reader, shape: tuple[int, ...], box: tuple[slice, ...] | None = None) -> np.ndarray:
    """Reads the part `box` of our parameter of `shape` from a safetensors slice `reader`, touching only the
    checkpoint rows (and, for 2D tensors, columns) that the box needs: each host of a pod reads its shards only.
    """
    ranges = [np.arange(*s.indices(n)) for s, n in zip(box or (slice(None),) * len(shape), shape)]
    box_shape = tuple(len(r) for r in ranges)
    if self.num_in is None:
      if self.shape == tuple(shape):
        return np.asarray(reader[tuple(slice(r[0], r[-1] + 1) for r in ranges)])
      flat = np.ravel_multi_index(np.ix_(*ranges), shape).reshape(-1)
      return np.asarray(reader[flat.min():flat.max() + 1])[flat - flat.min()].reshape(box_shape)
    n = self.num_in
    cols = np.ravel_multi_index(np.ix_(*ranges[:n]), shape[:n]).reshape(-1)
    rows = np.ravel_multi_index(np.ix_(*ranges[n:]), shape[n:]).reshape(-1)
    r0, c0 = rows.min(), cols.min()
    if len(self.shape) == 2:
      block = np.asarray(reader[r0:rows.max() + 1, c0:cols.max() + 1])
    else:   # a conv kernel: rows are output channels, the rest flattens into columns
      block = np.asarray(reader[r0:rows.max() + 1]).reshape(-1, math.prod(self.shape[1:]))[:, c0:cols.max() + 1]
    picked = block[rows - r0][:, cols - c0].reshape(box_shape[n:] + box_shape[:n])
    return picked.transpose(tuple(range(len(shape) - n, len(shape))) + tuple(range(len(shape) - n)))

  def to_hf(self, x: np.ndarray) -> np.ndarray:
    if self.num_in is None:
      return x.reshape(self.shape)
    return x.reshape(math.prod(x.shape[:self.num_in]), -1).T.reshape(self.shape)


def _linear(key: str, kernel_shape: tuple[int, ...], num_in: int) -> HfTensor:
  return HfTensor(key, (math.prod(kernel_shape[num_in:]), math.prod(kernel_shape[:num_in])), num_in)


def _plain(key: str, shape: tuple[int, ...]) -> HfTensor:
  return HfTensor(key, (math.prod(shape),) if len(shape) > 1 else tuple(shape))


def _mlp(into: dict, prefix: ParamPath, key: str, dim: int, hidden: int, bias: bool) -> None:
  for name, shape in (("gate", (dim, hidden)), ("up", (dim, hidden)), ("down", (hidden, dim))):
    into[prefix + (name, "kernel")] = _linear(f"{key}.{name}_proj.weight", shape, 1)
    if bias:
      into[prefix + (name, "bias")] = _plain(f"{key}.{name}_proj.bias", shape[-1:])


def hf_tensor_map(cfg: ModelConfig) -> dict[ParamPath, HfTensor]:
  """Every parameter path of `Qwen25VL(cfg)` with its checkpoint tensor (legacy layout)."""
  t, v = cfg.text, cfg.vision
  d = t.hidden_size
  c, vn, vh, vf = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size
  wide = c * v.merge_unit
  out: dict[ParamPath, HfTensor] = {}

  out[("visual", "patch_embed", "kernel")] = HfTensor(
      "visual.patch_embed.proj.weight", (c, v.in_channels, v.temporal_patch_size, v.patch_size, v.patch_size), 1)
  block: dict[ParamPath, HfTensor] = {}   # one vision block; its parameters stack all blocks
  p, key = ("visual", "blocks"), "visual.blocks.{layer}"
  block[p + ("norm1", "scale")] = _plain(f"{key}.norm1.weight", (c,))
  block[p + ("norm2", "scale")] = _plain(f"{key}.norm2.weight", (c,))
  block[p + ("qkv", "kernel")] = _linear(f"{key}.attn.qkv.weight", (c, 3, vn, vh), 1)
  block[p + ("qkv", "bias")] = _plain(f"{key}.attn.qkv.bias", (3, vn, vh))
  block[p + ("proj", "kernel")] = _linear(f"{key}.attn.proj.weight", (vn, vh, c), 2)
  block[p + ("proj", "bias")] = _plain(f"{key}.attn.proj.bias", (c,))
  _mlp(block, p + ("mlp",), f"{key}.mlp", c, vf, bias=True)
  out.update({path: dataclasses.replace(entry, layers=v.depth) for path, entry in block.items()})
  merger = ("visual", "merger")
  out[merger + ("ln_q", "scale")] = _plain("visual.merger.ln_q.weight", (c,))
  for name, index, shape in (("fc1", 0, (wide, wide)), ("fc2", 2, (wide, d))):
    out[merger + (name, "kernel")] = _linear(f"visual.merger.mlp.{index}.weight", shape, 1)
    out[merger + (name, "bias")] = _plain(f"visual.merger.mlp.{index}.bias", shape[-1:])

  out.update(language_model_tensors(t, cfg.tie_word_embeddings))
  return out


def language_model_tensors(t: TextConfig, tied: bool, key_prefix: str = "model", head_key: str = "lm_head.weight"
                           ) -> dict[ParamPath, HfTensor]:
  """The decoder's parameters (embeddings, stacked layers, final norm, output head) with their checkpoint tensors;
  `key_prefix` is where the checkpoint keeps the decoder, `head_key` its output head."""
  d, n, k, h, f = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size
  out: dict[ParamPath, HfTensor] = {("embed_tokens",): HfTensor(f"{key_prefix}.embed_tokens.weight", (t.vocab_size, d))}
  layer: dict[ParamPath, HfTensor] = {}   # one decoder layer; its parameters stack all layers
  p, key = ("decoder", "layers"), f"{key_prefix}.layers.{{layer}}"
  layer[p + ("input_norm", "scale")] = _plain(f"{key}.input_layernorm.weight", (d,))
  layer[p + ("post_attention_norm", "scale")] = _plain(f"{key}.post_attention_layernorm.weight", (d,))
  for name, heads in (("q_proj", n), ("k_proj", k), ("v_proj", k)):
    layer[p + (name, "kernel")] = _linear(f"{key}.self_attn.{name}.weight", (d, heads, h), 1)
    if t.qkv_bias:
      layer[p + (name, "bias")] = _plain(f"{key}.self_attn.{name}.bias", (heads, h))
  layer[p + ("o_proj", "kernel")] = _linear(f"{key}.self_attn.o_proj.weight", (n, h, d), 2)
  if t.output_bias:
    layer[p + ("o_proj", "bias")] = _plain(f"{key}.self_attn.o_proj.bias", (d,))
  _mlp(layer, p + ("mlp",), f"{key}.mlp", d, f, bias=False)
  out.update({path: dataclasses.replace(entry, layers=t.num_hidden_layers) for path, entry in layer.items()})
  out[("decoder", "norm", "scale")] = _plain(f"{key_prefix}.norm.weight", (d,))
  if not tied:
    out[("lm_head",)] = HfTensor(head_key, (t.vocab_size, d))
  return out


_IN_MEMORY_LAYOUT = ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual."))
# Non-persistent buffers that some exports carry; they hold nothing a model needs.
IGNORED_KEYS = re.compile(r"(^|\.)rotary_emb\.inv_freq$|\.inv_freq$")


def canonical_key(key: str) -> str:
  """The legacy (on-disk) name of a checkpoint key written in either layout."""
  for pattern, replacement in _IN_MEMORY_LAYOUT:
    key = pattern.sub(replacement, key)
  return key
