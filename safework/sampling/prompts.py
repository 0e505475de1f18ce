"""Prompts as the sampler and the trainers take them: the processor's arrays, left-padded to a fixed width.

Axis legend: P prompts, L the padded width.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from safework.data.example import Example
from safework.processing import Processor
from safework.sampling.shapes import bucket_length, pad_left

_VISION_FIELDS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


@dataclasses.dataclass
class PromptBatch:
  """The processor's arrays of P prompts, left-padded to the sampler's bucket length (or a given width)."""
  input_ids: np.ndarray                         # [P, L]
  attention_mask: np.ndarray                    # [P, L]
  pixel_values: np.ndarray | None = None        # [patches, C] of all images, prompt order
  image_grid_thw: np.ndarray | None = None      # [images, 3]
  pixel_values_videos: np.ndarray | None = None
  video_grid_thw: np.ndarray | None = None
  second_per_grid_ts: np.ndarray | None = None
  padding_images: int = 0                       # blank images appended (`models.inputs.pad_images`)

  @classmethod
  def of(cls, examples: Sequence[Example], processor: Processor, max_length: int, bucket_images: int,
         width: int | None = None) -> "PromptBatch":
    """The examples' chat prompts with their images and videos; `width` defaults to the bucket length."""
    arrays = processor([processor.render(e.messages()) for e in examples],
                       images=[i for e in examples for i in e.images], videos=[v for e in examples for v in e.videos],
                       max_length=max_length, bucket_images=bucket_images)
    ids, mask = pad_left(arrays["input_ids"], arrays["attention_mask"],
                         width or bucket_length(arrays["input_ids"].shape[1]), processor.tokenizer.pad_token_id)
    return cls(input_ids=ids, attention_mask=mask, padding_images=int(arrays.get("padding_images", 0)),
               **{k: arrays.get(k) for k in _VISION_FIELDS})

  def arrays(self) -> dict[str, Any]:
    """The processor's dict (what `Sampler.prefill` takes)."""
    out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "padding_images": self.padding_images}
    out.update({k: getattr(self, k) for k in _VISION_FIELDS if getattr(self, k) is not None})
    return out
