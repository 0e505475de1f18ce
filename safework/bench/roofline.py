"""Measured ceilings of the device the benchmark runs on: memory bandwidth and matmul rate.

Benchmarks report their times as fractions of what these ceilings allow (bytes moved / bandwidth, FLOPs /
matmul rate), so a number means the same on a CPU, a GPU and a TPU.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp


def best_time(fn: Callable[[], object], repeats: int = 5) -> float:
  """Fastest wall time of `fn()` (blocking on its result) over `repeats` runs, after one warm-up run."""
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


@dataclasses.dataclass(frozen=True)
class Ceilings:
  bandwidth: float     # bytes/s, counting bytes read plus bytes written
  matmul_rate: float   # FLOP/s of a large square matmul in the benchmark's dtype
  device: str

  def memory_time(self, nbytes: float) -> float:
    return nbytes / self.bandwidth

  def compute_time(self, flops: float) -> float:
    return flops / self.matmul_rate


def measure(dtype=jnp.bfloat16) -> Ceilings:
  device = jax.devices()[0]
  on_cpu = device.platform == "cpu"
  n_bytes = (64 if on_cpu else 1024) << 20
  x = jnp.ones((n_bytes // 4,), jnp.float32)
  copy = jax.jit(lambda a: a * 1.0001)
  bandwidth = 2 * n_bytes / best_time(lambda: copy(x))
  n = 1024 if on_cpu else 8192
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda p, q: p @ q)
  rate = 2 * n**3 / best_time(lambda: matmul(a, a))
  return Ceilings(bandwidth=bandwidth, matmul_rate=rate, device=f"{device.platform}:{device.device_kind}")
