"""Hugging Face checkpoints in and out: round trips through transformers, layouts, and every bad input."""

import json
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from safework.models import (CheckpointError, ConfigError, Qwen25VL, forward, from_pretrained, init_params,
                             load_config, save_pretrained)
from safework.models.config import from_hf_dict, to_hf_dict
from tests import hf_reference as ref

PATCH_DIM = 3 * 2 * 14 * 14
GRIDS = [(1, 4, 6)]


def _arrays():
  return dict(input_ids=np.array([ref.image_prompt(GRIDS, [10, 11, 12])]), pixel_values=ref.pixels(GRIDS, PATCH_DIM),
              image_grid_thw=np.array(GRIDS))


def _copy(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_export_round_trip_through_transformers(hf_checkpoints, tmp_path):
  src, _ = hf_checkpoints(tied=False)
  (src / "tokenizer_config.json").write_text("{}")   # an asset that must travel with the export
  cfg = load_config(src)
  model = Qwen25VL(cfg)
  params = jax.tree.map(np.asarray, nn.meta.unbox(jax.jit(init_params, static_argnums=0)(model, jax.random.key(3))))
  out = save_pretrained(tmp_path / "export", model, params, assets_from=src)
  assert (out / "tokenizer_config.json").is_file()
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
  expected = ref.hf_forward(hf, **_arrays()).logits.numpy()
  np.testing.assert_allclose(np.asarray(forward(model, params, **_arrays())), expected, atol=1e-5, rtol=0)
  # And back: the exported tensors load into the same parameters.
  _, reloaded = from_pretrained(out)
  jax.tree.map(np.testing.assert_array_equal, reloaded, params)


def test_export_in_shards_and_bf16(hf_checkpoints, tmp_path):
  src, _ = hf_checkpoints(tied=True)
  model, params = from_pretrained(src)
  out = save_pretrained(tmp_path / "bf16", model, params, dtype=jax.numpy.bfloat16, max_shard_bytes=64 << 10)
  index = json.loads((out / "model.safetensors.index.json").read_text())
  assert len(set(index["weight_map"].values())) > 1
  assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32,
                                                                       attn_implementation="eager").eval()
  assert "lm_head.weight" not in index["weight_map"]
  bf16_model, bf16_params = from_pretrained(out)
  expected = ref.hf_forward(hf, **_arrays()).logits.numpy()
  np.testing.assert_allclose(np.asarray(forward(bf16_model, bf16_params, **_arrays())), expected, atol=1e-5)


def test_sharded_checkpoint_loads(hf_checkpoints, tmp_path):
  _, hf = hf_checkpoints(tied=False)
  hf.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
  assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
  model, params = from_pretrained(tmp_path / "sharded")
  expected = ref.hf_forward(hf, **_arrays()).logits.numpy()
  np.testing.assert_allclose(np.asarray(forward(model, params, **_arrays())), expected, atol=1e-5, rtol=0)


def test_in_memory_key_layout_loads(hf_checkpoints, tmp_path):
  src, hf = hf_checkpoints(tied=False)
  dst = _copy(src, tmp_path / "new_layout")
  tensors = load_file(dst / "model.safetensors")
  renamed = {("model.language_model." + k[6:] if k.startswith("model.") else
              "model." + k if k.startswith("visual.") else k): v for k, v in tensors.items()}
  assert any(k.startswith("model.visual.") for k in renamed)
  save_file(renamed, dst / "model.safetensors", metadata={"format": "pt"})
  model, params = from_pretrained(dst)
  expected = ref.hf_forward(hf, **_arrays()).logits.numpy()
  np.testing.assert_allclose(np.asarray(forward(model, params, **_arrays())), expected, atol=1e-5, rtol=0)


def test_flat_hub_config_parses_like_the_nested_one(hf_checkpoints):
  src, _ = hf_checkpoints(tied=False)
  nested = json.loads((src / "config.json").read_text())
  text, vision = nested["text_config"], dict(nested["vision_config"])
  rope = text["rope_parameters"]
  flat = {k: v for k, v in text.items() if k not in ("rope_parameters", "model_type")}
  flat.update(model_type="qwen2_5_vl", rope_theta=rope["rope_theta"],
              rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
              image_token_id=nested["image_token_id"], video_token_id=nested["video_token_id"],
              vision_start_token_id=nested["vision_start_token_id"], vision_end_token_id=nested["vision_end_token_id"])
  vision["in_chans"] = vision.pop("in_channels")
  vision["spatial_patch_size"] = vision["patch_size"]
  flat["vision_config"] = vision
  assert from_hf_dict(flat) == from_hf_dict(nested) == load_config(src)
  assert from_hf_dict(to_hf_dict(load_config(src))) == load_config(src)


