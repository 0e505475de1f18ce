"""InternVL3: InternViT tiles, pixel-shuffled and projected, replace placeholder tokens in a Qwen2.5 decoder.

`InternVL` has the method interface of `Qwen25VL` (`encode_vision`, `embed`, `decode`, `output_embedding`,
`logits`, `__call__`), so the sampler and the losses drive either. The decoder is `models.text.TextDecoder`
unchanged: 1D RoPE is M-RoPE with `mrope_section=(head_dim // 2, 0, 0)` over three identical position rows.

Every tile (448x448 in InternVL3) is one independent sequence of a class token and its patches, so the vision
tower is a plain batched ViT over tiles: no layouts, no segments. Its layers are one `nn.scan` (parameters stacked
along "layers"), like the decoder's.

Axis legend: N tiles, P tokens per tile (class token + g*g patches), g patches per tile side, C vision hidden,
E vision heads, H head dim, F vision MLP width, s pixel-shuffle factor, K = s*s*C projector input, M tokens per
tile after the shuffle, D decoder hidden, V vocab, B batch, T time.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from safework.models.attention import blockwise_attention, dot_product_attention, grouped_query_attention
from safework.models.decoder_lm import DecoderLM
from safework.models.inputs import check_tiles
from safework.models.internvl_config import InternVisionConfig, InternVLConfig
from safework.models.internvl_keys import hf_tensor_map
from safework.models.layers import Dtype, Einsum, RMSNorm, logical_param
from safework.models.qwen2_5_vl import merge_features
from safework.models.remat import remat_module
from safework.models.splash import KERNEL_BLOCK, splash_attention

__all__ = ["ACTIVATIONS", "InternVL", "InternViT", "Projector", "bicubic_matrix", "dummy_inputs", "forward",
           "hf_tensor_map", "pixel_shuffle"]

ACTIVATIONS = {
    "gelu": functools.partial(nn.gelu, approximate=False),   # transformers' "gelu" is the exact (erf) one
    "gelu_new": functools.partial(nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(nn.gelu, approximate=True),
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),
    "relu": nn.relu,
    "silu": nn.silu,
}


class LayerNorm(nn.Module):
  """torch's LayerNorm (biased variance, affine), computed in fp32 and cast back."""
  features: int
  eps: float
  axis_name: str
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = logical_param(self, "scale", (self.features,), (self.axis_name,), nn.initializers.ones, self.param_dtype)
    bias = logical_param(self, "bias", (self.features,), (self.axis_name,), nn.initializers.zeros, self.param_dtype)
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    normed = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


class HeadsRMSNorm(nn.Module):
  """RMSNorm of x [..., E, H] over heads and head dim together: InternViT-6B's QK-norm spans the whole projection,
  not each head. The scale keeps the heads axis, so it shards like the projection."""
  heads: int
  head_dim: int
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = logical_param(self, "scale", (self.heads, self.head_dim), ("vision_heads", "head_dim"),
                          nn.initializers.ones, self.param_dtype)
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=(-2, -1), keepdims=True) + self.eps)
    return scale.astype(self.dtype) * normed.astype(x.dtype)


def vision_norm(cfg: InternVisionConfig, name: str, dtype: Dtype, param_dtype: Dtype) -> nn.Module:
  """A layer's pre-norm: LayerNorm or RMSNorm as the config says, both with `layer_norm_eps`."""
  norm = LayerNorm if cfg.norm_type == "layer_norm" else RMSNorm
  return norm(cfg.hidden_size, cfg.layer_norm_eps, "vision_embed", name=name, dtype=dtype, param_dtype=param_dtype)


