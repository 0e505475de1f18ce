"""InternVL's dynamic high-resolution tiling in numpy + PIL, bit-compatible with the image processor that
transformers' `InternVLProcessor` uses (`GotOcr2ImageProcessorPil` with `crop_to_patches`), and its prompt
expansion.

An image is resized (PIL bicubic, uint8) to the grid of `cols x rows` tiles whose aspect ratio is closest to its own
among the grids of `min_tiles..max_tiles` tiles, cut into tiles of `tile_size` pixels (row-major), and followed by
a thumbnail (the whole image resized to one tile) when it gave more than one tile. Each tile is rescaled by 1/255
(fp64, then fp32) and normalised with the ImageNet mean and std (fp32): `pixel_values` [N, 3, S, S].

In the prompt, each image's `<IMG_CONTEXT>` becomes `<img>` + image_seq_length * tiles `<IMG_CONTEXT>` + `</img>`.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from safework.processing.image import ImageError, ImageLike, VisionSettings, load_image, resize_and_normalize, to_rgb

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
START_IMAGE, END_IMAGE, IMAGE_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"


@dataclasses.dataclass(frozen=True)
class TileSettings:
  """The InternVL3 processor's settings (its preprocessor_config.json plus the processor's crop_to_patches)."""
  tile_size: int = 448
  min_tiles: int = 1
  max_tiles: int = 12
  crop_to_patches: bool = True   # False (or max_tiles == 1): every image becomes one tile, resized to it
  mean: tuple[float, float, float] = IMAGENET_MEAN
  std: tuple[float, float, float] = IMAGENET_STD
  image_seq_length: int = 256    # prompt tokens per tile (the processor's; the model's tokens_per_tile)

  def validate(self) -> "TileSettings":
    if self.image_seq_length <= 0:
      raise ImageError(f"image_seq_length must be positive, got {self.image_seq_length}")
    if self.tile_size <= 0 or not 1 <= self.min_tiles <= self.max_tiles:
      raise ImageError(f"tile settings need tile_size > 0 and 1 <= min_tiles <= max_tiles, got tile_size="
                       f"{self.tile_size}, min_tiles={self.min_tiles}, max_tiles={self.max_tiles}")
    return self

  @property
  def tiling(self) -> bool:
    return self.crop_to_patches and self.max_tiles > 1

  @classmethod
  def from_preprocessor_config(cls, d: Mapping[str, Any], **defaults) -> "TileSettings":
    """Reads a GotOcr2 `preprocessor_config.json` (`size`, `min_patches`, `max_patches`, `image_mean`, ...); the
    processor's `image_seq_length` comes from `processor_config.json` (pass it in `defaults`)."""
    fields = dict(defaults)
    size = d.get("size") or {}
    if size:
      if size.get("height") != size.get("width"):
        raise ImageError(f"preprocessor size {size} is not square; InternVL tiles are square")
      fields["tile_size"] = int(size["height"])
    for ours, theirs in (("min_tiles", "min_patches"), ("max_tiles", "max_patches")):
      if theirs in d:
        fields[ours] = int(d[theirs])
    if "crop_to_patches" in d and "crop_to_patches" not in fields:
      fields["crop_to_patches"] = bool(d["crop_to_patches"])
    for ours, theirs in (("mean", "image_mean"), ("std", "image_std")):
      if theirs in d:
        fields[ours] = tuple(d[theirs])
    return cls(**fields).validate()

  def to_preprocessor_config(self) -> dict[str, Any]:
    """The `preprocessor_config.json` transformers' GotOcr2 image processor reads."""
    return {"image_processor_type": "GotOcr2ImageProcessor", "size": {"height": self.tile_size,
                                                                      "width": self.tile_size},
            "min_patches": self.min_tiles, "max_patches": self.max_tiles, "crop_to_patches": self.crop_to_patches,
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(self.mean),
            "image_std": list(self.std), "resample": 3}


def is_tiling_config(d: Mapping[str, Any]) -> bool:
  """Whether a `preprocessor_config.json` is InternVL's tiling one (GotOcr2's image processor)."""
  return str(d.get("image_processor_type", "")).startswith("GotOcr2")


@functools.lru_cache(maxsize=16)
def tile_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
  """Every (cols, rows) of min_tiles..max_tiles tiles, fewest tiles first (ties in cols-major order)."""
  grids = [(cols, rows) for cols in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)
           if min_tiles <= cols * rows <= max_tiles]
  return tuple(sorted(grids, key=lambda grid: grid[0] * grid[1]))


