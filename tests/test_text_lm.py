"""The text-only families (Llama 3.x, Qwen2) against transformers: logits, export, greedy generation, presets."""

import json

import jax
import numpy as np
import pytest
import torch
import transformers

from safework.models import ConfigError, TextLM, from_pretrained, load_config, save_pretrained
from safework.models.rope import inv_frequencies, llama3_scaled
from safework.models.text_lm_config import from_hf_dict, to_hf_dict
from safework.sampling import Sampler, SamplingSettings

VOCAB, PAD, EOS = 96, 0, 2
# RoPE scaling with an original context of 32: at head_dim 16 the frequencies fall in all three of its bands.
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}


def _hf_config(family: str, tied: bool, kv_heads: int, bias: bool = False):
  common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=kv_heads, max_position_embeddings=256, tie_word_embeddings=tied,
                bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
  if family == "llama":
    return transformers.LlamaConfig(**common, rms_norm_eps=1e-5, attention_bias=bias, rope_parameters=LLAMA3_ROPE)
  return transformers.Qwen2Config(**common, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 1e4})


def _hf_model(config, seed: int):
  """A random model in eager fp32, norms and biases randomised so that a dropped one shows."""
  torch.manual_seed(seed)
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name.endswith("bias"):
        p.copy_(0.2 * torch.randn_like(p))
  return model


CASES = {   # name: (family, tied, kv_heads, attention_bias)
    "llama_gqa_untied": ("llama", False, 2, False),
    "llama_mha_tied_biased": ("llama", True, 4, True),
    "qwen2_gqa_tied": ("qwen2", True, 2, False),
    "qwen2_mha_untied": ("qwen2", False, 4, False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
  family, tied, kv_heads, bias = CASES[request.param]
  hf = _hf_model(_hf_config(family, tied, kv_heads, bias), seed=len(request.param))
  path = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(path)
  return path, hf


def _batch():
  """Two rows, the second left-padded; positions count unpadded tokens only (as `generate` numbers them)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, VOCAB, (2, 40)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, :7] = 0
  ids[1, :7] = PAD
  positions = np.clip(np.cumsum(mask, -1) - 1, 0, None)
  return ids, mask, positions


def test_logits_equal_transformers(checkpoint):
  path, hf = checkpoint
  model, params = from_pretrained(path)
  assert isinstance(model, TextLM)
  ids, mask, positions = _batch()
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions).long()).logits.numpy()
  ours = np.asarray(jax.jit(lambda p: model.apply({"params": p}, ids, mask))(params))
  np.testing.assert_allclose(ours[mask.astype(bool)], expected[mask.astype(bool)], atol=1e-5, rtol=1e-5)


def test_export_round_trip_loads_in_transformers(checkpoint, tmp_path):
  path, hf = checkpoint
  model, params = from_pretrained(path)
  save_pretrained(tmp_path, model, params)
  assert load_config(tmp_path) == model.config
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
  assert set(again.state_dict()) == set(hf.state_dict())
  for name, tensor in hf.state_dict().items():
    torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)
  ids, mask, _ = _batch()
  with torch.no_grad():
    reference = hf(input_ids=torch.from_numpy(ids[:1]).long()).logits
    torch.testing.assert_close(again(input_ids=torch.from_numpy(ids[:1]).long()).logits, reference, rtol=0, atol=0)


def test_greedy_generation_through_the_sampler_equals_generate(checkpoint):
  path, hf = checkpoint
  model, params = from_pretrained(path)
  ids, mask, _ = _batch()
  ids, mask = ids[:, 20:], mask[:, 20:]
  steps = 12
  out = Sampler(model).generate(params, dict(input_ids=ids, attention_mask=mask), jax.random.key(0),
                                SamplingSettings(max_new_tokens=steps, temperature=0.0))
  with torch.no_grad():
    expected = hf.generate(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                           max_new_tokens=steps, do_sample=False, eos_token_id=None, pad_token_id=PAD)
  np.testing.assert_array_equal(np.asarray(out.tokens), expected[:, ids.shape[1]:].numpy())


def test_llama3_frequencies_equal_transformers():
  config = _hf_config("llama", tied=False, kv_heads=2)
  expected, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
  scaling = load_config_of(config).text.rope_scaling
  ours = llama3_scaled(inv_frequencies(5e5, 16), scaling)
  # torch's fp32 pow is not correctly rounded (see rope.inv_frequencies): the tables agree to an ulp.
  np.testing.assert_array_max_ulp(ours, expected.numpy(), maxulp=1)
  plain = inv_frequencies(5e5, 16)
  assert (ours < plain).any() and (ours == plain).any(), "the test's frequencies must span the bands"


def load_config_of(hf_config):
  return from_hf_dict(hf_config.to_dict())


def test_config_round_trip_and_errors():
  for family, tied, kv, bias in CASES.values():
    cfg = load_config_of(_hf_config(family, tied, kv, bias))
    assert from_hf_dict(to_hf_dict(cfg)) == cfg
    assert from_hf_dict(json.loads(json.dumps(to_hf_dict(cfg)))) == cfg
  d = _hf_config("llama", False, 2).to_dict()
  with pytest.raises(ConfigError, match="yarn"):
    from_hf_dict(d | {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}})
  with pytest.raises(ConfigError, match="mlp_bias"):
    from_hf_dict(d | {"mlp_bias": True})
  with pytest.raises(ConfigError, match="num_hidden_layers"):
    from_hf_dict({k: v for k, v in d.items() if k != "num_hidden_layers"})
  with pytest.raises(ConfigError, match=r"'mistral'.*llama"):
    from safework.models.families import config_from_hf_dict
    config_from_hf_dict(d | {"model_type": "mistral"})


def test_every_layers_states_equal_transformers_hidden_states(checkpoint):
  """`decode_layers` (the analysis' hidden states): layer y's output is transformers' hidden_states[y + 1] (the
  last one before the final norm, which transformers applies to its last entry)."""
  path, hf = checkpoint
  model, params = from_pretrained(path)
  ids, mask, positions = _batch()
  with torch.no_grad():
    expected = hf(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask),
                  position_ids=torch.from_numpy(positions).long(), output_hidden_states=True).hidden_states
  embeds = model.apply({"params": params}, ids, method="embed")
  layers = model.apply({"params": params}, embeds, np.broadcast_to(positions, (3, *positions.shape)), mask,
                       method="decode_layers")
  valid = mask.astype(bool)
  assert layers.shape[0] == len(expected) - 1
  for y in range(layers.shape[0] - 1):
    np.testing.assert_allclose(np.asarray(layers[y])[valid], expected[y + 1].numpy()[valid], atol=1e-5, rtol=1e-5)


def test_a_text_only_policy_names_an_example_with_an_image_before_its_weights_load(tmp_path):
  from safework.data.example import Example
  from safework.data.jsonl import DataError
  from safework.models import get_preset
  from safework.stages import check_readable
  examples = [Example("what is 2 + 2"), Example("what colour is the shape?", images=(np.zeros((8, 8, 3), np.uint8),))]
  with pytest.raises(DataError, match=r"example 1 \('what colour is the shape\?'\).*text-only llama"):
    check_readable(iter(examples), get_preset("llama_tiny"))
  check_readable(iter(examples), get_preset("tiny"))   # Qwen2.5-VL reads them
