"""Static architecture settings of InternVL3 (InternViT + pixel-shuffle MLP projector + Qwen2.5), and their
Hugging Face `config.json` forms (transformers' `InternVLConfig`, model_type "internvl").

The language model is the Qwen2 decoder of `models.text` unchanged: its `TextConfig` carries
`mrope_section=(head_dim // 2, 0, 0)`, with which M-RoPE over three identical position rows is exactly 1D RoPE.
The dataclasses are frozen (hashable), so flax modules can take them as fields and jit can treat them as static.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from safework.models.config import ConfigError, TextConfig

# Activations the vision tower and the projector may name (transformers' ACT2FN names); models.internvl
# implements each.
ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu", "silu")
NORM_TYPES = ("layer_norm", "rms_norm")
# Rope types of the language model: transformers' "dynamic" NTK scaling only changes the frequencies once a
# sequence runs past max_position_embeddings, so below that it is plain RoPE (the InternVL3 checkpoints ship it).
ROPE_TYPES = ("default", "dynamic")


@dataclasses.dataclass(frozen=True)
class InternVisionConfig:
  """InternViT: a ViT with a class token, absolute position embeddings, layer scale and optional QK-norm."""
  hidden_size: int = 1024
  intermediate_size: int = 4096
  num_hidden_layers: int = 24
  num_attention_heads: int = 16
  num_channels: int = 3
  image_size: int = 448
  patch_size: int = 14
  layer_norm_eps: float = 1e-6
  norm_type: str = "layer_norm"        # the two pre-norms of each layer: "layer_norm" or "rms_norm"
  use_qk_norm: bool = False            # RMSNorm over the whole query / key projection (InternViT-6B)
  attention_bias: bool = True          # q/k/v biases (the output projection always has one)
  layer_scale_init_value: float = 0.1  # lambda_1 / lambda_2's initial value (checkpoints carry trained values)
  use_mean_pooling: bool = True        # True: no final LayerNorm (transformers' naming)
  hidden_act: str = "gelu"

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @property
  def grid_size(self) -> int:
    """Patches along each side of a tile."""
    return self.image_size // self.patch_size

  @property
  def num_patches(self) -> int:
    return self.grid_size**2

  def validate(self) -> None:
    if self.hidden_size % self.num_attention_heads:
      raise ConfigError(f"vision hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                        f"{self.num_attention_heads}")
    if self.image_size % self.patch_size:
      raise ConfigError(f"vision image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
    if self.norm_type not in NORM_TYPES:
      raise ConfigError(f"vision norm_type {self.norm_type!r} is not supported; choose one of {NORM_TYPES}")
    if self.hidden_act not in ACTIVATIONS:
      raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported; choose one of {ACTIVATIONS}")


@dataclasses.dataclass(frozen=True)
class InternVLConfig:
  """InternVL: each 448x448 tile's InternViT features, pixel-shuffled 2x2 -> 1 and projected, replace
  `image_token_id` placeholders in a Qwen2 decoder's input embeddings."""
  text: TextConfig = TextConfig(vocab_size=151674, max_position_embeddings=32768, mrope_section=(64, 0, 0))
  vision: InternVisionConfig = InternVisionConfig()
  downsample_ratio: float = 0.5
  projector_hidden_act: str = "gelu"
  image_token_id: int = 151667         # <IMG_CONTEXT>
  image_seq_length: int = 256          # placeholder tokens per tile; must equal what a tile encodes to
  vision_feature_layer: int = -1
  tie_word_embeddings: bool = False
  dynamic_rope_factor: float | None = None   # the language model's "dynamic" rope scaling factor, if any
  bos_token_id: int | None = 151643
  eos_token_id: int | tuple[int, ...] | None = 151645
  pad_token_id: int | None = 151643

  @property
  def shuffle_factor(self) -> int:
    """Pixel shuffle's side factor s = 1 / downsample_ratio: s x s patches become one token of s^2 * C."""
    return round(1 / self.downsample_ratio)

  @property
  def tokens_per_tile(self) -> int:
    return (self.vision.grid_size // self.shuffle_factor)**2

  @property
  def placeholder_token_ids(self) -> tuple[int, ...]:
    """The tokens vision features replace (video frames are tiles too, behind the same placeholder)."""
    return (self.image_token_id,)

  def validate(self) -> "InternVLConfig":
    self.text.validate()
    self.vision.validate()
    if self.text.mrope_section != (self.text.head_dim // 2, 0, 0):
      raise ConfigError(f"text mrope_section {self.text.mrope_section} must be (head_dim // 2, 0, 0) = "
                        f"({self.text.head_dim // 2}, 0, 0): InternVL's language model uses 1D RoPE")
    s = 1 / self.downsample_ratio
    if not 0 < self.downsample_ratio <= 1 or abs(s - round(s)) > 1e-9:
      raise ConfigError(f"downsample_ratio {self.downsample_ratio} must be 1 / an integer (0.5 in InternVL3)")
    if self.vision.grid_size % self.shuffle_factor:
      raise ConfigError(f"a tile of {self.vision.grid_size}x{self.vision.grid_size} patches cannot be pixel-shuffled "
                        f"by {self.shuffle_factor}; make image_size / patch_size a multiple of 1 / downsample_ratio")
    if self.image_seq_length != self.tokens_per_tile:
      raise ConfigError(f"image_seq_length {self.image_seq_length} differs from the {self.tokens_per_tile} tokens a "
                        f"tile encodes to ((image_size / patch_size * downsample_ratio)^2); set it to "
                        f"{self.tokens_per_tile}")
    if self.projector_hidden_act not in ACTIVATIONS:
      raise ConfigError(f"projector_hidden_act {self.projector_hidden_act!r} is not supported; choose one of "
                        f"{ACTIVATIONS}")
    if self.vision_feature_layer != -1:
      raise ConfigError(f"vision_feature_layer={self.vision_feature_layer} is not supported: only -1 (the last "
                        "layer, as every InternVL3 checkpoint uses)")
    if self.dynamic_rope_factor is not None and self.dynamic_rope_factor < 1:
      raise ConfigError(f"dynamic_rope_factor {self.dynamic_rope_factor} must be >= 1")
    if not 0 <= self.image_token_id < self.text.vocab_size:
      raise ConfigError(f"image_token_id={self.image_token_id} is outside the vocabulary of {self.text.vocab_size}")
    return self

  def replace(self, **changes) -> "InternVLConfig":
    return dataclasses.replace(self, **changes)


def text_config(**fields) -> TextConfig:
  """A `TextConfig` for InternVL's language model: `mrope_section` set to plain 1D RoPE."""
  probe = TextConfig(**fields)
  return dataclasses.replace(probe, mrope_section=(probe.head_dim // 2, 0, 0))


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face config.json in and out.

_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads")
_TEXT_DEFAULTS = {"rms_norm_eps": 1e-6, "max_position_embeddings": 32768}   # Qwen2Config's defaults
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
_VISION_DEFAULTS = {   # InternVLVisionConfig's defaults
    "num_channels": 3, "layer_norm_eps": 1e-6, "norm_type": "layer_norm", "use_qk_norm": False,
    "attention_bias": False, "layer_scale_init_value": 0.1, "use_mean_pooling": True, "hidden_act": "gelu"}
_DEFAULT_ROPE_THETA = 10000.0   # transformers' default when a Qwen2 config names none


def _require(d: Mapping[str, Any], key: str, where: str):
  if key not in d:
    raise ConfigError(f"config.json is missing '{key}' in {where}; cannot build an InternVL model from it")
  return d[key]


def _square(value, key: str) -> int:
  """image_size / patch_size: an int or a [height, width] pair, which must be equal."""
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise ConfigError(f"vision_config.{key}={list(value)} is not square; InternVL tiles are square")
    value = value[0]
  return int(value)


def _rope(text: Mapping[str, Any]) -> tuple[float, float | None]:
  """(rope_theta, dynamic factor or None) from transformers-5 `rope_parameters` or legacy `rope_scaling`."""
  rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
  theta = float(rope.get("rope_theta", text.get("rope_theta", _DEFAULT_ROPE_THETA)))
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind not in ROPE_TYPES:
    raise ConfigError(f"text_config rope type {kind!r} is not supported; choose one of {ROPE_TYPES}")
  if kind == "default":
    return theta, None
  if "factor" not in rope:
    raise ConfigError("text_config's dynamic rope scaling gives no 'factor'")
  return theta, float(rope["factor"])


def _text_from_hf(text: Mapping[str, Any]) -> TextConfig:
  model_type = text.get("model_type", "qwen2")   # transformers' default text model for InternVL
  if model_type != "qwen2":
    raise ConfigError(f"text_config.model_type={model_type!r} is not supported: only Qwen2 language models "
                      "(InternVL3 except its InternLM3-based 9B)")
  if text.get("use_sliding_window") or "sliding_attention" in (text.get("layer_types") or ()):
    raise ConfigError("text_config uses sliding-window attention, which is not supported; InternVL3 checkpoints "
                      "use full attention (set use_sliding_window=false)")
  if text.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"text_config.hidden_act={text['hidden_act']!r} is not supported; Qwen2 uses 'silu'")
  fields = {k: _require(text, k, "text_config") for k in _TEXT_KEYS}
  if fields["num_key_value_heads"] is None:
    fields["num_key_value_heads"] = fields["num_attention_heads"]
  fields.update({k: text.get(k, default) for k, default in _TEXT_DEFAULTS.items()})
  theta, _ = _rope(text)
  cfg = text_config(**fields, rope_theta=theta)
  if text.get("head_dim") not in (None, cfg.head_dim):
    raise ConfigError(f"text_config.head_dim={text['head_dim']} differs from hidden_size / num_attention_heads = "
                      f"{cfg.head_dim}; only the derived head_dim is supported")
  return cfg


def _vision_from_hf(vision: Mapping[str, Any]) -> InternVisionConfig:
  if vision.get("use_mask_token"):
    raise ConfigError("vision_config.use_mask_token=true is not supported (no InternVL3 checkpoint has one)")
  if not vision.get("use_absolute_position_embeddings", True):
    raise ConfigError("vision_config.use_absolute_position_embeddings=false is not supported (InternViT always "
                      "has them)")
  fields = {k: _require(vision, k, "vision_config") for k in _VISION_KEYS}
  fields.update({k: vision.get(k, default) for k, default in _VISION_DEFAULTS.items()})
  return InternVisionConfig(**fields, image_size=_square(vision.get("image_size", 448), "image_size"),
                            patch_size=_square(vision.get("patch_size", 14), "patch_size"))


def from_hf_dict(d: Mapping[str, Any]) -> InternVLConfig:
  """Parses the `config.json` of transformers' `InternVLForConditionalGeneration` (model_type "internvl")."""
  model_type = d.get("model_type")
  if model_type != "internvl":
    hint = (" (an original OpenGVLab checkpoint: use its '-hf' conversion)" if model_type == "internvl_chat" else "")
    raise ConfigError(f"config.json has model_type={model_type!r}; only 'internvl' is supported{hint}")
  text = dict(_require(d, "text_config", "the top level"))
  vision = dict(_require(d, "vision_config", "the top level"))
  strategy = d.get("vision_feature_select_strategy", "default")
  if strategy != "default":
    raise ConfigError(f"vision_feature_select_strategy={strategy!r} is not supported: only 'default' (drop the "
                      "class token)")
  layer = d.get("vision_feature_layer", -1)
  if layer != -1:
    raise ConfigError(f"vision_feature_layer={layer!r} is not supported: only -1 (the last layer)")
  # transformers 5 ties by the top-level flag (default true); a config without one falls back to its text
  # config's flag, which is what the original checkpoints meant (their lm_head is stored).
  tie = d.get("tie_word_embeddings", text.get("tie_word_embeddings", True))
  eos = text.get("eos_token_id", d.get("eos_token_id"))
  _, factor = _rope(text)
  cfg = InternVLConfig(
      text=_text_from_hf(text), vision=_vision_from_hf(vision),
      downsample_ratio=float(d.get("downsample_ratio", 0.5)),
      projector_hidden_act=d.get("projector_hidden_act", "gelu"),
      image_token_id=int(d.get("image_token_id", 151667)),
      image_seq_length=int(d.get("image_seq_length", 256)),
      vision_feature_layer=layer, tie_word_embeddings=bool(tie), dynamic_rope_factor=factor,
      bos_token_id=text.get("bos_token_id", d.get("bos_token_id")),
      eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
      pad_token_id=text.get("pad_token_id", d.get("pad_token_id")))
  return cfg.validate()


def to_hf_dict(cfg: InternVLConfig) -> dict[str, Any]:
  """The transformers-5 nested `config.json` for `cfg` (loads into `transformers.InternVLConfig`)."""
  t, v = cfg.text, cfg.vision
  eos = list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id
  rope = {"rope_type": "default", "rope_theta": t.rope_theta}
  if cfg.dynamic_rope_factor is not None:
    rope.update(rope_type="dynamic", factor=cfg.dynamic_rope_factor)
  text_config = {k: getattr(t, k) for k in (*_TEXT_KEYS, *_TEXT_DEFAULTS)}
  text_config.update(
      model_type="qwen2", hidden_act="silu", use_sliding_window=False, sliding_window=None, attention_dropout=0.0,
      rope_parameters=rope, bos_token_id=cfg.bos_token_id, eos_token_id=eos, pad_token_id=cfg.pad_token_id,
      tie_word_embeddings=cfg.tie_word_embeddings)
  vision_config = {k: getattr(v, k) for k in (*_VISION_KEYS, *_VISION_DEFAULTS)}
  vision_config.update(model_type="internvl_vision", image_size=[v.image_size] * 2, patch_size=[v.patch_size] * 2,
                       use_mask_token=False, use_absolute_position_embeddings=True)
  return {
      "architectures": ["InternVLForConditionalGeneration"],
      "model_type": "internvl",
      "text_config": text_config,
      "vision_config": vision_config,
      "downsample_ratio": cfg.downsample_ratio,
      "projector_hidden_act": cfg.projector_hidden_act,
      "image_token_id": cfg.image_token_id,
      "image_seq_length": cfg.image_seq_length,
      "vision_feature_layer": cfg.vision_feature_layer,
      "vision_feature_select_strategy": "default",
      "tie_word_embeddings": cfg.tie_word_embeddings,
  }