def choose_grid(height: int, width: int, settings: TileSettings = TileSettings()) -> tuple[int, int]:
  """(cols, rows) of the grid closest in aspect ratio to the image; a tie goes to the later (larger) grid while
  the image's area exceeds half of that grid's."""
  aspect, area, tile_area = width / height, width * height, settings.tile_size * settings.tile_size
  best, best_diff = (1, 1), float("inf")
  for cols, rows in tile_grids(settings.min_tiles, settings.max_tiles):
    diff = abs(aspect - cols / rows)
    if diff < best_diff:
      best, best_diff = (cols, rows), diff
    elif diff == best_diff and area > 0.5 * tile_area * cols * rows:
      best = (cols, rows)
  return best


def num_tiles(height: int, width: int, settings: TileSettings = TileSettings()) -> int:
  """Tiles an image of height x width pixels becomes (the thumbnail included)."""
  if not settings.tiling:
    return 1
  cols, rows = choose_grid(height, width, settings)
  return cols * rows + 1 if cols * rows > 1 else 1


def num_image_tokens(height: int, width: int, image_seq_length: int, settings: TileSettings = TileSettings()) -> int:
  """Prompt tokens an image takes once expanded: <img>, the placeholders of its tiles, </img>."""
  return 2 + image_seq_length * num_tiles(height, width, settings)


def preprocess_image(image: ImageLike, settings: TileSettings = TileSettings()) -> np.ndarray:
  """One image -> its tiles' pixel values [n, 3, S, S] (fp32), thumbnail last."""
  settings.validate()
  rgb = to_rgb(load_image(image))
  if min(rgb.height, rgb.width) <= 0:
    raise ImageError(f"image of {rgb.height}x{rgb.width} pixels is empty")
  size = settings.tile_size
  normalize = VisionSettings(mean=settings.mean, std=settings.std)
  if not settings.tiling:
    return resize_and_normalize(rgb, size, size, normalize)[None]
  cols, rows = choose_grid(rgb.height, rgb.width, settings)
  # Rescaling and normalising are per pixel, so cutting the tiles after them gives the processor's values.
  canvas = resize_and_normalize(rgb, rows * size, cols * size, normalize)                  # [3, rows*S, cols*S]
  tiles = canvas.reshape(3, rows, size, cols, size).transpose(1, 3, 0, 2, 4).reshape(rows * cols, 3, size, size)
  if rows * cols > 1:
    tiles = np.concatenate([tiles, resize_and_normalize(rgb, size, size, normalize)[None]])
  return np.ascontiguousarray(tiles)


def preprocess_images(images: Iterable[ImageLike], settings: TileSettings = TileSettings()
                      ) -> tuple[np.ndarray, list[int]]:
  """Images in prompt order -> (pixel_values [sum of tiles, 3, S, S], tiles per image)."""
  per_image = [preprocess_image(image, settings) for image in images]
  if not per_image:
    raise ImageError("no images given")
  return np.concatenate(per_image), [len(tiles) for tiles in per_image]


def image_prompt(tiles: int, image_seq_length: int) -> str:
  """The text that stands for one image of `tiles` tiles."""
  return START_IMAGE + IMAGE_CONTEXT * (image_seq_length * tiles) + END_IMAGE


def expand_image_placeholders(texts: str | Sequence[str], tiles_per_image: Sequence[int], image_seq_length: int
                              ) -> list[str]:
  """Replaces the i-th `<IMG_CONTEXT>` across the texts (in order) by `image_prompt(tiles_per_image[i])`, as
  `InternVLProcessor` does before tokenising."""
  texts = [texts] if isinstance(texts, str) else list(texts)
  found = sum(text.count(IMAGE_CONTEXT) for text in texts)
  if found != len(tiles_per_image):
    raise ImageError(f"the texts hold {found} {IMAGE_CONTEXT} placeholders but {len(tiles_per_image)} images were "
                     f"given; put one {IMAGE_CONTEXT} where each image goes")
  counts = iter(tiles_per_image)
  pattern = re.compile(re.escape(IMAGE_CONTEXT))
  return [pattern.sub(lambda _: image_prompt(next(counts), image_seq_length), text) for text in texts]
