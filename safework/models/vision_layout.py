"""Host-side index arithmetic of the vision tower, computed once per batch of images in numpy.

Everything that depends on the image sizes (`grid_thw`) lives here, outside `jit`: the 2D rotary positions, the
window permutation and its inverse, and the attention segments. Attention runs over *segment blocks*: each
segment (a window, or one temporal slice of an image for the full-attention blocks) is gathered into one row of
a `[num_segments, block_len]` index table, so attention costs `num_segments * block_len^2` and no `P x P` mask is
ever built. `slots` scatters the rows back by a gather (no scatter-add).

Axis legend: P patches, M merged tokens (P / merge^2).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import flax.struct

from safework.models.config import VisionConfig


@flax.struct.dataclass
class SegmentBlocks:
  """Attention segments as a padded index table over a length-P sequence.

  blocks: [num_segments, block_len] positions in the sequence; padding entries hold P (a zero row appended).
  slots:  [P] flat index into `blocks` of each position, to gather the attention output back into order.
  """
  blocks: np.ndarray
  slots: np.ndarray


@flax.struct.dataclass
class VisionLayout:
  """Index tables for one vision-tower call over images/videos concatenated along patches.

  window_order:   [P] patch order of window attention (windows contiguous, merge blocks kept whole).
  merged_restore: [M] inverse permutation of the merged tokens back to processor order.
  positions:      [P, 2] (row, column) rotary positions, already in window order.
  windows:        segments of the window-attention blocks.
  frames:         segments of the full-attention blocks (one per temporal slice of each image or video).
  """
  window_order: np.ndarray
  merged_restore: np.ndarray
  positions: np.ndarray
  windows: SegmentBlocks
  frames: SegmentBlocks


def validate_grid(grid_thw: np.ndarray, merge: int, what: str = "image_grid_thw") -> np.ndarray:
  grid = np.asarray(grid_thw, dtype=np.int64)
  if grid.ndim != 2 or grid.shape[1] != 3:
    raise ValueError(f"{what} must have shape [num_items, 3] (t, h, w), got {grid.shape}")
  if (grid <= 0).any():
    raise ValueError(f"{what} has non-positive entries: {grid.tolist()}")
  if (grid[:, 1:] % merge).any():
    raise ValueError(f"{what} heights and widths must be multiples of spatial_merge_size={merge}: "
                     f"{grid.tolist()}; the image is smaller than one merged patch or was not preprocessed")
  return grid


def patch_positions(grid_thw: np.ndarray, merge: int) -> np.ndarray:
  """(row, column) of every patch, in the processor's merge-block-major order: [P, 2]."""
  out = []
  for t, h, w in grid_thw:
    rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    def blockwise(a):
      return a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
    out.append(np.tile(np.stack([blockwise(rows), blockwise(cols)], axis=-1), (t, 1)))
  return np.concatenate(out).astype(np.int32)


def window_index(grid_thw: np.ndarray, merge: int, window_merged: int) -> tuple[np.ndarray, list[int]]:
  """Merged-token order of window attention, and each window's size in merged tokens.

  Windows of `window_merged`^2 merged tokens tile every temporal slice from the top-left; the last row and column
  of windows may be partial; empty cells are skipped (nothing is padded into the sequence).
  """
  order, sizes, offset = [], [], 0
  for t, h, w in grid_thw:
    lh, lw = h // merge, w // merge
    ids = np.arange(t * lh * lw).reshape(t, lh, lw) + offset
    for frame in ids:
      for r in range(0, lh, window_merged):
        for c in range(0, lw, window_merged):
          window = frame[r:r + window_merged, c:c + window_merged].reshape(-1)
          order.append(window)
          sizes.append(window.size)
    offset += t * lh * lw
  return np.concatenate(order), sizes


# Segment tables: window rows (cheap, 64 patches each) a multiple of 8; frame rows (a whole frame's attention each)
# and frame lengths 4 sizes per octave.
TABLE_BUCKETS = 4
WINDOW_ROWS = 8


