"""3D (temporal, height, width) M-RoPE positions of a prompt, as transformers 5.x `get_rope_index` computes them.

Per row, over the unpadded tokens only: a text run advances the cursor one per token on all three axes; an image
of merged grid (lh, lw) puts token (r, c) at (cur, cur + r, cur + c) and advances the cursor by max(lh, lw); a
video puts slice k at temporal id cur + floor(k * tokens_per_second * second_per_grid_t) (fp32, truncating) and
also advances by max(lh, lw) (the 5.x rule, which ignores the temporal extent). Pad slots get position 0.
`rope_delta = max position + 1 - unpadded length` turns a decode step's slot count into its position.

Unlike transformers, a run of placeholders is consumed image by image (t*h*w/merge^2 tokens each), so two
images with no separator between them still get their own grids.
"""

from __future__ import annotations

import numpy as np


def _vision_positions(start: int, grid: np.ndarray, merge: int, time_step: float) -> np.ndarray:
  t, lh, lw = int(grid[0]), int(grid[1]) // merge, int(grid[2]) // merge
  temporal = (np.arange(t, dtype=np.float32) * np.float32(time_step)).astype(np.int64) + start
  tt, hh, ww = np.meshgrid(temporal, np.arange(lh) + start, np.arange(lw) + start, indexing="ij")
  return np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)])


def get_rope_index(input_ids: np.ndarray, attention_mask: np.ndarray | None, *, image_token_id: int,
                   video_token_id: int, spatial_merge_size: int, tokens_per_second: float,
                   image_grid_thw: np.ndarray | None = None, video_grid_thw: np.ndarray | None = None,
                   second_per_grid_ts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Returns positions [3, B, T] (int32) and rope deltas [B] (int32).

  Raises ValueError when the placeholder tokens do not match the grids.
  """
  input_ids = np.asarray(input_ids)
  batch, length = input_ids.shape
  mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
  grids = {image_token_id: iter(np.zeros((0, 3)) if image_grid_thw is None else np.asarray(image_grid_thw)),
           video_token_id: iter(np.zeros((0, 3)) if video_grid_thw is None else np.asarray(video_grid_thw))}
  intervals = iter(np.ones(0) if second_per_grid_ts is None else np.asarray(second_per_grid_ts, np.float32))
  names = {image_token_id: "image", video_token_id: "video"}
  unit = spatial_merge_size**2
  positions = np.zeros((3, batch, length), dtype=np.int64)
  deltas = np.zeros(batch, dtype=np.int64)
  for b in range(batch):
    ids = input_ids[b][mask[b]]
    pieces, cursor, i = [], 0, 0
    while i < len(ids):
      token = int(ids[i])
      if token in names:
        grid = next(grids[token], None)
        if grid is None:
          raise ValueError(f"row {b} has more {names[token]} placeholder runs than {names[token]} grids were given")
        count = int(np.prod(grid)) // unit
        if not np.all(ids[i:i + count] == token) or len(ids[i:i + count]) != count:
          raise ValueError(f"row {b}: a {names[token]} with grid {grid.tolist()} needs {count} consecutive "
                           f"placeholder tokens at position {i}; the prompt has fewer")
        step = 1.0
        if token == video_token_id:
          interval = next(intervals, np.float32(1.0))
          step = np.float32(tokens_per_second) * np.float32(interval)
        pieces.append(_vision_positions(cursor, grid, spatial_merge_size, step))
        cursor += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        i += count
      else:
        end = i
        while end < len(ids) and int(ids[end]) not in names:
          end += 1
        pieces.append(np.broadcast_to(np.arange(cursor, cursor + end - i), (3, end - i)))
        cursor += end - i
        i = end
    row = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
    positions[:, b, mask[b]] = row
    deltas[b] = (row.max() + 1 if row.size else 0) - len(ids)
  for token, name in names.items():
    if next(grids[token], None) is not None:
      raise ValueError(f"more {name} grids were given than the prompts have {name} placeholder runs")
  return positions.astype(np.int32), deltas.astype(np.int32)