def tile_attention(q: jax.Array, k: jax.Array, v: jax.Array, kind: str) -> jax.Array:
  """Bidirectional attention within each tile: q/k/v [N, P, E, H] -> [N, P, E, H], with the decoder's kernels.

  (transformers' eager InternViT keeps the softmax in the activation dtype; these kernels take it in fp32, which
  is equal in fp32 and a little more accurate in bf16.)
  """
  n, p = q.shape[:2]
  everywhere = jnp.ones((n, p), bool)
  if kind == "blockwise":
    return blockwise_attention(q, k, v, everywhere, causal=False)
  if kind == "splash" and p >= KERNEL_BLOCK:
    return splash_attention(q, k, v, everywhere, causal=False)
  if kind == "dot_product":
    return dot_product_attention(q, k, v, jnp.ones((1, p, p), bool))
  return grouped_query_attention(q, k, v, jnp.ones((1, p, p), bool))


class VisionLayer(nn.Module):
  """Pre-norm block with layer scale: x + lambda_1 * attn(norm(x)), then x + lambda_2 * mlp(norm(x))."""
  cfg: InternVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention: str = "einsum"

  @nn.compact
  def __call__(self, x: jax.Array, _) -> tuple[jax.Array, None]:
    """Layer on the scan's carry x [N, P, C]."""
    cfg, common = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c, e, h, f = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    bias = 2 if cfg.attention_bias else 0
    proj = dict(equation="npc,ceh->npeh", shape=(c, e, h), axes=("vision_embed", "vision_heads", "head_dim"),
                bias_rank=bias, **common)
    scale = lambda name: logical_param(self, name, (c,), ("vision_embed",),
                                       nn.initializers.constant(cfg.layer_scale_init_value), self.param_dtype)

    y = vision_norm(cfg, "norm_before", **common)(x)
    q, k, v = (Einsum(**proj, name=name)(y) for name in ("q_proj", "k_proj", "v_proj"))
    if cfg.use_qk_norm:
      q = HeadsRMSNorm(e, h, name="q_norm", **common)(q)
      k = HeadsRMSNorm(e, h, name="k_norm", **common)(k)
    attended = Einsum("npeh,ehc->npc", (e, h, c), ("vision_heads", "head_dim", "vision_embed"), bias_rank=1,
                      name="o_proj", **common)(tile_attention(q, k, v, self.attention))
    x = x + scale("lambda_1").astype(self.dtype) * attended
    y = vision_norm(cfg, "norm_after", **common)(x)
    y = Einsum("npc,cf->npf", (c, f), ("vision_embed", "vision_mlp"), bias_rank=1, name="fc1", **common)(y)
    y = Einsum("npf,fc->npc", (f, c), ("vision_mlp", "vision_embed"), bias_rank=1, name="fc2", **common)(
        ACTIVATIONS[cfg.hidden_act](y))
    return x + scale("lambda_2").astype(self.dtype) * y, None


def bicubic_matrix(out_size: int, in_size: int) -> np.ndarray:
  """[out, in] weights of torch's bicubic resampling along one axis (`align_corners=False`, A = -0.75, edges
  clamped), so a 2D resize is an einsum with one matrix per axis."""
  a = -0.75
  source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(source)
  t = source - base
  near = lambda x: ((a + 2) * x - (a + 3)) * x * x + 1              # taps at distance <= 1
  far = lambda x: ((a * x - 5 * a) * x + 8 * a) * x - 4 * a         # taps at distance in (1, 2)
  weights = np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=1)
  taps = np.clip(base[:, None] + np.arange(-1, 3), 0, in_size - 1).astype(np.int64)
  matrix = np.zeros((out_size, in_size))
  np.add.at(matrix, (np.repeat(np.arange(out_size), 4), taps.reshape(-1)), weights.reshape(-1))
  return matrix.astype(np.float32)


