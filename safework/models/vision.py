"""The Qwen2.5-VL vision tower: patch embedding, window/full attention blocks, patch merger.

Images and videos of any sizes are concatenated along patches; `VisionLayout` (host-side numpy) carries the
window permutation and the attention segments, so the tower itself is a static-shape function of
`(pixel_values [P, C*T*14*14], layout)` and returns merged-token features [M, D] in the processor's order. The
blocks are one `nn.scan` (parameters stacked along "layers"); each layer's flag selects window or full attention.

Axis legend: P patches, M merged tokens, C vision hidden, N heads, H head dim, F MLP width, D decoder hidden.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from safework.models import rope
from safework.models.attention import segment_attention
from safework.models.config import VisionConfig
from safework.models.layers import Dtype, Einsum, GatedMLP, RMSNorm
from safework.models.remat import remat_module
from safework.models.vision_layout import SegmentBlocks, VisionLayout


class VisionBlock(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, full_attention: jax.Array, cos: jax.Array, sin: jax.Array,
               windows: SegmentBlocks, frames: SegmentBlocks) -> tuple[jax.Array, None]:
    """Block on the scan's carry x [P, C]; `full_attention` (this layer's flag) picks whole frames over windows."""
    c, n, h = self.cfg.hidden_size, self.cfg.num_heads, self.cfg.head_dim
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: RMSNorm(c, self.cfg.rms_norm_eps, "vision_embed", name=name, **common)

    qkv = Einsum("pc,cinh->pinh", (c, 3, n, h), ("vision_embed", None, "vision_heads", "head_dim"), bias_rank=3,
                 name="qkv", **common)(norm("norm1")(x))
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    # The vision tower rotates in fp32 (unlike the decoder) and casts back.
    q = rope.apply_rope(q.astype(jnp.float32), cos, sin).astype(q.dtype)
    k = rope.apply_rope(k.astype(jnp.float32), cos, sin).astype(k.dtype)
    attended = jax.lax.cond(full_attention, lambda: segment_attention(q, k, v, frames, self.attention),
                            lambda: segment_attention(q, k, v, windows, self.attention))
    x = x + Einsum("pnh,nhc->pc", (n, h, c), ("vision_heads", "head_dim", "vision_embed"), bias_rank=1,
                   name="proj", **common)(attended)
    mlp = GatedMLP(c, self.cfg.intermediate_size, use_bias=True, embed_axis="vision_embed", mlp_axis="vision_mlp",
                   name="mlp", **common)
    return x + mlp(norm("norm2")(x)), None


class PatchMerger(nn.Module):
  """RMSNorm per patch, concatenate each 2x2 merge block, then MLP with exact (erf) GELU."""
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c, out = self.cfg.hidden_size, self.cfg.out_hidden_size
    wide = c * self.cfg.merge_unit
    x = RMSNorm(c, self.cfg.rms_norm_eps, "vision_embed", name="ln_q", **common)(x).reshape(-1, wide)
    x = Einsum("mk,kf->mf", (wide, wide), ("vision_merge", "vision_mlp"), bias_rank=1, name="fc1", **common)(x)
    x = nn.gelu(x, approximate=False)
    return Einsum("mf,fd->md", (wide, out), ("vision_mlp", "embed"), bias_rank=1, name="fc2", **common)(x)


class VisionTower(nn.Module):
  cfg: VisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention: str = "einsum"

  @nn.compact
  def __call__(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    """pixel_values [P, C*T*14*14] -> merged-token features [M, D], in processor order."""
    cfg, common = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if pixel_values.shape != (layout.window_order.shape[0], cfg.patch_dim):
      raise ValueError(f"pixel values have shape {pixel_values.shape}, but the grids describe "
                       f"{layout.window_order.shape[0]} patches of {cfg.patch_dim} values")
    # Conv3d with kernel == stride is exactly a matmul on the flattened (C, T, 14, 14) patch.
    x = Einsum("pk,kc->pc", (cfg.patch_dim, cfg.hidden_size), (None, "vision_embed"), name="patch_embed",
               **common)(pixel_values)
    x = x[jnp.asarray(layout.window_order)]
    cos, sin = rope.vision_cos_sin(jnp.asarray(layout.positions), cfg.rope_theta, cfg.head_dim)
    block = remat_module(VisionBlock, self.remat_policy, in_scan=True)
    blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.depth,
                     in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                     metadata_params={nn.PARTITION_NAME: "layers"})
    full_attention = np.isin(np.arange(cfg.depth), cfg.fullatt_block_indexes)
    x, _ = blocks(cfg, name="blocks", attention=self.attention, **common)(
        x, jnp.asarray(full_attention), cos, sin, layout.windows, layout.frames)
    merged = PatchMerger(cfg, name="merger", **common)(x)
    return merged[jnp.asarray(layout.merged_restore)]
