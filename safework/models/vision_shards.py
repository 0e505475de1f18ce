"""The vision tower data-parallel over the mesh: each batch shard encodes its own images.

A rollout's images are one concatenated patch sequence; encoding it on every device repeats the whole tower's work
on each (at the paper's image sizes, minutes per rollout). `shard_layout` deals whole images to S shards (the
largest first, to the least-loaded shard), pads every shard to one patch count with a blank image, and equalises
their index tables, so the tower runs once per shard under `jax.vmap`, the shard axis split over the mesh's batch
axes (the sharding rules' "batch" entry): each device encodes about 1/S of the patches. The features come back in
the processor's order.

Axis legend: S shards, P patches, Q patches per shard, M merged tokens, D decoder hidden, C patch values.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from safework import sharding
from safework.models.config import VisionConfig
from safework.models.vision_layout import (TABLE_BUCKETS, TableShape, VisionLayout, num_patches, patch_bucket,
                                           table_shape, validate_grid, vision_layout)



@dataclasses.dataclass(frozen=True)
class ShardAxes:
  """The mesh axes a layout's shard axis is split over, and their product (the number of shards)."""
  axes: tuple[str, ...]
  count: int


def shard_axes(mesh, rules: Sequence[tuple[str, object]]) -> ShardAxes | None:
  """The mesh axes the rules split a batch over (None when they make one shard, or without a mesh)."""
  if mesh is None:
    return None
  axes = tuple(a for a in sharding.mesh_axes(rules, "batch") if a in mesh.shape)
  count = math.prod(mesh.shape[a] for a in axes)
  return ShardAxes(axes, count) if count > 1 else None


@flax.struct.dataclass
class ShardedLayout:
  """Per-shard layouts stacked along a leading shard axis, and how patches and features map to the shards.

  shards:        a VisionLayout whose arrays are [S, ...] (one layout per shard, equal shapes).
  patch_index:   [S, Q] the row of `pixel_values` each shard encodes at each slot (P: a blank row).
  merged_gather: [M] each merged token's row (processor order) among the shards' outputs [S * Q / merge^2] (the
                 unsharded batch's padding items read row 0: their features are never used).
  axes:          the mesh axes the shard axis is split over.
  """
  shards: VisionLayout
  patch_index: np.ndarray
  merged_gather: np.ndarray
  axes: tuple[str, ...] = flax.struct.field(pytree_node=False, default=())


def _deal(patches: np.ndarray, shards: int) -> list[list[int]]:
  """Items to shards: largest first, each to the least-loaded shard; items keep their order within a shard."""
  load, dealt = np.zeros(shards, np.int64), [[] for _ in range(shards)]
  for item in np.argsort(-patches, kind="stable"):
    target = int(np.argmin(load))
    dealt[target].append(int(item))
    load[target] += patches[item]
  return [sorted(items) for items in dealt]


def shard_layout(grid_thw: np.ndarray, cfg: VisionConfig, shards: ShardAxes, what: str = "image_grid_thw",
                 padding_items: int = 0) -> ShardedLayout:
  """The layout of `grid_thw`'s items dealt to `shards.count` shards; the last `padding_items` items (blank
  padding of the unsharded batch) are left out, since each shard pads itself."""
  merge, unit = cfg.spatial_merge_size, cfg.merge_unit
  grid = validate_grid(grid_thw, merge, what)
  real = grid[:len(grid) - padding_items]
  patches = np.prod(real, axis=1)
  starts = np.concatenate([[0], np.cumsum(patches)])
  dealt = _deal(patches, shards.count)
  per_shard = patch_bucket(max(int(patches[items].sum()) for items in dealt), unit, TABLE_BUCKETS)
  patch_index, offsets = np.full((shards.count, per_shard), num_patches(grid), np.int32), {}
  grids, fillers = [], []
  for s, items in enumerate(dealt):
    used = int(patches[items].sum())
    filler = [[1, merge, (per_shard - used) // merge]] if per_shard > used else []
    grids.append(np.array([real[i] for i in items] + filler, np.int64).reshape(-1, 3))
    fillers.append(len(filler))
    slot = 0
    for i in items:
      patch_index[s, slot:slot + patches[i]] = np.arange(starts[i], starts[i + 1])
      offsets[i] = s * (per_shard // unit) + slot // unit
      slot += int(patches[i])
  padding_merged = np.zeros(num_patches(grid[len(real):]) // unit, np.int64)   # never read: any row will do
  merged_gather = np.concatenate([offsets[i] + np.arange(patches[i] // unit) for i in range(len(real))]
                                 + [padding_merged]).astype(np.int32)
  # One table shape for all shards: the longest frame block, then the most rows at that block.
  block = max(table_shape(g, cfg, n, what=what).frame_block for g, n in zip(grids, fillers))
  shapes = [table_shape(g, cfg, n, block, what) for g, n in zip(grids, fillers)]
  tables = TableShape(window_rows=max(t.window_rows for t in shapes), frame_rows=max(t.frame_rows for t in shapes),
                      frame_block=block)
  layouts = [vision_layout(g, cfg, what, n, tables) for g, n in zip(grids, fillers)]
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *layouts)
  return ShardedLayout(shards=stacked, patch_index=patch_index, merged_gather=merged_gather, axes=shards.axes)


def encode_sharded(encode, params, pixel_values: jax.Array, layout: ShardedLayout) -> jax.Array:
  """`encode(params, pixels [Q, C], layout) -> [Q / merge^2, D]` run per shard, gathered back into features
  [M, D] in the processor's order.

  Under a mesh the shards run in `shard_map` over the layout's axes, each device on its own shards with the whole
  tower's parameters (gathered once, as fsdp gathers them for any layer); left to GSPMD, the shard axis would meet
  parameters split over the same axes and be computed replicated.
  """
  blank = jnp.zeros((1, pixel_values.shape[1]), pixel_values.dtype)
  pixels = jnp.concatenate([pixel_values, blank])[jnp.asarray(layout.patch_index)]   # [S, Q, C]
  per_device = lambda p, x, shards: jax.vmap(lambda xs, lay: encode(p, xs, lay))(x, shards)
  if not jax.sharding.get_abstract_mesh().empty and layout.axes:
    split = PartitionSpec(layout.axes)
    per_device = jax.shard_map(per_device, in_specs=(PartitionSpec(), split, split), out_specs=split,
                               axis_names=frozenset(layout.axes), check_vma=False)
  features = per_device(params, pixels, layout.shards)                               # [S, Q / merge^2, D]
  return features.reshape(-1, features.shape[-1])[jnp.asarray(layout.merged_gather)]
