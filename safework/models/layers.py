"""Small building blocks shared by the vision tower and the decoder.

Every parameter is created through `logical_param`, so it carries logical axis names ("embed", "heads", ...)
that the mesh rules in `safework.sharding` map onto device axes. Parameters are stored in `param_dtype` and
cast to the compute `dtype` at use.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.normal(stddev=0.02)


def logical_param(module: nn.Module, name: str, shape: Sequence[int], axes: Sequence[str | None],
                  init: Initializer, dtype: Dtype) -> jax.Array:
  """Declares a parameter whose dimensions carry logical axis names."""
  if len(shape) != len(axes):
    raise ValueError(f"parameter {name}: shape {tuple(shape)} and axes {tuple(axes)} differ in rank")
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
  """RMSNorm in Hugging Face's order: normalise in fp32, cast back, then scale (no `1 + w`)."""
  features: int
  eps: float = 1e-6
  axis_name: str = "embed"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = logical_param(self, "scale", (self.features,), (self.axis_name,), nn.initializers.ones,
                          self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(x.dtype)


class Einsum(nn.Module):
  """A projection written as an einsum over a kernel of explicit shape, with an optional bias.

  `equation` contracts the input with the kernel, e.g. "btd,dnh->btnh" for a query projection; the bias has the
  trailing `bias_rank` dimensions of the kernel.
  """
  equation: str
  shape: tuple[int, ...]
  axes: tuple[str | None, ...]
  bias_rank: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = default_kernel_init

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = logical_param(self, "kernel", self.shape, self.axes, self.kernel_init, self.param_dtype)
    y = jnp.einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.bias_rank:
      bias = logical_param(self, "bias", self.shape[-self.bias_rank:], self.axes[-self.bias_rank:],
                           nn.initializers.zeros, self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class GatedMLP(nn.Module):
  """SwiGLU: down(silu(gate(x)) * up(x)); with biases in the vision tower, without in the decoder."""
  features: int
  hidden: int
  use_bias: bool
  embed_axis: str = "embed"
  mlp_axis: str = "mlp"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    bias_rank = 1 if self.use_bias else 0
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype, bias_rank=bias_rank)
    into = dict(equation="...d,df->...f", shape=(self.features, self.hidden), axes=(self.embed_axis, self.mlp_axis))
    gate = Einsum(**into, **common, name="gate")(x)
    up = Einsum(**into, **common, name="up")(x)
    return Einsum("...f,fd->...d", (self.hidden, self.features), (self.mlp_axis, self.embed_axis), **common,
                  name="down")(nn.silu(gate) * up)