class InternViT(nn.Module):
  """Tiles [N, 3, S, S] -> final hidden states [N, P, C] (class token first)."""
  cfg: InternVisionConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention: str = "einsum"

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    cfg, common = self.cfg, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c, p = cfg.hidden_size, cfg.patch_size
    n, channels, height, width = pixel_values.shape
    g = height // p
    # The patch Conv2d (kernel == stride) is an einsum over each patch's (channel, row, column).
    patches = pixel_values.reshape(n, channels, g, p, g, p)
    x = Einsum("ncyhxw,chwd->nyxd", (channels, p, p, c), (None, None, None, "vision_embed"), bias_rank=1,
               name="patch_embed", **common)(patches).reshape(n, g * g, c)
    cls = logical_param(self, "cls_token", (1, 1, c), (None, None, "vision_embed"), nn.initializers.zeros,
                        self.param_dtype)
    positions = logical_param(self, "position_embeddings", (1, cfg.num_patches + 1, c), (None, None, "vision_embed"),
                              nn.initializers.zeros, self.param_dtype).astype(self.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(self.dtype), (n, 1, c)), x], axis=1)
    if g != cfg.grid_size:   # a tile of another size: bicubic-resize the patch positions as transformers does
      resize = jnp.asarray(bicubic_matrix(g, cfg.grid_size), self.dtype)
      grid = positions[0, 1:].reshape(cfg.grid_size, cfg.grid_size, c)
      patch_positions = jnp.einsum("yi,xj,ijc->yxc", resize, resize, grid).reshape(1, g * g, c)
      positions = jnp.concatenate([positions[:, :1], patch_positions], axis=1)
    x = x + positions

    layer = remat_module(VisionLayer, self.remat_policy, in_scan=True)
    layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True},
                     length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = layers(cfg, attention=self.attention, name="layers", **common)(x, None)
    if not cfg.use_mean_pooling:   # transformers' naming: without mean pooling the tower ends in a LayerNorm
      x = LayerNorm(c, cfg.layer_norm_eps, "vision_embed", name="final_norm", **common)(x)
    return x


