"""The vision tower data-parallel over batch shards: images dealt whole, the features those of one tower call."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from safework import sharding
from safework.models import Qwen25VL, encode_vision, get_preset, init_params
from safework.models.inputs import pad_images, prepare_inputs
from safework.models.vision_shards import ShardAxes, shard_axes, shard_layout

GRIDS = np.array([[1, 10, 14], [1, 4, 6], [2, 4, 4], [1, 2, 2], [1, 6, 8]])   # an image of two frames, sizes apart


def test_images_are_dealt_whole_to_balanced_shards():
  cfg = get_preset("tiny").vision
  layout = shard_layout(GRIDS, cfg, ShardAxes(("data",), 3))
  patches = np.prod(GRIDS, axis=1)                               # 140, 24, 32, 4, 48: 248 in all
  index = layout.patch_index
  assert index.shape[0] == 3 and index.shape[1] >= 140          # the largest image fits one shard whole
  real = index[index < patches.sum()]
  np.testing.assert_array_equal(np.sort(real), np.arange(patches.sum()))   # every patch encoded exactly once
  starts = np.concatenate([[0], np.cumsum(patches)])
  for s in range(3):                                             # each image's patches lie in one shard, in order
    for i in range(len(GRIDS)):
      inside = np.isin(np.arange(starts[i], starts[i + 1]), index[s])
      assert inside.all() or not inside.any()
  assert len(layout.merged_gather) == patches.sum() // 4   # no padding items here
  shapes = {tuple(np.shape(x) for x in jax.tree.leaves(layout.shards))}
  assert len(shapes) == 1 and jax.tree.leaves(layout.shards)[0].shape[0] == 3


def test_shard_axes_follow_the_rules():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  assert shard_axes(mesh, sharding.DEFAULT_RULES) == ShardAxes(("data", "fsdp"), 4)
  assert shard_axes(mesh, [("batch", "tensor")]) == ShardAxes(("tensor",), 2)
  assert shard_axes(sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 8}), sharding.DEFAULT_RULES) is None
  assert shard_axes(None, sharding.DEFAULT_RULES) is None


# 8 shards: more shards than images, some hold only a blank; splash: its kernel's own shard_map nests inside
@pytest.mark.parametrize("count,attention", [(4, "einsum"), (8, "einsum"), (4, "splash")])
def test_sharded_encoding_equals_one_tower_call_on_a_mesh(count, attention):
  cfg = get_preset("tiny")
  model = Qwen25VL(cfg, attention=attention)
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  pixels = np.random.default_rng(0).normal(size=(int(np.prod(GRIDS, 1).sum()), cfg.vision.patch_dim))
  padded, padding = pad_images({"pixel_values": pixels.astype(np.float32), "image_grid_thw": GRIDS}, 2, 4)
  ids = np.array([[cfg.image_token_id] * (len(pixels) // 4)])
  plain = prepare_inputs(cfg, ids, image_grid_thw=padded["image_grid_thw"], pixel_values=padded["pixel_values"],
                         padding_images=padding)
  expected = np.asarray(encode_vision(model, params, padded["pixel_values"], plain.image_layout))
  mesh = sharding.make_mesh({"data": count, "fsdp": 8 // count, "tensor": 1})
  shards = shard_axes(mesh, [("batch", "data")])
  sharded = prepare_inputs(cfg, ids, image_grid_thw=padded["image_grid_thw"], pixel_values=padded["pixel_values"],
                           padding_images=padding, vision_shards=shards)
  with jax.set_mesh(mesh):
    encode = jax.jit(lambda p, px, layout: encode_vision(model, p, px, layout))
    got = encode(params, padded["pixel_values"], sharded.image_layout)
    text = encode.lower(params, padded["pixel_values"], sharded.image_layout).as_text()
  assert 'manual_axes={"data"}' in text   # each device encodes its own shards (shard_map over the batch axis)
  assert got.shape == expected.shape   # the padding image's rows too: the shapes do not depend on the sharding
  real = ids.shape[1]
  np.testing.assert_allclose(np.asarray(got)[:real], expected[:real], atol=2e-5)
  with pytest.raises(TypeError, match="encode_vision"):
    model.apply({"params": params}, padded["pixel_values"], sharded.image_layout, method=Qwen25VL.encode_vision)
