"""Qwen2.5-VL in pure-functional Flax, with Hugging Face checkpoints in and out."""

from safework.models.checkpoint import CheckpointError, from_pretrained, load_config, save_pretrained
from safework.models.config import ConfigError, ModelConfig, TextConfig, VisionConfig
from safework.models.inputs import PreparedInputs, prepare_inputs
from safework.models.presets import PRESETS, get_preset
from safework.models.qwen2_5_vl import Qwen25VL, encode_vision, forward, init_params
from safework.models.text import KVCache

__all__ = [
    "CheckpointError", "ConfigError", "KVCache", "ModelConfig", "PRESETS", "PreparedInputs", "Qwen25VL",
    "TextConfig", "VisionConfig", "encode_vision", "forward", "from_pretrained", "get_preset", "init_params", "load_config",
    "prepare_inputs", "save_pretrained",
]
