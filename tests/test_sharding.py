"""Meshes, logical-axis shardings, parameters born sharded, and checkpoints read straight into shards."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from safework import sharding
from safework.models import Qwen25VL, forward, from_pretrained, get_preset, init_params
from safework.models.checkpoint import abstract_params
from tests import hf_reference as ref


def test_make_mesh_fills_the_rest_and_validates():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  with pytest.raises(ValueError, match="needs 16 devices"):
    sharding.make_mesh({"data": 4, "tensor": 4})
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh({"data": -1, "tensor": -1})


def test_partition_specs_follow_rules_and_skip_indivisible_dimensions():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = sharding.DEFAULT_RULES
  assert sharding.partition_spec((64, 4, 16), ("embed", "heads", "head_dim"), mesh, rules) == P("fsdp", "tensor", None)
  assert sharding.partition_spec((8, 3), ("batch", None), mesh, rules) == P(("data", "fsdp"), None)
  assert sharding.partition_spec((6, 3), ("batch", None), mesh, rules) == P("data", None)   # 6 % 4 != 0
  assert sharding.partition_spec((3, 7), ("vocab", "embed"), mesh, rules) == P(None, None)


def test_parameters_are_born_sharded():
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  model = Qwen25VL(get_preset("tiny"))
  params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(0), mesh, sharding.DEFAULT_RULES)
  q = params["decoder"]["layers"]["q_proj"]["kernel"]   # [layers, D, N, H], layers stacked by the scan
  assert q.sharding.spec == P(None, "fsdp", "tensor", None)
  assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (4, 64, 2, 32)
  expected = nn.meta.unbox(jax.jit(init_params, static_argnums=0)(model, jax.random.key(0)))
  jax.tree.map(np.testing.assert_array_equal, params, expected)


def test_checkpoint_loads_straight_into_shards(hf_checkpoints):
  path, hf = hf_checkpoints(tied=False, kv_heads=2)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  shardings_of = lambda model: sharding.param_shardings(abstract_params(model), mesh, sharding.DEFAULT_RULES)
  model, params = from_pretrained(path, shardings=shardings_of)
  _, plain = from_pretrained(path)
  qkv = params["visual"]["blocks"]["qkv"]["kernel"]
  assert qkv.sharding.spec == P(None, "fsdp", None, "tensor", None)   # layers; heads split across fused q/k/v rows
  jax.tree.map(np.testing.assert_array_equal, params, plain)
  grids = [(1, 4, 6)]
  arrays = dict(input_ids=np.array([ref.image_prompt(grids, [10, 11])]),
                pixel_values=ref.pixels(grids, 3 * 2 * 14 * 14), image_grid_thw=np.array(grids))
  with jax.set_mesh(mesh):
    logits = forward(model, params, **arrays)
  np.testing.assert_allclose(np.asarray(logits), ref.hf_forward(hf, **arrays).logits.numpy(), atol=1e-5, rtol=0)
