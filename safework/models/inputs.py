"""Host-side preparation of a model call: positions and vision layouts, validated against the prompt.

`prepare_inputs` runs in numpy on concrete arrays. Outside `jit`, the model calls it itself; a jitted caller runs
it once on the host and passes the result (a pytree of arrays) into the jitted function. It dispatches on the
model's config type, so callers never ask which family they hold.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safework.models.config import ModelConfig
from safework.models.internvl_config import InternVLConfig
from safework.models.text_lm_config import TextLMConfig
from safework.models.rope_index import get_rope_index
from safework.models.vision_layout import VisionLayout, num_patches, patch_bucket, validate_grid, vision_layout
from safework.models.vision_shards import ShardAxes, ShardedLayout, shard_layout


@flax.struct.dataclass
class PreparedInputs:
  """positions [3, B, T] and rope_deltas [B] of the prompt; the vision layouts of its images and videos."""
  positions: np.ndarray
  rope_deltas: np.ndarray
  image_layout: VisionLayout | ShardedLayout | None = None
  video_layout: VisionLayout | ShardedLayout | None = None


def _concrete(x, name: str) -> np.ndarray | None:
  if x is None:
    return None
  try:
    return np.asarray(x)
  except Exception as e:   # a tracer: this is data-dependent index arithmetic that must run on the host
    raise TypeError(
        f"{name} must be a concrete array: the vision layout and M-RoPE positions are computed on the host. "
        "Under jax.jit, call safework.models.prepare_inputs(...) outside jit and pass its result as "
        "`prepared=`.") from e


def _check_placeholders(cfg: ModelConfig, input_ids: np.ndarray, token: int, grid: np.ndarray | None,
                        pixels, name: str, padding: int = 0) -> None:
  count = int((input_ids == token).sum())
  used = None if grid is None else grid[:len(grid) - padding]
  merged = 0 if used is None or not len(used) else num_patches(used) // cfg.vision.merge_unit
  if count != merged:
    raise ValueError(f"the prompt has {count} {name} placeholder tokens (id {token}) but the {name} grids give "
                     f"{merged} merged patches; expand each {name} placeholder with the processor "
                     "(safework.processing.Processor) so the counts agree")
  if grid is not None and pixels is not None:
    rows = np.shape(pixels)[0]
    if rows != num_patches(grid):
      raise ValueError(f"{name} pixel values have {rows} patch rows but the grids {grid.tolist()} describe "
                       f"{num_patches(grid)} patches")


def text_positions(attention_mask) -> jax.Array:
  """1D positions [3, B, T] (three equal rows: 1D RoPE as M-RoPE) of a mask [B, T]: each token's index among its
  row's valid tokens, as `generate` numbers a left-padded batch (left pads get 0); traceable under jit."""
  rows = jnp.maximum(jnp.cumsum(jnp.asarray(attention_mask, jnp.int32), axis=-1) - 1, 0)
  return jnp.broadcast_to(rows[None], (3, *rows.shape))


def _prepared_1d(ids: np.ndarray, mask: np.ndarray | None) -> PreparedInputs:
  """1D positions (host arrays) over the unpadded tokens; 1D RoPE needs no rope deltas."""
  positions = np.asarray(text_positions(np.ones(ids.shape, bool) if mask is None else mask))
  return PreparedInputs(positions=positions, rope_deltas=np.zeros(ids.shape[0], np.int32))


def _ids_and_mask(input_ids, attention_mask) -> tuple[np.ndarray, np.ndarray | None]:
  ids = _concrete(input_ids, "input_ids")
  if ids.ndim != 2:
    raise ValueError(f"input_ids must have shape [batch, length], got {ids.shape}")
  mask = _concrete(attention_mask, "attention_mask")
  if mask is not None and mask.shape != ids.shape:
    raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}")
  return ids, mask


@functools.singledispatch
def prepare_inputs(cfg, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                   second_per_grid_ts=None, pixel_values=None, pixel_values_videos=None,
                   padding_images: int = 0, vision_shards: ShardAxes | None = None) -> PreparedInputs:
  """Positions, rope deltas and vision layouts for one batch of the model of config `cfg`."""
  raise TypeError(f"no input preparation for a {type(cfg).__name__}; a model family registers one")


@prepare_inputs.register
def _text_only(cfg: TextLMConfig, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
               second_per_grid_ts=None, pixel_values=None, pixel_values_videos=None,
               padding_images: int = 0, vision_shards: ShardAxes | None = None) -> PreparedInputs:
  """1D positions over the unpadded tokens; a text-only model takes no images or videos."""
  ids, mask = _ids_and_mask(input_ids, attention_mask)
  if any(x is not None for x in (image_grid_thw, video_grid_thw, pixel_values, pixel_values_videos)):
    raise ValueError(f"the policy is a text-only {cfg.model_type} model: it cannot read images or videos; drop them "
                     "from the data, or start from a vision-language checkpoint")
  return _prepared_1d(ids, mask)


