"""Presets of every family: parameter counts equal transformers' count for the same config and the released
checkpoints'; configs survive the HF round trip."""

import math

import jax
import pytest
import torch
import transformers

from safework.models import PRESETS, build_model, family_of, get_preset
from safework.models.checkpoint import abstract_params

# The Hub's parameter counts of the released checkpoints (Qwen2.5-VL: qwen2_5_vl.md, section 9, and InternVL3's
# model cards, to 0.1%; the DeepSeek-R1-Distill bases, Llama 3.1 / 3.3 and Qwen2.5(-Math), exactly).
RELEASED = {"3b": 3.755e9, "7b": 8.292e9, "32b": 33.453e9, "72b": 73.411e9, "internvl3_8b": 7.94e9,
            "internvl3_78b": 78.41e9}
EXACT = {"r1_distill_llama_8b": 8_030_261_248, "r1_distill_llama_70b": 70_553_706_496,
         "r1_distill_qwen_7b": 7_615_616_512, "r1_distill_qwen_32b": 32_763_876_352}


def _count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_count_equals_transformers(name):
  cfg = get_preset(name)
  family = family_of(cfg)
  ours = _count(abstract_params(build_model(cfg)))
  hf_config = family.to_hf_dict(cfg)
  with torch.device("meta"):
    architecture = getattr(transformers, hf_config["architectures"][0])
    hf = architecture(transformers.AutoConfig.for_model(**hf_config))
  assert ours == sum(p.numel() for p in hf.parameters())
  if name in RELEASED:
    assert abs(ours - RELEASED[name]) < 1e-3 * RELEASED[name]
  assert ours == EXACT.get(name, ours)
  assert family.from_hf_dict(hf_config) == cfg


def test_unknown_preset():
  with pytest.raises(KeyError, match="choose one of"):
    get_preset("13b")