def pixel_shuffle(x: jax.Array, s: int) -> jax.Array:
  """[N, g, g, C] -> [N, (g/s)^2, s*s*C]: token (i, j) concatenates patches (s*i + a, s*j + b) in (a, b) order,
  exactly transformers' view/permute sequence."""
  n, g, _, c = x.shape
  x = x.reshape(n, g // s, s, g // s, s, c)
  return jnp.einsum("niajbc->nijabc", x).reshape(n, (g // s)**2, s * s * c)


class Projector(nn.Module):
  """LayerNorm (torch's default eps 1e-5) over the shuffled K features, Linear, activation, Linear."""
  cfg: InternVLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    k, d = x.shape[-1], self.cfg.text.hidden_size
    x = LayerNorm(k, 1e-5, "vision_merge", name="layer_norm", **common)(x)
    x = Einsum("nmk,kd->nmd", (k, d), ("vision_merge", "vision_mlp"), bias_rank=1, name="linear_1", **common)(x)
    x = ACTIVATIONS[self.cfg.projector_hidden_act](x)
    return Einsum("nmf,fd->nmd", (d, d), ("vision_mlp", "embed"), bias_rank=1, name="linear_2", **common)(x)


class VisionEncoder(nn.Module):
  """Tiles [N, 3, S, S] -> features [N, M, D]: InternViT, pixel shuffle, projector. One subtree, `visual`, like
  Qwen2.5-VL's tower and merger, so that freezing the vision tower (`OptimSettings.freeze_prefixes`) covers it."""
  cfg: InternVLConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"
  attention: str = "einsum"

  @nn.compact
  def __call__(self, pixel_values: jax.Array) -> jax.Array:
    common = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    hidden = InternViT(self.cfg.vision, remat_policy=self.remat_policy, attention=self.attention, name="tower",
                       **common)(pixel_values)[:, 1:]   # the class token is dropped ("default" strategy)
    g = pixel_values.shape[-1] // self.cfg.vision.patch_size
    shuffled = pixel_shuffle(hidden.reshape(hidden.shape[0], g, g, -1), self.cfg.shuffle_factor)
    return Projector(self.cfg, name="projector", **common)(shuffled)


class InternVL(DecoderLM):
  config: InternVLConfig

  def setup(self):
    self.visual = VisionEncoder(self.config, remat_policy=self.remat_policy, attention=self.attention,
                                dtype=self.dtype, param_dtype=self.param_dtype)
    self.setup_decoder()

  def encode_vision(self, pixel_values: jax.Array, layout=None) -> jax.Array:
    """Features [N * M, D] of tiles [N, 3, S, S], tile by tile in order (what the placeholders expect).

    S may differ from the config's image_size (the position embeddings are then resized); tiles are square.
    """
    if layout is not None:
      raise TypeError("InternVL tiles need no vision layout; call encode_vision(pixel_values)")
    cfg = self.config
    p, s = cfg.vision.patch_size, cfg.shuffle_factor
    if pixel_values.ndim != 4 or pixel_values.shape[1] != cfg.vision.num_channels:
      raise ValueError(f"pixel_values must be [tiles, {cfg.vision.num_channels}, S, S], got {pixel_values.shape}")
    height, width = pixel_values.shape[2:]
    if height != width or height % (p * s):
      raise ValueError(f"tiles of {height}x{width} pixels: tiles must be square, with sides a multiple of "
                       f"patch_size * (1 / downsample_ratio) = {p * s}")
    features = self.visual(pixel_values)
    return features.reshape(-1, features.shape[-1])

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None,
            video_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, T, D] with image features in place of their placeholders."""
    if video_features is not None:
      raise ValueError("InternVL has no video placeholder: encode video frames as tiles with encode_vision and pass "
                       "them as image_features, in prompt order")
    embeds = self.token_embeddings(input_ids)
    if image_features is not None:
      embeds = merge_features(embeds, input_ids == self.config.image_token_id, image_features)
    return embeds

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, *, position_ids: jax.Array | None = None,
               return_hidden: bool = False, image_features: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (or final hidden states), like `InternVLForConditionalGeneration.forward`.

    Positions default to `text_positions(attention_mask)`, right for left padding (transformers counts padding
    slots unless given position_ids). `position_ids` may be [B, T] or [3, B, T].
    """
    if pixel_values is not None and image_features is None:
      if isinstance(input_ids, np.ndarray):
        check_tiles(self.config, input_ids, pixel_values.shape)
      image_features = self.encode_vision(pixel_values)
    t = input_ids.shape[1]
    if self.config.dynamic_rope_factor is not None and t > self.config.text.max_position_embeddings:
      raise NotImplementedError(
          f"{t} tokens run past max_position_embeddings={self.config.text.max_position_embeddings}, where "
          "transformers' dynamic rope scaling changes the frequencies; only plain RoPE below it is implemented")
    hidden = self.decode_1d(self.embed(input_ids, image_features), attention_mask, position_ids)
    return hidden if return_hidden else self.logits(hidden)


def dummy_inputs(cfg: InternVLConfig) -> dict[str, np.ndarray]:
  """The smallest call that touches every parameter: one tile and its placeholders."""
  size = cfg.vision.image_size
  return dict(input_ids=np.full((1, cfg.tokens_per_tile), cfg.image_token_id, np.int32),
              pixel_values=np.zeros((1, cfg.vision.num_channels, size, size), np.float32))


@functools.partial(jax.jit, static_argnames=("model", "return_hidden"))
def _jitted_apply(model, params, input_ids, attention_mask, pixel_values, position_ids, return_hidden):
  return model.apply({"params": params}, input_ids, attention_mask, pixel_values, position_ids=position_ids,
                     return_hidden=return_hidden)


def forward(model: InternVL, params, input_ids, attention_mask=None, pixel_values=None, position_ids=None,
            return_hidden: bool = False) -> jax.Array:
  """`model.apply` as one compiled call (cached per shape), after the host-side placeholder check."""
  if pixel_values is not None:
    check_tiles(model.config, input_ids, np.shape(pixel_values))
  return _jitted_apply(model, params, input_ids, attention_mask, pixel_values, position_ids, return_hidden)