def check_tiles(cfg: InternVLConfig, input_ids, pixel_shape: tuple[int, ...] | None) -> None:
  """The prompt holds one placeholder per token its tiles [N, 3, S, S] encode to (transformers raises too)."""
  tiles, side = (0, 0) if pixel_shape is None else (pixel_shape[0], pixel_shape[-1])
  per_tile = (side // (cfg.vision.patch_size * cfg.shuffle_factor))**2
  found = int((np.asarray(input_ids) == cfg.image_token_id).sum())
  if found != tiles * per_tile:
    raise ValueError(f"input_ids hold {found} image placeholders (id {cfg.image_token_id}) but the {tiles} tiles "
                     f"encode to {tiles * per_tile} tokens ({per_tile} per tile); expand each image's placeholder "
                     "with processing.internvl_images.expand_image_placeholders")


@prepare_inputs.register
def _internvl(cfg: InternVLConfig, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
              second_per_grid_ts=None, pixel_values=None, pixel_values_videos=None,
              padding_images: int = 0, vision_shards: ShardAxes | None = None) -> PreparedInputs:
  """1D positions; InternVL's images are tiles [N, 3, S, S], each encoded on its own (no layout)."""
  ids, mask = _ids_and_mask(input_ids, attention_mask)
  if any(x is not None for x in (image_grid_thw, video_grid_thw, pixel_values_videos)) or padding_images:
    raise ValueError("InternVL reads images as tiles (pixel_values [tiles, 3, S, S], no grids, no videos): "
                     "prepare them with safework.processing.internvl_images")
  check_tiles(cfg, ids, None if pixel_values is None else np.shape(pixel_values))
  return _prepared_1d(ids, mask)


@prepare_inputs.register
def _qwen2_5_vl(cfg: ModelConfig, input_ids, attention_mask=None, image_grid_thw=None, video_grid_thw=None,
                second_per_grid_ts=None, pixel_values=None, pixel_values_videos=None,
                padding_images: int = 0, vision_shards: ShardAxes | None = None) -> PreparedInputs:
  """Positions, rope deltas and vision layouts for one batch, checked against the placeholders.

  The last `padding_images` images are padding (see `pad_images`): encoded, but matched to no placeholder. With
  `vision_shards` the layouts deal the images to that many shards (`models.encode_vision` then encodes them
  data-parallel; see `models.vision_shards`).
  """
  ids, mask = _ids_and_mask(input_ids, attention_mask)
  merge = cfg.vision.spatial_merge_size
  image_grid = _concrete(image_grid_thw, "image_grid_thw")
  image_grid = None if image_grid is None else validate_grid(image_grid, merge, "image_grid_thw")
  video_grid = _concrete(video_grid_thw, "video_grid_thw")
  video_grid = None if video_grid is None else validate_grid(video_grid, merge, "video_grid_thw")
  if (pixel_values is None) != (image_grid is None):
    raise ValueError("pixel_values and image_grid_thw must be given together")
  if (pixel_values_videos is None) != (video_grid is None):
    raise ValueError("pixel_values_videos and video_grid_thw must be given together")
  _check_placeholders(cfg, ids, cfg.image_token_id, image_grid, pixel_values, "image", padding_images)
  _check_placeholders(cfg, ids, cfg.video_token_id, video_grid, pixel_values_videos, "video")
  seconds = _concrete(second_per_grid_ts, "second_per_grid_ts")
  if seconds is not None and (video_grid is None or len(seconds) != len(video_grid)):
    raise ValueError(f"second_per_grid_ts needs one value per video: got {np.shape(seconds)} for "
                     f"{0 if video_grid is None else len(video_grid)} videos")
  positions, deltas = get_rope_index(
      ids, mask, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
      spatial_merge_size=merge, tokens_per_second=cfg.vision.tokens_per_second,
      image_grid_thw=None if image_grid is None else image_grid[:len(image_grid) - padding_images],
      video_grid_thw=video_grid, second_per_grid_ts=seconds)
  return PreparedInputs(
      positions=positions, rope_deltas=deltas,
      image_layout=None if image_grid is None else _layout(image_grid, cfg, "image_grid_thw", padding_images,
                                                           vision_shards),
      video_layout=None if video_grid is None else _layout(video_grid, cfg, "video_grid_thw", 0, vision_shards))


def _layout(grid: np.ndarray, cfg: ModelConfig, what: str, padding_items: int, shards: ShardAxes | None
            ) -> VisionLayout | ShardedLayout:
  if shards is not None:
    return shard_layout(grid, cfg.vision, shards, what, padding_items)
  return vision_layout(grid, cfg.vision, what, padding_items)


def filler_grid(patches: int, merge: int, per_octave: int) -> np.ndarray | None:
  """The grid [1, 3] of the blank image (merge patches high) that pads `patches` to a `patch_bucket` of
  `per_octave` sizes per octave; None when `patches` is one already."""
  missing = patch_bucket(patches, merge * merge, per_octave) - patches
  return np.array([[1, merge, missing // merge]], np.int64) if missing else None


def pad_images(arrays: dict[str, np.ndarray], merge: int, per_octave: int) -> tuple[dict[str, np.ndarray], int]:
  """Appends one blank image (`filler_grid`) so that the total patch count is one of `per_octave` sizes per
  octave.

  With the layout's bucketed tables, a batch of images of any sizes then comes in few shapes, so the jitted vision
  and training programs compile a few times rather than once per rollout. Returns the padded arrays and the number
  of padding images, 0 or 1 (for `prepare_inputs`).
  """
  grid = arrays.get("image_grid_thw")
  filler = None if grid is None else filler_grid(len(arrays["pixel_values"]), merge, per_octave)
  if filler is None:
    return arrays, 0
  pixels = arrays["pixel_values"]
  blank = np.zeros((num_patches(filler), pixels.shape[1]), pixels.dtype)
  return dict(arrays, pixel_values=np.concatenate([pixels, blank]),
              image_grid_thw=np.concatenate([grid, filler.astype(np.asarray(grid).dtype)])), 1
