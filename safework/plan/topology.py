"""Accelerator slices by their usual names, and the per-chip numbers the planner measures programs against.

TPU names follow Cloud TPU: v4 and v5p count TensorCores (2 per chip: `v5p-16` is 8 chips), v5e and v6e count
chips (`v5e-256` is 256 chips). GPUs are named `h100-8`, `h200-8` (chips). Per chip, from the vendors' pages:
Cloud TPU system architecture (v4: 32 GiB HBM2, 1228 GB/s, 275 bf16 TFLOP/s; v5e: 16 GiB, 819 GB/s, 197;
v5p: 95 GiB, 2765 GB/s, 459; v6e: 32 GiB, 1640 GB/s, 918) and NVIDIA's data sheets (H100 SXM: 80 GB, 3.35 TB/s,
989 dense bf16 TFLOP/s; H200: 141 GB, 4.8 TB/s, 989).
"""

from __future__ import annotations

import dataclasses
import re

GiB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  hbm_bytes: int
  hbm_bandwidth: float     # bytes/s
  peak_flops: float        # dense bf16 FLOP/s
  cores_in_name: int       # how many of the name's count one chip is (2 for v4/v5p TensorCores)
  torus_rank: int          # 3 for v4/v5p slices, 2 for v5e/v6e; 0 for GPUs


CHIPS = {
    "v4": Chip("v4", 32 * GiB, 1228e9, 275e12, 2, 3),
    "v5e": Chip("v5e", 16 * GiB, 819e9, 197e12, 1, 2),
    "v5p": Chip("v5p", 95 * GiB, 2765e9, 459e12, 2, 3),
    "v6e": Chip("v6e", 32 * GiB, 1640e9, 918e12, 1, 2),
    "h100": Chip("h100", 80 * 10**9, 3350e9, 989e12, 1, 0),
    "h200": Chip("h200", 141 * 10**9, 4800e9, 989e12, 1, 0),
}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str            # as the user wrote it, e.g. "v5p-16"
  chip: Chip
  chips: int
  shape: tuple[int, ...]   # the slice's torus (TPU), () for GPUs

  @property
  def is_tpu(self) -> bool:
    return self.chip.torus_rank > 0

  @property
  def topology_name(self) -> str:
    """The name `jax.experimental.topologies.get_topology_desc` takes, e.g. "v5p:2x2x2"."""
    return f"{self.chip.name}:{'x'.join(map(str, self.shape))}"


def _torus(chips: int, rank: int) -> tuple[int, ...]:
  """The most cubic torus of `chips` chips (a power of two): 8 -> 2x2x2, 32 -> 2x4x4, 8 (2D) -> 2x4."""
  shape = [1] * rank
  for i in range(chips.bit_length() - 1):
    shape[(rank - 1 - i) % rank] *= 2
  if rank == 3 and chips >= 4 and shape[0] == 1:   # v4/v5p's smallest slice is 2x2x1
    shape = sorted(shape[1:]) + [1]
  return tuple(sorted(shape) if rank == 2 else shape)


def parse_topology(name: str) -> Topology:
  """`v5p-16`, `v5e-256`, `v4-32`, `v6e-8`, `h100-8`: a slice, or a ValueError saying what is accepted."""
  match = re.fullmatch(r"(v4|v5e|v5p|v6e|h100|h200)-(\d+)", name.strip().lower())
  if not match:
    raise ValueError(f"topology {name!r}: expected <chip>-<count> with chip one of {sorted(CHIPS)}, e.g. v5p-16 "
                     "(v4/v5p count TensorCores, 2 per chip), v5e-256, h100-8")
  chip, count = CHIPS[match.group(1)], int(match.group(2))
  if count % chip.cores_in_name or count < chip.cores_in_name:
    raise ValueError(f"topology {name!r}: {chip.name} slices count {chip.cores_in_name} per chip; use an even count")
  chips = count // chip.cores_in_name
  if chip.torus_rank and chips & (chips - 1):
    raise ValueError(f"topology {name!r}: {chips} chips; TPU slices have a power-of-two number of chips")
  shape = _torus(chips, chip.torus_rank) if chip.torus_rank else ()
  return Topology(name=name, chip=chip, chips=chips, shape=shape)
