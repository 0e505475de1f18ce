"""Static architecture settings of Qwen2.5-VL, and their Hugging Face `config.json` forms.

The dataclasses are frozen (hashable), so flax modules can take them as fields and jit can treat them as static.
`from_hf_dict` accepts both the Hub's flat format and the transformers-5 nested format; `to_hf_dict` writes the
nested format that transformers 5 saves and reloads.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping


class ConfigError(ValueError):
  """A configuration that is not a Qwen2.5-VL configuration, or is inconsistent."""


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  depth: int = 32
  hidden_size: int = 1280
  intermediate_size: int = 3420
  num_heads: int = 16
  in_channels: int = 3
  patch_size: int = 14
  temporal_patch_size: int = 2
  spatial_merge_size: int = 2
  window_size: int = 112
  fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
  out_hidden_size: int = 3584
  tokens_per_second: float = 2
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def patch_dim(self) -> int:
    """Length of one flattened pixel patch: C * T * P * P."""
    return self.in_channels * self.temporal_patch_size * self.patch_size**2

  @property
  def merge_unit(self) -> int:
    return self.spatial_merge_size**2

  def validate(self) -> None:
    if self.hidden_size % self.num_heads:
      raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.head_dim % 4:
      raise ConfigError(f"vision head_dim {self.head_dim} must be divisible by 4 for the 2D rotary embedding")
    bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.depth]
    if bad:
      raise ConfigError(f"fullatt_block_indexes {bad} are outside the vision depth {self.depth}")
    if self.window_size % (self.patch_size * self.spatial_merge_size):
      raise ConfigError(
          f"window_size {self.window_size} must be a multiple of patch_size * spatial_merge_size "
          f"= {self.patch_size * self.spatial_merge_size}")


@dataclasses.dataclass(frozen=True)
class Llama3RopeScaling:
  """Llama 3.1's long-context RoPE: low frequencies divided by `factor`, a smooth ramp between the two bands."""
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def validate(self) -> None:
    if self.high_freq_factor <= self.low_freq_factor:
      raise ConfigError(f"llama3 rope scaling needs high_freq_factor ({self.high_freq_factor}) > low_freq_factor "
                        f"({self.low_freq_factor})")


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """A Qwen2 / Llama decoder. Text-only families use `mrope_section=(head_dim // 2, 0, 0)`: with the three
  position rows equal, M-RoPE is 1D RoPE."""
  vocab_size: int = 152064
  hidden_size: int = 3584
  intermediate_size: int = 18944
  num_hidden_layers: int = 28
  num_attention_heads: int = 28
  num_key_value_heads: int = 4
  rms_norm_eps: float = 1e-6
  rope_theta: float = 1e6
  mrope_section: tuple[int, int, int] = (16, 24, 24)
  max_position_embeddings: int = 128000
  qkv_bias: bool = True                  # Qwen2: q/k/v biased; Llama: `attention_bias` for all four projections
  output_bias: bool = False
  explicit_head_dim: int | None = None   # a config's `head_dim` when it is not hidden_size / num_attention_heads
  rope_scaling: Llama3RopeScaling | None = None

  @property
  def head_dim(self) -> int:
    return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

  def validate(self) -> None:
    if self.explicit_head_dim is None and self.hidden_size % self.num_attention_heads:
      raise ConfigError(
          f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
    if self.num_attention_heads % self.num_key_value_heads:
      raise ConfigError(f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                        f"num_key_value_heads {self.num_key_value_heads}")
    if len(self.mrope_section) != 3 or sum(self.mrope_section) * 2 != self.head_dim:
      raise ConfigError(f"mrope_section {list(self.mrope_section)} must have 3 entries summing to head_dim/2 "
                        f"= {self.head_dim // 2}")
    if self.rope_scaling is not None:
      self.rope_scaling.validate()


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Qwen2.5-VL: a vision tower whose merged patches replace placeholder tokens in a Qwen2 decoder."""
  text: TextConfig = TextConfig()
  vision: VisionConfig = VisionConfig()
  tie_word_embeddings: bool = False
  image_token_id: int = 151655
  video_token_id: int = 151656
  vision_start_token_id: int = 151652
  vision_end_token_id: int = 151653
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = 151643

  def validate(self) -> "ModelConfig":
    self.text.validate()
    self.vision.validate()
    if self.vision.out_hidden_size != self.text.hidden_size:
      raise ConfigError(f"vision out_hidden_size {self.vision.out_hidden_size} must equal the language model's "
                        f"hidden_size {self.text.hidden_size}")
    for name in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id"):
      if not 0 <= getattr(self, name) < self.text.vocab_size:
        raise ConfigError(f"{name}={getattr(self, name)} is outside the vocabulary of {self.text.vocab_size}")
    return self

  @property
  def placeholder_token_ids(self) -> tuple[int, ...]:
    """The tokens vision features replace, in the order their features are concatenated (images, then videos)."""
    return self.image_token_id, self.video_token_id

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face config.json in and out.

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "rms_norm_eps", "max_position_embeddings")
_VISION_KEYS = ("depth", "hidden_size", "intermediate_size", "num_heads", "in_channels", "patch_size",
                "temporal_patch_size", "spatial_merge_size", "window_size", "fullatt_block_indexes",
                "out_hidden_size", "tokens_per_second")
# Legacy names of the Hub's flat vision config.
_VISION_ALIASES = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}


def _require(d: Mapping[str, Any], key: str, where: str):
  if key not in d:
    raise ConfigError(f"config.json is missing '{key}' in {where}; cannot build a Qwen2.5-VL model from it")
  return d[key]


def _rope_settings(text: Mapping[str, Any]) -> tuple[float, tuple[int, ...]]:
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  theta = rope.get("rope_theta", text.get("rope_theta"))
  if theta is None:
    raise ConfigError("config.json gives no rope_theta (neither top-level nor in rope_parameters)")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ("default", "mrope"):
    raise ConfigError(f"rope type '{kind}' is not supported; Qwen2.5-VL uses plain M-RoPE ('default'/'mrope')")
  if "mrope_section" not in rope:
    raise ConfigError("config.json has no mrope_section (in rope_parameters or rope_scaling)")
  return float(theta), tuple(int(s) for s in rope["mrope_section"])


def from_hf_dict(d: Mapping[str, Any]) -> ModelConfig:
  """Parses a Qwen2.5-VL `config.json` (flat Hub format or transformers-5 nested format)."""
  model_type = d.get("model_type")
  if model_type != "qwen2_5_vl":
    raise ConfigError(f"config.json has model_type={model_type!r}; only 'qwen2_5_vl' (Qwen2.5-VL) is supported")
  text = dict(d.get("text_config") or {})
  for key, value in d.items():   # flat format: LM keys at the top level
    if key not in ("text_config", "vision_config"):
      text.setdefault(key, value)
  if text.get("use_sliding_window"):
    raise ConfigError("use_sliding_window=true is not supported: Qwen2.5-VL checkpoints use full attention")
  theta, section = _rope_settings(text)
  text_cfg = TextConfig(**{k: _require(text, k, "the text config") for k in _TEXT_KEYS},
                        rope_theta=theta, mrope_section=section)
  if text_cfg.num_key_value_heads is None:
    text_cfg = dataclasses.replace(text_cfg, num_key_value_heads=text_cfg.num_attention_heads)

  vision = dict(_require(d, "vision_config", "the top level"))
  for legacy, name in _VISION_ALIASES.items():
    if legacy in vision:
      vision.setdefault(name, vision[legacy])
  vision_rope = vision.get("rope_parameters") or {}
  vision_cfg = VisionConfig(
      **{k: _require(vision, k, "vision_config") for k in _VISION_KEYS if k != "fullatt_block_indexes"},
      fullatt_block_indexes=tuple(_require(vision, "fullatt_block_indexes", "vision_config")),
      rope_theta=float(vision_rope.get("rope_theta", 10000.0)))

  tie = bool(d.get("tie_word_embeddings", False) or text.get("tie_word_embeddings", False))
  eos = text.get("eos_token_id")
  cfg = ModelConfig(
      text=text_cfg, vision=vision_cfg, tie_word_embeddings=tie,
      image_token_id=int(_require(d, "image_token_id", "the top level")),
      video_token_id=int(_require(d, "video_token_id", "the top level")),
      vision_start_token_id=int(_require(d, "vision_start_token_id", "the top level")),
      vision_end_token_id=int(_require(d, "vision_end_token_id", "the top level")),
      bos_token_id=text.get("bos_token_id"),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=text.get("pad_token_id"))
  return cfg.validate()


def to_hf_dict(cfg: ModelConfig) -> dict[str, Any]:
  """The transformers-5 nested `config.json` for `cfg` (loads into `Qwen2_5_VLConfig`)."""
  t, v = cfg.text, cfg.vision
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  text_config = {k: getattr(t, k) for k in _TEXT_KEYS}
  text_config.update(
      model_type="qwen2_5_vl_text", hidden_act="silu", use_sliding_window=False, attention_dropout=0.0,
      rope_parameters={"rope_type": "default", "rope_theta": t.rope_theta, "mrope_section": list(t.mrope_section)},
      bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id,
      tie_word_embeddings=cfg.tie_word_embeddings)
  vision_config = {k: getattr(v, k) for k in _VISION_KEYS}
  vision_config.update(model_type="qwen2_5_vl_vision", hidden_act="silu",
                       fullatt_block_indexes=list(v.fullatt_block_indexes),
                       rope_parameters={"rope_type": "axial", "rope_theta": v.rope_theta})
  return {
      "architectures": ["Qwen2_5_VLForConditionalGeneration"],
      "model_type": "qwen2_5_vl",
      "text_config": text_config,
      "vision_config": vision_config,
      "image_token_id": cfg.image_token_id,
      "video_token_id": cfg.video_token_id,
      "vision_start_token_id": cfg.vision_start_token_id,
      "vision_end_token_id": cfg.vision_end_token_id,
      "tie_word_embeddings": cfg.tie_word_embeddings,
  }
