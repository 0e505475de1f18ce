"""Qwen25VL against transformers' Qwen2_5_VLForConditionalGeneration: tiny random models, fp32, eager attention."""

import numpy as np
import pytest
import torch

from safework.models import forward, from_pretrained, prepare_inputs
from safework.models.qwen2_5_vl import Qwen25VL
from tests import hf_reference as ref

TOL = 1e-5
PATCH_DIM = 3 * 2 * 14 * 14


@pytest.fixture(scope="module")
def untied(hf_checkpoints):
  path, hf = hf_checkpoints(tied=False, kv_heads=2)
  model, params = from_pretrained(path)
  return hf, model, params


def _logits(model, params, **arrays):
  return np.asarray(forward(model, params, **arrays))


def _max_diff(a, b):
  return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def test_text_only(untied):
  hf, model, params = untied
  ids = np.array([[ref.IM_START, 10, 11, 12, 13, 14, ref.IM_END, ref.IM_START, 9]])
  expected = ref.hf_forward(hf, input_ids=ids).logits.numpy()
  assert _max_diff(_logits(model, params, input_ids=ids), expected) < TOL


def test_one_image(untied):
  hf, model, params = untied
  grids = [(1, 4, 6)]
  arrays = dict(input_ids=np.array([ref.image_prompt(grids, [10, 11, 12])]), pixel_values=ref.pixels(grids, PATCH_DIM),
                image_grid_thw=np.array(grids))
  out = ref.hf_forward(hf, **arrays)
  assert _max_diff(_logits(model, params, **arrays), out.logits.numpy()) < TOL


def test_two_images_of_different_sizes_with_partial_windows(untied):
  hf, model, params = untied
  # 10x14 patches = 5x7 merged tokens: windows of 2x2 merged tokens leave partial windows on both edges.
  grids = [(1, 10, 14), (1, 4, 6)]
  arrays = dict(input_ids=np.array([ref.image_prompt(grids, [10, 11, 12, 13])]),
                pixel_values=ref.pixels(grids, PATCH_DIM, seed=1), image_grid_thw=np.array(grids))
  out = ref.hf_forward(hf, **arrays)
  assert _max_diff(_logits(model, params, **arrays), out.logits.numpy()) < TOL

  # The vision features on their own.
  prepared = prepare_inputs(model.config, arrays["input_ids"], None, arrays["image_grid_thw"],
                            pixel_values=arrays["pixel_values"])
  ours = model.apply({"params": params}, arrays["pixel_values"], prepared.image_layout, method=Qwen25VL.encode_vision)
  with torch.no_grad():
    theirs = hf.model.get_image_features(torch.from_numpy(arrays["pixel_values"]),
                                         torch.from_numpy(arrays["image_grid_thw"])).pooler_output
  assert _max_diff(ours, torch.cat(theirs).numpy()) < TOL


@pytest.mark.parametrize("seconds", [1.0, 0.35])
def test_video_with_second_per_grid_ts(untied, seconds):
  hf, model, params = untied
  grids = [(3, 4, 6)]   # 6 frames -> 3 temporal patches; 0.35 s per grid gives fractional temporal steps
  ids = np.array([ref.image_prompt(grids, [10, 11], token=ref.VIDEO)])
  arrays = dict(input_ids=ids, pixel_values_videos=ref.pixels(grids, PATCH_DIM, seed=2),
                video_grid_thw=np.array(grids), second_per_grid_ts=np.array([seconds], np.float32))
  out = ref.hf_forward(hf, **arrays)
  assert _max_diff(_logits(model, params, **arrays), out.logits.numpy()) < TOL


