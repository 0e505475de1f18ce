"""Presets: parameter counts equal transformers' count for the same config; configs survive the HF round trip."""

import math

import jax
import pytest
import torch
import transformers

from safework.models import PRESETS, Qwen25VL, get_preset
from safework.models.checkpoint import abstract_params
from safework.models.config import from_hf_dict, to_hf_dict

# The Hub's parameter counts of the released checkpoints (doc: qwen2_5_vl.md, section 9).
RELEASED = {"3b": 3.755e9, "7b": 8.292e9, "32b": 33.453e9, "72b": 73.411e9}


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_equals_transformers(name):
  cfg = get_preset(name)
  ours = _count(abstract_params(Qwen25VL(cfg)))
  with torch.device("meta"):
    hf = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig(**to_hf_dict(cfg)))
  assert ours == sum(p.numel() for p in hf.parameters())
  if name in RELEASED:
    assert abs(ours - RELEASED[name]) < 1e-3 * RELEASED[name]
  assert from_hf_dict(to_hf_dict(cfg)) == cfg


def test_unknown_preset():
  with pytest.raises(KeyError, match="choose one of"):
    get_preset("13b")
