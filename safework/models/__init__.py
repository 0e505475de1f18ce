"""The model families (Qwen2.5-VL, Llama 3.x / Qwen2 text-only, InternVL3) in pure-functional Flax, with Hugging
Face checkpoints in and out."""

from safework.models.checkpoint import CheckpointError, from_pretrained, load_config, save_pretrained
from safework.models.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from safework.models.families import build_model, family_of, init_params
from safework.models.inputs import PreparedInputs, prepare_inputs
from safework.models.presets import PRESETS, get_preset
from safework.models.protocol import CausalLM
from safework.models.qwen2_5_vl import Qwen25VL, encode_vision, forward
from safework.models.text import KVCache
from safework.models.text_lm import TextLM
from safework.models.text_lm_config import TextLMConfig

__all__ = [
    "CausalLM", "CheckpointError", "ConfigError", "KVCache", "ModelConfig", "PRESETS", "PreparedInputs", "Qwen25VL",
    "TextConfig", "TextLM", "TextLMConfig", "VisionConfig", "build_model", "encode_vision", "family_of", "forward",
    "from_pretrained", "get_preset", "init_params", "load_config", "prepare_inputs", "save_pretrained",
]
