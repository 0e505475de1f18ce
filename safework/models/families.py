"""The model families this codebase runs, and the one place that tells them apart.

A family is its config type, its flax module (which implements `models.protocol.CausalLM`), its `config.json`
forms, its checkpoint key map, the smallest call that touches every parameter, and whether it reads images.
Loading, saving, presets and the policy pick a family here by `config.json`'s `model_type` or by the config's
type; nothing above `models` asks which family it holds.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import numpy as np

from safework.models import config as qwen2_5_vl_config
from safework.models import hf_keys, internvl, internvl_config, internvl_keys, text_lm, text_lm_config
from safework.models.config import ConfigError
from safework.models.hf_keys import HfTensor, ParamPath
from safework.models.qwen2_5_vl import Qwen25VL
from safework.models.qwen2_5_vl import dummy_inputs as qwen2_5_vl_dummy_inputs


@dataclasses.dataclass(frozen=True)
class Family:
  name: str
  model_types: tuple[str, ...]               # config.json model_type values this family reads
  config_type: type
  module: type[nn.Module]
  from_hf_dict: Callable[[Mapping[str, Any]], Any]
  to_hf_dict: Callable[[Any], dict]
  tensor_map: Callable[[Any], dict[ParamPath, HfTensor]]
  dummy_inputs: Callable[[Any], dict[str, np.ndarray]]
  reads_images: bool
  canonical_key: Callable[[str], str] = lambda key: key   # a checkpoint key in the family's on-disk layout


FAMILIES: tuple[Family, ...] = (
    Family("qwen2_5_vl", ("qwen2_5_vl",), qwen2_5_vl_config.ModelConfig, Qwen25VL, qwen2_5_vl_config.from_hf_dict,
           qwen2_5_vl_config.to_hf_dict, hf_keys.hf_tensor_map, qwen2_5_vl_dummy_inputs, True,
           hf_keys.canonical_key),
    Family("text_lm", tuple(text_lm_config.ARCHITECTURES), text_lm_config.TextLMConfig, text_lm.TextLM,
           text_lm_config.from_hf_dict, text_lm_config.to_hf_dict, text_lm.hf_tensor_map, text_lm.dummy_inputs, False),
    Family("internvl", ("internvl",), internvl_config.InternVLConfig, internvl.InternVL, internvl_config.from_hf_dict,
           internvl_config.to_hf_dict, internvl_keys.hf_tensor_map, internvl.dummy_inputs, True,
           internvl_keys.canonical_key),
)


def family_of(config) -> Family:
  for family in FAMILIES:
    if isinstance(config, family.config_type):
      return family
  raise TypeError(f"{type(config).__name__} is not the config of a known model family "
                  f"({[f.config_type.__name__ for f in FAMILIES]})")


def config_from_hf_dict(d: Mapping[str, Any]):
  """The config of a Hugging Face `config.json`, parsed by the family of its `model_type`."""
  model_type = d.get("model_type")
  for family in FAMILIES:
    if model_type in family.model_types:
      return family.from_hf_dict(d)
  known = sorted(t for f in FAMILIES for t in f.model_types)
  raise ConfigError(f"config.json has model_type={model_type!r}, an architecture this codebase does not run; it "
                    f"runs {known}")


def build_model(config, **fields) -> nn.Module:
  """The flax module of `config`'s family (`fields`: dtype, param_dtype, remat_policy, attention)."""
  return family_of(config).module(config.validate(), **fields)


def init_params(model: nn.Module, rng: jax.Array):
  """Randomly initialised parameters (boxed with their logical axes); jit-able (the dummy inputs are constants)."""
  return model.init(rng, **family_of(model.config).dummy_inputs(model.config))["params"]
