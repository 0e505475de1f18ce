"""Host-side vision index arithmetic against transformers' own helpers, bit for bit."""

import numpy as np
import pytest
import torch
from transformers import vision_utils

from safework.models.config import VisionConfig
from safework.models.vision_layout import patch_positions, segment_blocks, validate_grid, vision_layout, window_index

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
  # Full-attention segments are one temporal slice each; they stay contiguous in window order.
  assert layout.frames.blocks.shape[0] == grid[:, 0].sum()


@pytest.mark.parametrize("grid,message", [
    ([[1, 3, 4]], "multiples of spatial_merge_size"),
    ([[1, 0, 4]], "non-positive"),
    ([1, 4, 4], "shape"),
])
def test_bad_grids_are_rejected(grid, message):
  with pytest.raises(ValueError, match=message):
    validate_grid(np.array(grid), 2)
