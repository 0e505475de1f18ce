"""Rotary position embeddings: M-RoPE for the decoder (1D RoPE when its three position rows agree), 2D axial RoPE
for the vision tower, and Llama 3.1's frequency scaling.

Both use the half-split (NeoX) pairing: dimension i rotates with dimension i + H/2, and the cos/sin tables are
`concat(f, f)`. Frequencies are computed in fp32 with the same formula as transformers (the table agrees with
torch's to one ulp; torch's float32 `pow` is itself not correctly rounded).

Axis legend: B batch, T time, N heads, H head dim, P patches.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def inv_frequencies(theta: float, dim: int) -> np.ndarray:
  """`1 / theta^(2j/dim)` for j < dim/2 as transformers defines it, correctly rounded to fp32.

  The exponent `2j/dim` is rounded to fp32 first, as transformers does (it moves the result by several ulp);
  the power is then taken in fp64 and rounded once, because fp32 `pow` kernels are not correctly rounded and
  differ by an ulp or two across CPUs.
  """
  exponent = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
  return (1.0 / np.float64(theta) ** exponent).astype(np.float32)


def llama3_scaled(inv_freq: np.ndarray, scaling) -> np.ndarray:
  """Llama 3.1's long-context frequencies (a `config.Llama3RopeScaling`), in fp32 step by step as transformers
  computes them: wavelengths above `original / low_freq_factor` slow down by `factor`, those below
  `original / high_freq_factor` are kept, and the band between ramps smoothly from one to the other."""
  f32 = np.float32
  original = f32(scaling.original_max_position_embeddings)
  low_wavelength = original / f32(scaling.low_freq_factor)
  high_wavelength = original / f32(scaling.high_freq_factor)
  wavelength = f32(2 * np.pi) / inv_freq
  scaled = np.where(wavelength > low_wavelength, inv_freq / f32(scaling.factor), inv_freq)
  smooth = (original / wavelength - f32(scaling.low_freq_factor)) / (
      f32(scaling.high_freq_factor) - f32(scaling.low_freq_factor))
  smoothed = (f32(1) - smooth) * scaled / f32(scaling.factor) + smooth * scaled
  medium = ~(wavelength < high_wavelength) & ~(wavelength > low_wavelength)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def mrope_cos_sin(positions: jax.Array, theta: float, head_dim: int, mrope_section: Sequence[int],
                  dtype, scaling=None) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables [B, T, H] for M-RoPE from positions [3, B, T] (temporal, height, width).

  Frequency j takes its angle from one axis: contiguous chunks of `mrope_section` (t | h | w), not interleaved.
  The tables are computed in fp32 and cast to the activation dtype, as transformers does. `scaling`: a
  `config.Llama3RopeScaling`, or None.
  """
  inv_freq = inv_frequencies(theta, head_dim)
  inv_freq = jnp.asarray(inv_freq if scaling is None else llama3_scaled(inv_freq, scaling))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq           # [3, B, T, H/2]
  bounds = np.cumsum([0, *mrope_section])
  chosen = jnp.concatenate([freqs[axis, ..., bounds[axis]:bounds[axis + 1]] for axis in range(3)], axis=-1)
  angles = jnp.concatenate([chosen, chosen], axis=-1)                   # [B, T, H]
  return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def vision_cos_sin(patch_positions: jax.Array, theta: float, head_dim: int) -> tuple[jax.Array, jax.Array]:
  """fp32 cos/sin tables [P, H] for the vision tower from (row, column) patch positions [P, 2].

  The first quarter of each half rotates with the row id, the second quarter with the column id.
  """
  inv_freq = jnp.asarray(inv_frequencies(theta, head_dim // 2))         # [H/4]
  freqs = patch_positions.astype(jnp.float32)[..., None] * inv_freq     # [P, 2, H/4]
  half = freqs.reshape(freqs.shape[0], -1)                              # [P, H/2]: rows then columns
  angles = jnp.concatenate([half, half], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def rotate_half(x: jax.Array) -> jax.Array:
  half = x.shape[-1] // 2
  return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x [..., N, H] by tables [..., H] (broadcast over the heads axis N)."""
  cos, sin = cos[..., None, :], sin[..., None, :]
  return x * cos + rotate_half(x) * sin
