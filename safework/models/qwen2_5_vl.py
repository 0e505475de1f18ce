"""Qwen2.5-VL: vision tower features replace placeholder tokens in the Qwen2 decoder's input embeddings.

`Qwen25VL.__call__` mirrors the `transformers` forward (same arrays in, logits [B, T, V] out). The pieces it
composes are methods of their own (`encode_vision`, `embed`, `decode`, `logits`) so that the sampler and the RL
loss can run prefill, cached decoding and chunked log-probs without ever materialising what they do not need.

Axis legend: B batch, T time, D hidden, V vocab, M merged vision tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from safework.models.config import ModelConfig
from safework.models.decoder_lm import DecoderLM
from safework.models.inputs import PreparedInputs, prepare_inputs
from safework.models.vision import VisionTower
from safework.models.vision_layout import VisionLayout
from safework.models.vision_shards import ShardedLayout, encode_sharded


def merge_features(embeds: jax.Array, is_placeholder: jax.Array, features: jax.Array) -> jax.Array:
  """Replaces placeholder rows of embeds [B, T, D] by features [M, D], in row-major (batch, time) order."""
  b, t, d = embeds.shape
  index = jnp.cumsum(is_placeholder.reshape(-1)) - 1
  gathered = features[jnp.clip(index, 0, features.shape[0] - 1)].reshape(b, t, d)
  return jnp.where(is_placeholder[..., None], gathered.astype(embeds.dtype), embeds)


class Qwen25VL(DecoderLM):
  config: ModelConfig

  def setup(self):
    self.visual = VisionTower(self.config.vision, remat_policy=self.remat_policy, attention=self.attention,
                              dtype=self.dtype, param_dtype=self.param_dtype)
    self.setup_decoder()

  def encode_vision(self, pixel_values: jax.Array, layout: VisionLayout) -> jax.Array:
    """Merged-token features [M, D] of the images (or videos) in `layout`."""
    if isinstance(layout, ShardedLayout):
      raise TypeError("a layout dealt to shards encodes through safework.models.encode_vision(model, params, ...), "
                      "which runs the tower once per shard")
    return self.visual(pixel_values, layout)

  def embed(self, input_ids: jax.Array, image_features: jax.Array | None = None,
            video_features: jax.Array | None = None) -> jax.Array:
    """Token embeddings [B, T, D] with image and video features in place of their placeholders."""
    embeds = self.token_embeddings(input_ids)
    if image_features is not None:
      embeds = merge_features(embeds, input_ids == self.config.image_token_id, image_features)
    if video_features is not None:
      embeds = merge_features(embeds, input_ids == self.config.video_token_id, video_features)
    return embeds

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               pixel_values: jax.Array | None = None, image_grid_thw=None,
               pixel_values_videos: jax.Array | None = None, video_grid_thw=None, second_per_grid_ts=None, *,
               prepared: PreparedInputs | None = None, position_ids: jax.Array | None = None,
               return_hidden: bool = False, image_features: jax.Array | None = None,
               video_features: jax.Array | None = None) -> jax.Array:
    """Logits [B, T, V] (or final hidden states), like `Qwen2_5_VLForConditionalGeneration.forward`.

    Positions default to `get_rope_index` over the unpadded tokens. Outside `jit` the host-side inputs are
    prepared here; under `jit`, pass `prepared=prepare_inputs(...)` computed on the host. Features already
    encoded (`encode_vision`, e.g. data-parallel over shards) replace the pixels.
    """
    if prepared is None:
      prepared = prepare_inputs(self.config, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                                second_per_grid_ts, pixel_values, pixel_values_videos)
    if pixel_values is not None and image_features is None:
      image_features = self.encode_vision(pixel_values, prepared.image_layout)
    if pixel_values_videos is not None and video_features is None:
      video_features = self.encode_vision(pixel_values_videos, prepared.video_layout)
    embeds = self.embed(input_ids, image_features, video_features)
    b, t = input_ids.shape
    key_valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask
    positions = prepared.positions if position_ids is None else position_ids
    hidden, _ = self.decode(embeds, positions, key_valid)
    return hidden if return_hidden else self.logits(hidden)


def encode_vision(model, params, pixel_values: jax.Array, layout: VisionLayout | ShardedLayout | None
                  ) -> jax.Array:
  """Features [M, D] of the images (or videos) of any family's `layout` (InternVL's tiles need none); a
  `ShardedLayout`'s shards encode data-parallel."""
  encode = lambda p, pixels, one_layout: model.apply({"params": p}, pixels, one_layout, method="encode_vision")
  if isinstance(layout, ShardedLayout):
    return encode_sharded(encode, params, pixel_values, layout)
  return encode(params, pixel_values, layout)


def dummy_inputs(cfg: ModelConfig) -> dict[str, np.ndarray]:
  """The smallest call that touches every parameter: one image of a single merged patch and its placeholder."""
  merge = cfg.vision.spatial_merge_size
  grid = np.array([[1, merge, merge]])
  return dict(input_ids=np.array([[cfg.image_token_id]], np.int32),
              pixel_values=np.zeros((merge * merge, cfg.vision.patch_dim), np.float32), image_grid_thw=grid)


@functools.partial(jax.jit, static_argnames=("model", "return_hidden"))
def _jitted_apply(model, params, input_ids, attention_mask, pixel_values, pixel_values_videos, prepared,
                  return_hidden):
  return model.apply({"params": params}, input_ids, attention_mask, pixel_values,
                     pixel_values_videos=pixel_values_videos, prepared=prepared, return_hidden=return_hidden)


def forward(model: Qwen25VL, params, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
            pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
            return_hidden: bool = False) -> jax.Array:
  """`model.apply` as one compiled call: host-side inputs prepared here, the rest jitted (cached per shape)."""
  prepared = prepare_inputs(model.config, input_ids, attention_mask, image_grid_thw, video_grid_thw,
                            second_per_grid_ts, pixel_values, pixel_values_videos)
  return _jitted_apply(model, params, input_ids, attention_mask, pixel_values, pixel_values_videos, prepared,
                       return_hidden)
