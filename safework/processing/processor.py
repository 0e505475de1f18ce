"""Text + images + videos -> model arrays: chat template, placeholder expansion, tokenisation, left padding.

Two image formats, as the checkpoint's `preprocessor_config.json` says. Qwen2.5-VL's patches (`VisionSettings`):
each `<|image_pad|>` (`<|video_pad|>`) in a text stands for one image (video), taken in order across the batch,
and is expanded to `t * h * w / merge^2` copies, the merged patches the vision tower produces for it. InternVL's
tiles (`TileSettings`): each `<IMG_CONTEXT>` stands for one image and becomes `<img>`, `image_seq_length`
placeholders per tile, `</img>`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import transformers

from safework.models.inputs import pad_images
from safework.processing import internvl_images
from safework.processing.image import ImageLike, VisionSettings, preprocess_image, smart_resize
from safework.processing.internvl_images import TileSettings
from safework.processing.tokenizer import CHAT_TEMPLATE, TILE_CHAT_TEMPLATE
from safework.processing.video import VIDEO_SETTINGS, Video, preprocess_video

IMAGE_TOKEN, VIDEO_TOKEN = "<|image_pad|>", "<|video_pad|>"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")


class PromptTooLongError(ValueError):
  """A prompt longer than the allowed number of tokens."""


class Processor:
  """Turns chat messages, images and videos into the arrays the models take (`models.prepare_inputs` checks them)."""

  def __init__(self, tokenizer: transformers.PreTrainedTokenizerBase,
               image_settings: VisionSettings | TileSettings = VisionSettings(),
               video_settings: VisionSettings = VIDEO_SETTINGS, video_fps: float | None = 2.0):
    self.tokenizer = tokenizer
    self.image_settings = image_settings
    self.video_settings = video_settings
    self.video_fps = video_fps
    if tokenizer.pad_token_id is None:
      raise ValueError("the tokenizer has no pad token; set one (Qwen uses <|endoftext|>)")

  @classmethod
  def from_pretrained(cls, path: str | Path, **kwargs) -> "Processor":
    """Tokenizer and preprocessing settings from a local checkpoint directory (no remote code, no hub)."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
      raise FileNotFoundError(f"{path} has no tokenizer files (one of {list(TOKENIZER_FILES)}); copy them from the "
                              "checkpoint it was trained from (save_pretrained(..., assets_from=...) does)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    image_settings, video_settings = VisionSettings(), VIDEO_SETTINGS
    if (path / "preprocessor_config.json").is_file():
      config = json.loads((path / "preprocessor_config.json").read_text())
      if internvl_images.is_tiling_config(config):
        processor = path / "processor_config.json"
        extra = json.loads(processor.read_text()) if processor.is_file() else {}
        # InternVLProcessor crops to tiles whatever the image processor's own crop_to_patches says.
        image_settings = TileSettings.from_preprocessor_config(
            config, crop_to_patches=True, **{k: extra[k] for k in ("image_seq_length",) if k in extra})
      else:
        image_settings = VisionSettings.from_preprocessor_config(config)
    if (path / "video_preprocessor_config.json").is_file():
      video_settings = VisionSettings.from_preprocessor_config(
          json.loads((path / "video_preprocessor_config.json").read_text()),
          min_pixels=VIDEO_SETTINGS.min_pixels, max_pixels=VIDEO_SETTINGS.max_pixels)
    return cls(tokenizer, image_settings, video_settings, **kwargs)

  def save_pretrained(self, path: str | Path) -> None:
    """The tokenizer files and a `preprocessor_config.json` with this processor's pixel budget (for tiles, also the
    `processor_config.json` with the tokens per tile)."""
    self.tokenizer.save_pretrained(str(path))
    settings = self.image_settings
    if isinstance(settings, TileSettings):
      (Path(path) / "preprocessor_config.json").write_text(json.dumps(settings.to_preprocessor_config(), indent=2))
      (Path(path) / "processor_config.json").write_text(json.dumps(
          {"processor_class": "InternVLProcessor", "image_seq_length": settings.image_seq_length}, indent=2))
      return
    config = {"min_pixels": settings.min_pixels, "max_pixels": settings.max_pixels, "patch_size": settings.patch_size,
              "temporal_patch_size": settings.temporal_patch_size, "merge_size": settings.merge_size,
              "image_mean": list(settings.mean), "image_std": list(settings.std)}
    (Path(path) / "preprocessor_config.json").write_text(json.dumps(config, indent=2))

  def render(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The chat template applied to messages (the checkpoint's own template, else Qwen2-VL's, with InternVL's image
    placeholder for tiles)."""
    fallback = TILE_CHAT_TEMPLATE if isinstance(self.image_settings, TileSettings) else CHAT_TEMPLATE
    template = None if self.tokenizer.chat_template else fallback
    return self.tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)

  def _expand(self, texts: list[str], token: str, counts: list[int], what: str) -> list[str]:
    found = sum(t.count(token) for t in texts)
    if found != len(counts):
      raise ValueError(f"the texts hold {found} {what} placeholders ({token}) but {len(counts)} {what}s were given")
    counts_iter, out = iter(counts), []
    for text in texts:
      pieces = text.split(token)
      out.append(pieces[0] + "".join(token * next(counts_iter) + piece for piece in pieces[1:]))
    return out

  def __call__(self, texts: str | Sequence[str], images: Sequence[ImageLike] | None = None,
               videos: Sequence[Video] | None = None, max_length: int | None = None,
               bucket_images: int = 0) -> dict[str, np.ndarray]:
    """Left-padded `input_ids`/`attention_mask` [B, T] and the vision arrays (absent when unused).

    `images`/`videos` are flat lists, in the order their placeholders appear across the texts. With
    `bucket_images` > 0, a blank image pads the total patch count to one of that many sizes per octave
    (`padding_images` says whether), so jitted code sees few shapes.
    """
    texts = [texts] if isinstance(texts, str) else list(texts)
    out: dict[str, np.ndarray] = {}
    if isinstance(self.image_settings, TileSettings):
      if videos:
        raise ValueError("an InternVL processor reads images, not videos")
      texts = self._tiles(texts, images or (), out)
    else:
      texts = self._patches(texts, images or (), videos or (), bucket_images, out)
    rows = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    if max_length is not None:
      for i, row in enumerate(rows):
        if len(row) > max_length:
          raise PromptTooLongError(f"prompt {i} has {len(row)} tokens (images and videos expanded), more than "
                                   f"max_length={max_length}; shorten it, lower the image max_pixels, or raise "
                                   "the limit")
    out["input_ids"], out["attention_mask"] = left_pad(rows, self.tokenizer.pad_token_id)
    return out

  def _patches(self, texts: list[str], images: Sequence[ImageLike], videos: Sequence[Video], bucket_images: int,
               out: dict[str, np.ndarray]) -> list[str]:
    """Qwen2.5-VL's patches and grids into `out`; returns the texts with their placeholders expanded."""
    unit = self.image_settings.merge_size**2
    image_patches = [preprocess_image(im, self.image_settings) for im in images]
    texts = self._expand(texts, IMAGE_TOKEN, [int(np.prod(g)) // unit for _, g in image_patches], "image")
    if image_patches:
      out["pixel_values"] = np.concatenate([p for p, _ in image_patches])
      out["image_grid_thw"] = np.array([g for _, g in image_patches], np.int64)
      if bucket_images:
        padded, padding = pad_images(out, self.image_settings.merge_size, bucket_images)
        out.update(padded)
        if padding:
          out["padding_images"] = np.array(padding)
    video_patches = [preprocess_video(v, self.video_settings, self.video_fps) for v in videos]
    texts = self._expand(texts, VIDEO_TOKEN, [int(np.prod(g)) // unit for _, g, _ in video_patches], "video")
    if video_patches:
      out["pixel_values_videos"] = np.concatenate([p for p, _, _ in video_patches])
      out["video_grid_thw"] = np.array([g for _, g, _ in video_patches], np.int64)
      out["second_per_grid_ts"] = np.array([s for _, _, s in video_patches], np.float32)
    return texts

  def _tiles(self, texts: list[str], images: Sequence[ImageLike], out: dict[str, np.ndarray]) -> list[str]:
    """InternVL's tiles into `out`; returns the texts with their placeholders expanded."""
    tiles = []
    if images:
      out["pixel_values"], tiles = internvl_images.preprocess_images(images, self.image_settings)
    return internvl_images.expand_image_placeholders(texts, tiles, self.image_settings.image_seq_length)

  def count_tokens(self, text: str, image_sizes: Sequence[tuple[int, int]] = ()) -> int:
    """Tokens of a rendered prompt whose image placeholders stand for images of these (height, width) sizes,
    without reading any pixels (the check of a dataset's prompt lengths)."""
    settings = self.image_settings
    if isinstance(settings, TileSettings):
      tiles = [internvl_images.num_tiles(h, w, settings) for h, w in image_sizes]
      text = internvl_images.expand_image_placeholders([text], tiles, settings.image_seq_length)[0]
      return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
    counts = [h * w // settings.factor**2 for h, w in
              (smart_resize(h, w, settings.factor, settings.min_pixels, settings.max_pixels) for h, w in image_sizes)]
    text = self._expand([text], IMAGE_TOKEN, counts, "image")[0]
    return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
    return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Rows of token ids -> left-padded ids and attention mask, [B, length] int32 (length defaults to the longest)."""
  length = length or max(len(r) for r in rows)
  ids = np.full((len(rows), length), pad_id, np.int32)
  mask = np.zeros((len(rows), length), np.int32)
  for i, row in enumerate(rows):
    if row:
      ids[i, length - len(row):] = row
      mask[i, length - len(row):] = 1
  return ids, mask
