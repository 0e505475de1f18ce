"""Qwen2-VL image preprocessing in numpy + PIL, bit-compatible with `transformers`' `Qwen2VLImageProcessorPil`.

An image becomes `grid_h * grid_w` flattened patches of (C, T, 14, 14) values in merge-block-major order, with
the still image repeated along T. Steps: convert to RGB (alpha composited on white), `smart_resize` to multiples
of 28 within the pixel budget, bicubic resize in PIL (uint8), rescale by 1/255 (fp64, then fp32), normalise with
the CLIP mean and std (fp32), patchify.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import PIL.Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ImageLike = Union[PIL.Image.Image, np.ndarray, str, Path, bytes]


class ImageError(ValueError):
  """An image that cannot be read or cannot be turned into patches."""


@dataclasses.dataclass(frozen=True)
class VisionSettings:
  """Preprocessing settings of images (or, with other pixel bounds, of video frames)."""
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  patch_size: int = 14
  temporal_patch_size: int = 2
  merge_size: int = 2
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge_size

  @classmethod
  def from_preprocessor_config(cls, d: Mapping[str, Any], **defaults) -> "VisionSettings":
    """Reads a `preprocessor_config.json` (old `min_pixels`/`max_pixels` or new `size` keys)."""
    size = d.get("size") or {}
    fields = dict(defaults)
    for ours, keys in (("min_pixels", ("min_pixels", "shortest_edge")), ("max_pixels", ("max_pixels", "longest_edge"))):
      for key in keys:
        value = d.get(key, size.get(key))
        if value is not None:
          fields[ours] = int(value)
          break
    for key in ("patch_size", "temporal_patch_size", "merge_size"):
      if key in d:
        fields[key] = int(d[key])
    if "image_mean" in d:
      fields["mean"] = tuple(d["image_mean"])
    if "image_std" in d:
      fields["std"] = tuple(d["image_std"])
    return cls(**fields)


def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 28 * 28 * 1280) -> tuple[int, int]:
  """Target size: both sides multiples of `factor`, area within [min_pixels, max_pixels], aspect kept."""
  if min(height, width) <= 0:
    raise ImageError(f"image of {height}x{width} pixels is empty")
  if max(height, width) / min(height, width) > 200:
    raise ImageError(f"image of {height}x{width} pixels has an aspect ratio above 200; crop or pad it first")
  h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
  if h_bar * w_bar > max_pixels:
    beta = math.sqrt(height * width / max_pixels)
    h_bar = max(factor, math.floor(height / beta / factor) * factor)
    w_bar = max(factor, math.floor(width / beta / factor) * factor)
  elif h_bar * w_bar < min_pixels:
    beta = math.sqrt(min_pixels / (height * width))
    h_bar = math.ceil(height * beta / factor) * factor
    w_bar = math.ceil(width * beta / factor) * factor
  return h_bar, w_bar


def load_image(image: ImageLike) -> PIL.Image.Image:
  """A PIL image from a path, encoded bytes, a uint8 [H, W, C] array or a PIL image; clear errors otherwise."""
  if isinstance(image, PIL.Image.Image):
    return image
  if isinstance(image, np.ndarray):
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ImageError(f"an image array must be uint8 [H, W] or [H, W, C], got {image.dtype} {image.shape}")
    return PIL.Image.fromarray(image)
  source = image if isinstance(image, bytes) else Path(image)
  try:
    pil = PIL.Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    pil.load()
    return pil
  except FileNotFoundError:
    raise ImageError(f"image file {source} does not exist") from None
  except (PIL.UnidentifiedImageError, OSError, SyntaxError) as e:
    name = "image bytes" if isinstance(source, bytes) else f"image file {source}"
    raise ImageError(f"{name} cannot be decoded ({e}); is it a corrupt or truncated image?") from e


def to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
  """RGB, with any transparency composited onto white (as transformers does)."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    rgba = image.convert("RGBA")
    return PIL.Image.alpha_composite(PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
  return image.convert("RGB")


def resize_and_normalize(image: PIL.Image.Image, height: int, width: int, settings: VisionSettings) -> np.ndarray:
  """Bicubic resize to (height, width), rescale and normalise -> fp32 [C, H, W]."""
  resized = np.asarray(image.resize((width, height), resample=PIL.Image.BICUBIC))
  scaled = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
  mean, std = np.asarray(settings.mean, np.float32), np.asarray(settings.std, np.float32)
  return np.moveaxis((scaled - mean) / std, -1, 0)


def patchify(frames: np.ndarray, settings: VisionSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
  """frames [F, C, H, W] -> patches [t * gh * gw, C * T * P * P] and the grid (t, gh, gw).

  F is padded to a multiple of the temporal patch by repeating the last frame; a still image is passed as
  one frame and repeated.
  """
  p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
  pad = -frames.shape[0] % tp
  if pad:
    frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
  f, c, h, w = frames.shape
  if h % (p * m) or w % (p * m):
    raise ImageError(f"frames of {h}x{w} pixels are not multiples of patch_size * merge_size = {p * m}; "
                     "an image smaller than one merged patch cannot be encoded")
  gt, gh, gw = f // tp, h // p, w // p
  x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)   # (gt, by, bx, dy, dx, C, T, py, px)
  return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), dtype=np.float32), (gt, gh, gw)


def preprocess_image(image: ImageLike, settings: VisionSettings = VisionSettings()
                     ) -> tuple[np.ndarray, tuple[int, int, int]]:
  """One image -> (patches [gh * gw, 3 * 2 * 14 * 14], grid (1, gh, gw))."""
  rgb = to_rgb(load_image(image))
  height, width = smart_resize(rgb.height, rgb.width, settings.factor, settings.min_pixels, settings.max_pixels)
  return patchify(resize_and_normalize(rgb, height, width, settings)[None], settings)
