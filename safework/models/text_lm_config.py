"""Text-only decoders (Llama 3.x and Qwen2/Qwen2.5, e.g. DeepSeek-R1-Distill-Llama and -Qwen): settings and their
Hugging Face `config.json` forms.

Both are the decoder `models.text` already runs; they differ in biases (Qwen2: q/k/v; Llama: `attention_bias` on
all four projections), RoPE (Llama 3.1 scales its frequencies) and 1D positions (`mrope_section=(H/2, 0, 0)`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

from safework.models.config import ConfigError, Llama3RopeScaling, TextConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


@dataclasses.dataclass(frozen=True)
class TextLMConfig:
  """A text-only causal language model: no vision tower, no placeholder tokens."""
  text: TextConfig = TextConfig()
  model_type: str = "llama"   # a key of ARCHITECTURES
  tie_word_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None

  def validate(self) -> "TextLMConfig":
    if self.model_type not in ARCHITECTURES:
      raise ConfigError(f"model_type {self.model_type!r} is not a text-only family; choose one of "
                        f"{sorted(ARCHITECTURES)}")
    self.text.validate()
    if tuple(self.text.mrope_section[1:]) != (0, 0):
      raise ConfigError(f"a text-only model rotates by one position axis: mrope_section must be (head_dim/2, 0, 0), "
                        f"got {self.text.mrope_section}")
    return self

  @property
  def placeholder_token_ids(self) -> tuple[int, ...]:
    return ()   # no vision features to place

  def replace(self, **changes) -> "TextLMConfig":
    return dataclasses.replace(self, **changes)


def text_only(hidden: int, layers: int, heads: int, kv_heads: int, mlp: int, vocab: int, *, model_type: str,
              rope_theta: float, max_positions: int, eps: float, tied: bool = False,
              rope_scaling: Llama3RopeScaling | None = None, **ids) -> TextLMConfig:
  """A text-only config from the numbers a model card gives."""
  head_dim = hidden // heads
  return TextLMConfig(
      text=TextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, rms_norm_eps=eps,
                      rope_theta=rope_theta, mrope_section=(head_dim // 2, 0, 0),
                      max_position_embeddings=max_positions, qkv_bias=model_type == "qwen2", output_bias=False,
                      rope_scaling=rope_scaling),
      model_type=model_type, tie_word_embeddings=tied, **ids)


_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "rms_norm_eps", "max_position_embeddings")


def _rope(d: Mapping[str, Any]) -> tuple[float, Llama3RopeScaling | None]:
  """rope_theta and the Llama 3.1 scaling, from transformers 5's `rope_parameters` or the legacy `rope_scaling`."""
  rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
  theta = rope.get("rope_theta", d.get("rope_theta"))
  if theta is None:
    raise ConfigError("config.json gives no rope_theta (neither top-level nor in rope_parameters)")
  kind = rope.get("rope_type", rope.get("type", "default"))
  if kind == "default":
    return float(theta), None
  if kind != "llama3":
    raise ConfigError(f"rope type {kind!r} is not supported; text-only models use plain RoPE ('default') or "
                      "Llama 3.1's scaling ('llama3')")
  fields = {f.name for f in dataclasses.fields(Llama3RopeScaling)}
  missing = sorted(fields - set(rope))
  if missing:
    raise ConfigError(f"the llama3 rope scaling in config.json lacks {missing}")
  return float(theta), Llama3RopeScaling(**{k: rope[k] for k in fields})


def from_hf_dict(d: Mapping[str, Any]) -> TextLMConfig:
  """Parses the `config.json` of a `LlamaForCausalLM` or `Qwen2ForCausalLM`."""
  model_type = d.get("model_type")
  if model_type not in ARCHITECTURES:
    raise ConfigError(f"config.json has model_type={model_type!r}, not a text-only family ({sorted(ARCHITECTURES)})")
  missing = [k for k in _KEYS if k not in d]
  if missing:
    raise ConfigError(f"config.json lacks {missing}; cannot build a {ARCHITECTURES[model_type]} from it")
  if d.get("hidden_act", "silu") != "silu":
    raise ConfigError(f"hidden_act={d['hidden_act']!r} is not supported: these decoders use SwiGLU ('silu')")
  if d.get("mlp_bias"):
    raise ConfigError("mlp_bias=true is not supported (no Llama 3 or Qwen2 checkpoint biases its MLP)")
  if model_type == "qwen2" and d.get("use_sliding_window"):
    raise ConfigError("use_sliding_window=true is not supported: the released Qwen2.5 checkpoints attend fully")
  if d.get("partial_rotary_factor", 1.0) != 1.0:
    raise ConfigError("partial_rotary_factor != 1 is not supported")
  theta, scaling = _rope(d)
  heads = d["num_attention_heads"]
  explicit = d.get("head_dim")
  explicit = None if explicit is None or explicit * heads == d["hidden_size"] else int(explicit)
  head_dim = explicit or d["hidden_size"] // heads
  bias = model_type == "qwen2" or bool(d.get("attention_bias", False))
  text = TextConfig(**{k: d[k] for k in _KEYS}, num_key_value_heads=d.get("num_key_value_heads") or heads,
                    rope_theta=theta, mrope_section=(head_dim // 2, 0, 0), qkv_bias=bias,
                    output_bias=model_type == "llama" and bias, explicit_head_dim=explicit, rope_scaling=scaling)
  eos = d.get("eos_token_id")
  return TextLMConfig(text=text, model_type=model_type, tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
                      bos_token_id=d.get("bos_token_id"), eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
                      pad_token_id=d.get("pad_token_id")).validate()


def to_hf_dict(cfg: TextLMConfig) -> dict[str, Any]:
  """The `config.json` that transformers loads into `LlamaConfig` / `Qwen2Config`."""
  t = cfg.text
  rope: dict[str, Any] = {"rope_type": "default", "rope_theta": t.rope_theta}
  if t.rope_scaling is not None:
    rope = dict(dataclasses.asdict(t.rope_scaling), rope_type="llama3", rope_theta=t.rope_theta)
  out = {k: getattr(t, k) for k in _KEYS}
  out.update(architectures=[ARCHITECTURES[cfg.model_type]], model_type=cfg.model_type, hidden_act="silu",
             num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim, rope_parameters=rope,
             tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id, pad_token_id=cfg.pad_token_id,
             eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id)
  if cfg.model_type == "llama":
    out.update(attention_bias=t.qkv_bias, mlp_bias=False)
  else:
    out.update(use_sliding_window=False)
  return out
