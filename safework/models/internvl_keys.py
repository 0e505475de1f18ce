"""The correspondence between `InternVL`'s parameter tree and Hugging Face checkpoint tensors.

Keys are in the on-disk layout that transformers 5 `save_pretrained` writes for `InternVLForConditionalGeneration`
(and the released "-hf" checkpoints use): `vision_tower.*`, `multi_modal_projector.*`, `language_model.model.*`,
`language_model.lm_head.weight`. `canonical_key` also accepts the in-memory layout (`model.vision_tower.*`,
`model.language_model.*`, `lm_head.weight`). Conversions are `models.hf_keys.HfTensor`s: the language model's
entries are the shared decoder's (`hf_keys.language_model_tensors`), the vision tower's are built here.
"""

from __future__ import annotations

import dataclasses
import re

from safework.models.hf_keys import HfTensor, ParamPath, _linear, _plain, language_model_tensors
from safework.models.internvl_config import InternVLConfig


def _vision_tensor_map(cfg: InternVLConfig) -> dict[ParamPath, HfTensor]:
  v = cfg.vision
  c, e, h, f, p = v.hidden_size, v.num_attention_heads, v.head_dim, v.intermediate_size, v.patch_size
  out: dict[ParamPath, HfTensor] = {}
  root, emb = ("visual", "tower"), "vision_tower.embeddings"
  out[root + ("patch_embed", "kernel")] = HfTensor(f"{emb}.patch_embeddings.projection.weight",
                                                   (c, v.num_channels, p, p), num_in=3)
  out[root + ("patch_embed", "bias")] = _plain(f"{emb}.patch_embeddings.projection.bias", (c,))
  out[root + ("cls_token",)] = HfTensor(f"{emb}.cls_token", (1, 1, c))
  out[root + ("position_embeddings",)] = HfTensor(f"{emb}.position_embeddings", (1, v.num_patches + 1, c))

  layer: dict[ParamPath, HfTensor] = {}   # one layer; its parameters stack all layers
  path, key = root + ("layers",), "vision_tower.encoder.layer.{layer}"
  for ours, theirs in (("norm_before", "layernorm_before"), ("norm_after", "layernorm_after")):
    layer[path + (ours, "scale")] = _plain(f"{key}.{theirs}.weight", (c,))
    if v.norm_type == "layer_norm":
      layer[path + (ours, "bias")] = _plain(f"{key}.{theirs}.bias", (c,))
  for name in ("q_proj", "k_proj", "v_proj"):
    layer[path + (name, "kernel")] = _linear(f"{key}.attention.{name}.weight", (c, e, h), 1)
    if v.attention_bias:
      layer[path + (name, "bias")] = _plain(f"{key}.attention.{name}.bias", (e, h))
  if v.use_qk_norm:
    for name in ("q_norm", "k_norm"):
      layer[path + (name, "scale")] = _plain(f"{key}.attention.{name}.weight", (e, h))
  layer[path + ("o_proj", "kernel")] = _linear(f"{key}.attention.projection_layer.weight", (e, h, c), 2)
  layer[path + ("o_proj", "bias")] = _plain(f"{key}.attention.projection_layer.bias", (c,))
  for name, shape in (("fc1", (c, f)), ("fc2", (f, c))):
    layer[path + (name, "kernel")] = _linear(f"{key}.mlp.{name}.weight", shape, 1)
    layer[path + (name, "bias")] = _plain(f"{key}.mlp.{name}.bias", shape[-1:])
  for name in ("lambda_1", "lambda_2"):
    layer[path + (name,)] = _plain(f"{key}.{name}", (c,))
  out.update({param: dataclasses.replace(entry, layers=v.num_hidden_layers) for param, entry in layer.items()})
  if not v.use_mean_pooling:
    out[root + ("final_norm", "scale")] = _plain("vision_tower.layernorm.weight", (c,))
    out[root + ("final_norm", "bias")] = _plain("vision_tower.layernorm.bias", (c,))

  wide, d = c * cfg.shuffle_factor**2, cfg.text.hidden_size
  proj, key = ("visual", "projector"), "multi_modal_projector"
  out[proj + ("layer_norm", "scale")] = _plain(f"{key}.layer_norm.weight", (wide,))
  out[proj + ("layer_norm", "bias")] = _plain(f"{key}.layer_norm.bias", (wide,))
  for name, shape in (("linear_1", (wide, d)), ("linear_2", (d, d))):
    out[proj + (name, "kernel")] = _linear(f"{key}.{name}.weight", shape, 1)
    out[proj + (name, "bias")] = _plain(f"{key}.{name}.bias", (d,))
  return out


def hf_tensor_map(cfg: InternVLConfig) -> dict[ParamPath, HfTensor]:
  """Every parameter path of `InternVL(cfg)` with its checkpoint tensor (on-disk layout)."""
  return _vision_tensor_map(cfg) | language_model_tensors(cfg.text, cfg.tie_word_embeddings, "language_model.model",
                                                          "language_model.lm_head.weight")


_IN_MEMORY_LAYOUT = (
    (re.compile(r"^model\.language_model\."), "language_model.model."),
    (re.compile(r"^model\.vision_tower\."), "vision_tower."),
    (re.compile(r"^model\.multi_modal_projector\."), "multi_modal_projector."),
    (re.compile(r"^lm_head\."), "language_model.lm_head."),
)


def canonical_key(key: str) -> str:
  """The on-disk name of a checkpoint key written in either layout."""
  for pattern, replacement in _IN_MEMORY_LAYOUT:
    if pattern.match(key):
      return pattern.sub(replacement, key)
  return key
