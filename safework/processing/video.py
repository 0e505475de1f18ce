"""Video preprocessing in numpy + PIL: frame sampling, per-frame `smart_resize`, patchify over frame pairs.

Decoding video files is left to the caller (no torchvision here): a video is its frames [F, H, W, 3] uint8 and
the frame rate they were captured at. Frames are sampled uniformly at `fps` (qwen-vl-utils' default 2), the
count rounded to a multiple of the temporal patch; `second_per_grid_t = temporal_patch_size / fps`.
Resizing uses PIL's bicubic filter per frame (transformers' video processor uses torchvision, so pixels may
differ slightly from it; the layout and grid are identical).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import PIL.Image

from safework.processing.image import ImageError, VisionSettings, patchify, resize_and_normalize, smart_resize

VIDEO_SETTINGS = VisionSettings(min_pixels=128 * 28 * 28, max_pixels=768 * 28 * 28)


@dataclasses.dataclass(frozen=True)
class Video:
  """Decoded frames [F, H, W, 3] uint8 and the rate they were captured at."""
  frames: np.ndarray
  fps: float


def sample_frame_indices(total: int, video_fps: float, fps: float, temporal_patch: int, min_frames: int = 4,
                         max_frames: int = 768) -> np.ndarray:
  """Uniformly spaced frame indices at `fps` frames per second, a multiple of the temporal patch in count."""
  if total < 1:
    raise ImageError("the video has no frames")
  limit = max(temporal_patch, math.floor(min(max_frames, total) / temporal_patch) * temporal_patch)
  wanted = min(max(total / video_fps * fps, min_frames), limit, total)
  count = max(temporal_patch, math.floor(wanted / temporal_patch) * temporal_patch)
  return (np.arange(count) * (total / count)).astype(np.int64).clip(0, total - 1)


def preprocess_video(video: Video, settings: VisionSettings = VIDEO_SETTINGS, fps: float | None = 2.0
                     ) -> tuple[np.ndarray, tuple[int, int, int], float]:
  """A video -> (patches [t * gh * gw, 3 * 2 * 14 * 14], grid (t, gh, gw), second_per_grid_t).

  With `fps=None` every frame is kept and the frames are taken to be sampled at `video.fps`.
  """
  frames = np.asarray(video.frames)
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ImageError(f"video frames must be uint8 [F, H, W, 3], got {frames.dtype} {frames.shape}")
  if video.fps <= 0:
    raise ImageError(f"video fps must be positive, got {video.fps}")
  sampled_fps = video.fps
  if fps is not None:
    indices = sample_frame_indices(len(frames), video.fps, fps, settings.temporal_patch_size)
    sampled_fps = len(indices) * video.fps / len(frames)   # frames kept per second of video
    frames = frames[indices]
  height, width = smart_resize(frames.shape[1], frames.shape[2], settings.factor, settings.min_pixels,
                               settings.max_pixels)
  normalized = np.stack([resize_and_normalize(PIL.Image.fromarray(f), height, width, settings) for f in frames])
  patches, grid = patchify(normalized, settings)
  return patches, grid, settings.temporal_patch_size / sampled_fps