def test_image_and_video_together(untied):
  hf, model, params = untied
  image, video = [(1, 4, 4)], [(2, 4, 6)]
  ids = ref.image_prompt(image, [10, 11])[:-2] + ref.image_prompt(video, [12], token=ref.VIDEO)[1:]
  arrays = dict(input_ids=np.array([ids]), pixel_values=ref.pixels(image, PATCH_DIM), image_grid_thw=np.array(image),
                pixel_values_videos=ref.pixels(video, PATCH_DIM, seed=3), video_grid_thw=np.array(video),
                second_per_grid_ts=np.array([0.5], np.float32))
  out = ref.hf_forward(hf, **arrays)
  assert _max_diff(_logits(model, params, **arrays), out.logits.numpy()) < TOL


def test_left_padded_batch_of_different_lengths(untied):
  hf, model, params = untied
  grids = [(1, 4, 6)]
  long_row = ref.image_prompt(grids, [10, 11, 12, 13])
  short_row = [ref.IM_START, 15, 16, 17, ref.IM_END, ref.IM_START]
  length = len(long_row)
  ids = np.full((2, length), ref.PAD)
  mask = np.zeros((2, length), np.int64)
  ids[0], mask[0] = long_row, 1
  ids[1, -len(short_row):], mask[1, -len(short_row):] = short_row, 1
  arrays = dict(input_ids=ids, attention_mask=mask, pixel_values=ref.pixels(grids, PATCH_DIM),
                image_grid_thw=np.array(grids))
  expected = ref.hf_forward(hf, **arrays).logits.numpy()
  ours = _logits(model, params, **arrays)
  valid = mask.astype(bool)
  assert _max_diff(ours[valid], expected[valid]) < TOL
  # Each row alone gives the same logits as in the padded batch.
  alone = ref.hf_forward(hf, input_ids=np.array([short_row])).logits.numpy()
  assert _max_diff(ours[1, -len(short_row):], alone[0]) < TOL


@pytest.mark.parametrize("tied,kv_heads", [(True, 2), (False, 4), (False, 1)])
def test_tied_untied_and_head_groupings(hf_checkpoints, tied, kv_heads):
  path, hf = hf_checkpoints(tied=tied, kv_heads=kv_heads)
  model, params = from_pretrained(path)
  assert model.config.tie_word_embeddings == tied
  assert ("lm_head" in params) != tied
  grids = [(1, 6, 4)]
  arrays = dict(input_ids=np.array([ref.image_prompt(grids, [20, 21, 22])]), pixel_values=ref.pixels(grids, PATCH_DIM),
                image_grid_thw=np.array(grids))
  out = ref.hf_forward(hf, **arrays)
  assert _max_diff(_logits(model, params, **arrays), out.logits.numpy()) < TOL


def test_rope_index_is_bit_exact(untied):
  hf, model, _ = untied
  image, video = [(1, 4, 6), (1, 10, 14)], [(3, 4, 8)]
  row = ref.image_prompt(image, [10, 11]) + ref.image_prompt(video, [12], token=ref.VIDEO)
  ids = np.full((2, len(row) + 3), ref.PAD)
  mask = np.zeros_like(ids)
  ids[0, 3:], mask[0, 3:] = row, 1
  ids[1, :len(row)], mask[1, :len(row)] = row, 1   # right padding too: positions skip pad slots either way
  grids_i = np.array(image * 2)
  grids_v = np.array(video * 2)
  seconds = np.array([0.7, 0.5], np.float32)
  prepared = prepare_inputs(model.config, ids, mask, grids_i, grids_v, seconds, ref.pixels(grids_i, PATCH_DIM),
                            ref.pixels(grids_v, PATCH_DIM))
  expected, deltas = hf.model.get_rope_index(
      torch.from_numpy(ids), torch.from_numpy(ref.token_types(ids)), torch.from_numpy(grids_i),
      torch.from_numpy(grids_v), torch.from_numpy(seconds), torch.from_numpy(mask))
  valid = mask.astype(bool)
  np.testing.assert_array_equal(prepared.positions[:, valid], expected.numpy()[:, valid])
  np.testing.assert_array_equal(prepared.rope_deltas, deltas.numpy()[:, 0])
