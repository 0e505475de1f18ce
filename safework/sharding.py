"""Device meshes and logical-axis sharding: every run, from one CPU to a TPU pod, runs on a mesh.

Parameters and activations name their dimensions logically ("batch", "embed", "heads", ...); `rules` (from the
experiment config) map logical names to mesh axes. A dimension whose size a mesh axis does not divide is left
replicated along that axis rather than failing, so small test models run on any mesh. Meshes use Auto axis
types (GSPMD-style propagation), which flax's logical constraints need.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

MESH_AXES = ("data", "fsdp", "tensor")

# Batch over data x fsdp; weights' embed dimension over fsdp (ZeRO-3 style); heads, MLP and vocab over tensor.
DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("layers", None),   # the scanned decoder layers' stacking axis
    ("head_dim", None),
    ("length", None),
    ("cache_length", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", None),
    ("vision_merge", "fsdp"),
)


def make_mesh(axis_sizes: Mapping[str, int] | Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None,
              dcn_axis_sizes: Mapping[str, int] | None = None) -> Mesh:
  """A mesh over `devices` (default: all) with named axes; one size may be -1, meaning "the rest".

  `dcn_axis_sizes` splits axes across slices of a multi-slice TPU job (e.g. {"data": 2}); the remaining size of
  each axis lies within a slice.
  """
  items = list(axis_sizes.items()) if isinstance(axis_sizes, Mapping) else list(axis_sizes)
  names, sizes = [n for n, _ in items], [int(s) for _, s in items]
  devices = list(jax.devices() if devices is None else devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got {dict(items)}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"mesh {dict(items)} does not divide the {len(devices)} devices")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices, there are {len(devices)}")
  if dcn_axis_sizes:
    from jax.experimental import mesh_utils
    dcn = [int(dcn_axis_sizes.get(n, 1)) for n in names]
    ici = [s // d for s, d in zip(sizes, dcn)]
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  else:
    grid = np.asarray(devices).reshape(sizes)
  return Mesh(grid, tuple(names), axis_types=(AxisType.Auto,) * len(names))


def rules_of(entries: Sequence[Sequence[Any]]) -> Rules:
  """Rules from a config's list of [logical, mesh axis or list of axes or None] pairs."""
  return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in entries)


def without_axis(rules: Rules, axis: str) -> Rules:
  """The rules with mesh axis `axis` removed (what it split is replicated over it): e.g. a decoding copy of the
  weights replicated over fsdp, so decode steps gather no weights."""
  def drop(mesh_axes):
    kept = tuple(a for a in ((mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes or ()) if a != axis)
    return kept[0] if len(kept) == 1 else (kept or None)
  return tuple((logical, drop(mesh_axes)) for logical, mesh_axes in rules)


_ACTIVE_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("safework_rules", default=DEFAULT_RULES)


@contextlib.contextmanager
def rules_in_effect(rules: Rules):
  """Makes `rules` the ones that code tracing without them in hand reads (`active_rules`): kernels wrapped in
  `shard_map` split their work as the rules split the activations they receive. Set it once around a run: jit's
  trace cache does not look at it, so a function traced under other rules keeps them."""
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    yield
  finally:
    _ACTIVE_RULES.reset(token)


def active_rules() -> Rules:
  """The rules of the innermost `rules_in_effect` (DEFAULT_RULES outside any)."""
  return _ACTIVE_RULES.get()


def mesh_axes(rules: Rules, logical: str) -> tuple[str, ...]:
  """The mesh axes `rules` map a logical dimension to (first rule wins; () for none)."""
  return _mesh_axes_for(rules).get(logical, ())


def _mesh_axes_for(rules: Rules) -> dict[str, tuple[str, ...]]:
  table = {}
  for logical, mesh_axes in rules:
    if logical not in table:   # first rule wins, as in flax
      table[logical] = () if mesh_axes is None else ((mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
  return table


def partition_spec(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules) -> PartitionSpec:
  """The PartitionSpec of an array with logical dimension names; indivisible dimensions stay replicated."""
  table, used, spec = _mesh_axes_for(rules), set(), []
  for size, name in zip(shape, names):
    axes = [a for a in table.get(name, ()) if a in mesh.shape and a not in used and mesh.shape[a] > 1]
    while axes and size % math.prod(mesh.shape[a] for a in axes):
      axes.pop()
    used.update(axes)
    spec.append(tuple(axes) if len(axes) > 1 else (axes[0] if axes else None))
  return PartitionSpec(*spec)


def logical_sharding(shape: Sequence[int], names: Sequence[str | None], mesh: Mesh, rules: Rules) -> NamedSharding:
  return NamedSharding(mesh, partition_spec(shape, names, mesh, rules))


def param_shardings(abstract_boxed: Any, mesh: Mesh, rules: Rules) -> Any:
  """Shardings (unboxed tree) for a tree of `nn.LogicallyPartitioned` abstract parameters."""
  def one(leaf):
    if isinstance(leaf, nn.LogicallyPartitioned):
      return logical_sharding(leaf.value.shape, leaf.names, mesh, rules)
    return NamedSharding(mesh, PartitionSpec())
  return jax.tree.map(one, abstract_boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_sharded(init_fn: Callable[[jax.Array], Any], rng: jax.Array, mesh: Mesh, rules: Rules) -> Any:
  """Runs `init_fn(rng)` (returning boxed parameters) so that every parameter is born in its sharding."""
  abstract = jax.eval_shape(init_fn, rng)
  shardings = param_shardings(abstract, mesh, rules)
  return jax.jit(lambda r: nn.meta.unbox(init_fn(r)), out_shardings=shardings)(rng)


def batch_sharding(mesh: Mesh, rules: Rules, rank: int, batch_size: int | None = None) -> NamedSharding:
  """Sharding of an array whose leading dimension is the batch and whose other dimensions are replicated."""
  shape = (batch_size or math.prod(mesh.shape.values()),) + (1,) * (rank - 1)
  return logical_sharding(shape, ("batch",) + (None,) * (rank - 1), mesh, rules)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