def _mutated(src, tmp_path, mutate):
  dst = _copy(src, tmp_path / "bad")
  tensors = load_file(dst / "model.safetensors")
  mutate(tensors)
  save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
  return dst


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(hf_checkpoints, tmp_path):
  src, _ = hf_checkpoints(tied=False)

  def mutate(t):
    del t["model.layers.1.mlp.up_proj.weight"]
    del t["visual.blocks.0.attn.qkv.bias"]
    t["model.layers.0.extra.weight"] = np.zeros(3, np.float32)
    t["model.norm.weight"] = np.zeros(7, np.float32)

  with pytest.raises(CheckpointError) as error:
    from_pretrained(_mutated(src, tmp_path, mutate))
  message = str(error.value)
  for expected in ("2 missing", "model.layers.1.mlp.up_proj.weight", "visual.blocks.0.attn.qkv.bias",
                   "1 unexpected", "model.layers.0.extra.weight", "wrong shape", "model.norm.weight: checkpoint (7,)"):
    assert expected in message


def test_tied_checkpoint_under_an_untied_config_says_so(hf_checkpoints, tmp_path):
  src, _ = hf_checkpoints(tied=False)
  with pytest.raises(CheckpointError, match="tie_word_embeddings"):
    from_pretrained(_mutated(src, tmp_path, lambda t: t.pop("lm_head.weight")))


def test_configs_that_are_not_qwen2_5_vl(hf_checkpoints):
  config = json.loads((hf_checkpoints(tied=False)[0] / "config.json").read_text())
  with pytest.raises(ConfigError, match="model_type='qwen2_vl'"):
    from_hf_dict(config | {"model_type": "qwen2_vl"})
  with pytest.raises(ConfigError, match="out_hidden_size"):
    from_hf_dict(config | {"vision_config": config["vision_config"] | {"out_hidden_size": 7}})
  with pytest.raises(ConfigError, match="missing 'depth'"):
    from_hf_dict(config | {"vision_config": {k: v for k, v in config["vision_config"].items() if k != "depth"}})
  text = config["text_config"]
  no_section = text | {"rope_parameters": {k: v for k, v in text["rope_parameters"].items() if k != "mrope_section"}}
  with pytest.raises(ConfigError, match="mrope_section"):
    from_hf_dict(config | {"text_config": no_section})


def test_pickled_weights_are_refused(hf_checkpoints, tmp_path):
  dst = _copy(hf_checkpoints(tied=False)[0], tmp_path / "pickled")
  (dst / "model.safetensors").rename(dst / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match="pickled weights are never loaded"):
    from_pretrained(dst)


def test_placeholder_and_grid_errors(hf_checkpoints):
  model, params = from_pretrained(hf_checkpoints(tied=False)[0])
  arrays = _arrays()
  wrong_count = dict(arrays, input_ids=np.array([[ref.VISION_START] + [ref.IMAGE] * 5 + [ref.VISION_END]]))
  with pytest.raises(ValueError, match="5 image placeholder tokens .* give 6 merged patches"):
    forward(model, params, **wrong_count)
  with pytest.raises(ValueError, match="smaller than one merged patch"):
    forward(model, params, input_ids=np.array([[ref.IMAGE]]), pixel_values=ref.pixels([(1, 1, 4)], PATCH_DIM),
            image_grid_thw=np.array([[1, 1, 4]]))
  with pytest.raises(ValueError, match="patch rows"):
    forward(model, params, **dict(arrays, pixel_values=arrays["pixel_values"][:-4]))
  with pytest.raises(ValueError, match="given together"):
    forward(model, params, input_ids=arrays["input_ids"], pixel_values=arrays["pixel_values"])
  with pytest.raises(TypeError, match="prepare_inputs"):
    jax.jit(lambda g: model.apply({"params": params}, arrays["input_ids"], pixel_values=arrays["pixel_values"],
                                  image_grid_thw=g))(arrays["image_grid_thw"])