def bucket_size(n: int, granule: int = 1, per_octave: int = 8) -> int:
  """`n` rounded up to one of `per_octave` sizes per octave (a power of two; at most 1 / per_octave more), a
  multiple of `granule`: a batch of images of any sizes then comes in few shapes, so the vision programs compile a
  few times, not once per batch."""
  if per_octave & (per_octave - 1) or per_octave < 1:
    raise ValueError(f"sizes per octave must be a power of two, got {per_octave}")
  step = math.lcm(granule, 1 << max(n.bit_length() - per_octave.bit_length(), 0))
  return -(-n // step) * step


PATCH_FLOOR = 256   # the smallest patch bucket: a few small images share one shape (a real image is ~5000 patches)


def patch_bucket(patches: int, unit: int, per_octave: int) -> int:
  """A batch's (or shard's) patch count rounded up to a `bucket_size` that is a multiple of `unit` (merged
  tokens stay whole) and at least `PATCH_FLOOR`."""
  return max(bucket_size(PATCH_FLOOR, unit), bucket_size(patches, unit, per_octave))


def segment_blocks(lengths: list[int], block_len: int | None = None, rows: int | None = None) -> SegmentBlocks:
  """Index table of contiguous segments with the given lengths (see `SegmentBlocks`), padded to `rows` rows."""
  total = int(sum(lengths))
  block_len = block_len or max(lengths)
  blocks = np.full((max(rows or 0, len(lengths)), block_len), total, dtype=np.int32)
  slots = np.empty(total, dtype=np.int32)
  start = 0
  for b, n in enumerate(lengths):
    if n > block_len:
      raise ValueError(f"segment of length {n} does not fit blocks of length {block_len}")
    blocks[b, :n] = np.arange(start, start + n)
    slots[start:start + n] = b * block_len + np.arange(n)
    start += n
  return SegmentBlocks(blocks=blocks, slots=slots)


def _chunks(total: int, size: int) -> list[int]:
  return [size] * (total // size) + ([total % size] if total % size else [])


@dataclasses.dataclass(frozen=True)
class TableShape:
  """The sizes of a layout's segment tables: window rows, frame rows and the frame block length. Layouts built to
  one shape stack (the vision shards: one layout per shard, one program for all)."""
  window_rows: int
  frame_rows: int
  frame_block: int


def _segments(grid: np.ndarray, cfg: VisionConfig, padding_items: int):
  """Merged-token window order, window sizes (merged tokens), the real frames' lengths (patches), padding patches."""
  merge = cfg.spatial_merge_size
  real, padding = grid[:len(grid) - padding_items], grid[len(grid) - padding_items:]
  window_merged = cfg.window_size // merge // cfg.patch_size
  merged_order, window_sizes = window_index(real, merge, window_merged) if len(real) else (np.zeros(0, int), [])
  padding_merged = num_patches(padding) // cfg.merge_unit
  merged_order = np.concatenate([merged_order, len(merged_order) + np.arange(padding_merged)])
  window_sizes = window_sizes + _chunks(padding_merged, window_merged**2)
  frame_lengths = [int(h * w) for t, h, w in real for _ in range(t)]
  return merged_order, window_sizes, frame_lengths, num_patches(padding)


def _shape_of(window_sizes: list[int], frame_lengths: list[int], padding_patches: int, cfg: VisionConfig,
              frame_block: int | None) -> TableShape:
  unit, window_merged = cfg.merge_unit, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
  frame_block = frame_block or bucket_size(max(frame_lengths, default=window_merged**2 * unit), unit, TABLE_BUCKETS)
  frames = len(frame_lengths) + len(_chunks(padding_patches, frame_block))
  return TableShape(window_rows=bucket_size(len(window_sizes), WINDOW_ROWS, TABLE_BUCKETS),
                    frame_rows=bucket_size(frames, 1, TABLE_BUCKETS), frame_block=frame_block)


def table_shape(grid_thw: np.ndarray, cfg: VisionConfig, padding_items: int = 0, frame_block: int | None = None,
                what: str = "image_grid_thw") -> TableShape:
  """The bucketed table sizes `vision_layout` gives `grid_thw` (with frame blocks of `frame_block`, default the
  bucketed longest frame)."""
  grid = validate_grid(grid_thw, cfg.spatial_merge_size, what)
  _, window_sizes, frame_lengths, padding_patches = _segments(grid, cfg, padding_items)
  return _shape_of(window_sizes, frame_lengths, padding_patches, cfg, frame_block)


def vision_layout(grid_thw: np.ndarray, cfg: VisionConfig, what: str = "image_grid_thw", padding_items: int = 0,
                  tables: TableShape | None = None) -> VisionLayout:
  """All index tables for one vision-tower call over the items of `grid_thw` [num_items, 3].

  The last `padding_items` items are blank padding (`models.inputs.pad_images`): their patches follow the real ones
  in plain order and attend in full blocks (windows, and frame-length chunks), so padding never widens the tables.
  The tables come in `tables`' sizes (default `table_shape`'s: bucketed).
  """
  grid = validate_grid(grid_thw, cfg.spatial_merge_size, what)
  merged_order, window_sizes, frame_lengths, padding_patches = _segments(grid, cfg, padding_items)
  tables = tables or _shape_of(window_sizes, frame_lengths, padding_patches, cfg, None)
  unit, window_merged = cfg.merge_unit, cfg.window_size // cfg.spatial_merge_size // cfg.patch_size
  window_order = (merged_order[:, None] * unit + np.arange(unit)).reshape(-1).astype(np.int32)
  return VisionLayout(
      window_order=window_order,
      merged_restore=np.argsort(merged_order).astype(np.int32),
      positions=patch_positions(grid, cfg.spatial_merge_size)[window_order],
      windows=segment_blocks([n * unit for n in window_sizes], window_merged**2 * unit, tables.window_rows),
      frames=segment_blocks(frame_lengths + _chunks(padding_patches, tables.frame_block), tables.frame_block,
                            tables.frame_rows))


def num_patches(grid_thw: np.ndarray) -> int:
  return int(np.prod(np.asarray(grid_thw), axis=-1).sum()) if len(grid_thw) else 0
