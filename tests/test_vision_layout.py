"""Host-side vision index arithmetic against transformers' own helpers, bit for bit; shape bucketing."""

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from transformers import vision_utils

from safework.models import Qwen25VL, get_preset, init_params
from safework.models.config import VisionConfig
from safework.models.inputs import pad_images
from safework.models.vision_layout import (PATCH_FLOOR, bucket_size, patch_positions, segment_blocks, validate_grid,
                                           vision_layout, window_index)

CFG = VisionConfig(window_size=112, fullatt_block_indexes=(1,), depth=2, hidden_size=32, num_heads=2)
GRIDS = [
    [[1, 8, 8]],                          # one full window
    [[1, 10, 14], [1, 4, 6]],             # partial windows on both edges, two images
    [[3, 12, 20], [1, 2, 2], [2, 18, 6]],  # videos and the smallest image
]


@pytest.mark.parametrize("grid", GRIDS)
def test_window_index_and_segments_match_transformers(grid):
  grid = np.array(grid)
  merged_order, sizes = window_index(grid, 2, CFG.window_size // 2 // CFG.patch_size)
  expected, cu_windows = vision_utils.get_vision_window_index(torch.tensor(grid), 2, CFG.window_size, CFG.patch_size)
  np.testing.assert_array_equal(merged_order, expected.numpy())
  cu = torch.unique_consecutive(torch.as_tensor(cu_windows)).numpy()
  np.testing.assert_array_equal(np.cumsum([0] + [s * 4 for s in sizes]), cu)


@pytest.mark.parametrize("grid", GRIDS)
def test_patch_positions_match_transformers(grid):
  grid = np.array(grid)
  expected = vision_utils.get_vision_position_ids(torch.tensor(grid), 2).numpy()
  np.testing.assert_array_equal(patch_positions(grid, 2), expected)


def test_segment_blocks_gather_every_position_once():
  seg = segment_blocks([3, 1, 4], block_len=4)
  assert seg.blocks.shape == (3, 4)
  flat = seg.blocks.reshape(-1)
  np.testing.assert_array_equal(flat[seg.slots], np.arange(8))
  assert (flat == 8).sum() == 4   # padding entries point past the end


def test_layout_permutation_is_invertible():
  grid = np.array(GRIDS[2])
  layout = vision_layout(grid, CFG)
  merged_window_order = layout.window_order[::4] // 4
  np.testing.assert_array_equal(merged_window_order[layout.merged_restore], np.arange(len(merged_window_order)))
  # Full-attention segments are one temporal slice each; window rows are padded to a multiple of 8.
  frames = layout.frames.blocks
  assert frames.shape[0] == grid[:, 0].sum() and (frames < len(layout.window_order)).any(1).all()
  windows = layout.windows.blocks
  assert windows.shape[0] % 8 == 0 and (windows[-1] == len(layout.window_order)).all()


@pytest.mark.parametrize("per_octave", [1, 4, 8])
def test_bucket_sizes_are_few_and_tight(per_octave):
  sizes = {bucket_size(n, 4, per_octave) for n in range(1025, 2049)}
  assert len(sizes) == per_octave and all(s % 4 == 0 for s in sizes)
  assert all(n <= bucket_size(n, 4, per_octave) <= n * (1 + 1 / per_octave) + 4 for n in range(1, 5000))
  with pytest.raises(ValueError, match="power of two"):
    bucket_size(10, 1, 3)


def test_images_of_other_sizes_share_shapes_and_padding_leaves_the_real_features_alone():
  cfg = get_preset("tiny")
  model = Qwen25VL(cfg)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  encode = jax.jit(lambda pixels, layout: model.apply({"params": params}, pixels, layout,
                                                      method=Qwen25VL.encode_vision))
  rng = np.random.default_rng(0)
  shapes = set()
  for grid in ([[1, 20, 28], [1, 4, 6]], [[1, 24, 24], [1, 6, 4]]):   # 584 and 600 patches: one bucket (640)
    grid = np.array(grid)
    pixels = rng.normal(size=(int(np.prod(grid, 1).sum()), cfg.vision.patch_dim)).astype(np.float32)
    padded, padding = pad_images({"pixel_values": pixels, "image_grid_thw": grid}, 2, 8)
    assert padding == 1 and len(padded["pixel_values"]) == 640 and (padded["image_grid_thw"][:2] == grid).all()
    layout = vision_layout(padded["image_grid_thw"], cfg.vision, padding_items=padding)
    shapes.add(tuple(np.shape(x) for x in jax.tree.leaves(layout)))
    merged = len(pixels) // 4
    np.testing.assert_allclose(np.asarray(encode(padded["pixel_values"], layout))[:merged],
                               np.asarray(encode(pixels, vision_layout(grid, cfg.vision))), atol=1e-5)
  assert len(shapes) == 1   # one compiled vision program for both batches
  small, padding = pad_images({"pixel_values": np.zeros((16, 4)), "image_grid_thw": np.array([[1, 4, 4]])}, 2, 8)
  assert len(small["pixel_values"]) == PATCH_FLOOR and padding == 1   # small batches share the smallest bucket


@pytest.mark.parametrize("grid,message", [
    ([[1, 3, 4]], "multiples of spatial_merge_size"),
    ([[1, 0, 4]], "non-positive"),
    ([1, 4, 4], "shape"),
])
def test_bad_grids_are_rejected(grid, message):
  with pytest.raises(ValueError, match=message):
    validate_grid(np.array(grid), 2)
