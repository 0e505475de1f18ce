"""Preprocessing against transformers' Qwen2VLImageProcessorPil and Qwen2_5_VLProcessor."""

import io

import numpy as np
import PIL.Image
import pytest
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil
from transformers.processing_utils import ProcessorMixin

from safework.processing import (ImageError, Processor, PromptTooLongError, Video, VisionSettings, preprocess_image,
                                 preprocess_video, smart_resize, train_tokenizer)
from safework.processing.image import patchify

SETTINGS = VisionSettings(min_pixels=56 * 56, max_pixels=112 * 112)
RNG = np.random.default_rng(0)


def _image(h, w, mode="RGB"):
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  data = RNG.integers(0, 256, (h, w, channels), dtype=np.uint8)
  return PIL.Image.fromarray(data[..., 0] if channels == 1 else data, mode)


@pytest.mark.parametrize("h,w,mode", [(60, 90, "RGB"), (33, 77, "RGB"), (131, 29, "RGBA"), (17, 19, "L"),
                                      (400, 301, "RGB"), (29, 1000, "RGB")])
def test_images_match_transformers_bit_for_bit(h, w, mode):
  image = _image(h, w, mode)
  expected = Qwen2VLImageProcessorPil(size={"shortest_edge": SETTINGS.min_pixels, "longest_edge": SETTINGS.max_pixels})(
      images=[image])
  patches, grid = preprocess_image(image, SETTINGS)
  np.testing.assert_array_equal(grid, expected["image_grid_thw"][0])
  np.testing.assert_array_equal(patches, np.asarray(expected["pixel_values"]))


def test_smart_resize_bounds():
  assert smart_resize(60, 90) == (56, 84)
  h, w = smart_resize(4000, 3000, max_pixels=112 * 112)
  assert h % 28 == w % 28 == 0 and h * w <= 112 * 112
  h, w = smart_resize(10, 12, min_pixels=56 * 56)
  assert h * w >= 56 * 56
  with pytest.raises(ImageError, match="aspect ratio"):
    smart_resize(10, 2100)


def test_patch_layout_is_merge_block_major_with_channel_time_rows():
  frames = RNG.standard_normal((4, 3, 56, 28)).astype(np.float32)   # 4 frames -> 2 temporal patches
  patches, grid = patchify(frames, SETTINGS)
  assert grid == (2, 4, 2)
  # Patch k of temporal slice t: merge block (by, bx), in-block (dy, dx), laid out as (C, T, 14, 14).
  for k, (t, by, bx, dy, dx) in enumerate(np.ndindex(2, 2, 1, 2, 2)):
    r, c = 2 * by + dy, 2 * bx + dx
    block = frames[2 * t:2 * t + 2, :, 14 * r:14 * r + 14, 14 * c:14 * c + 14].transpose(1, 0, 2, 3)
    np.testing.assert_array_equal(patches[k], block.reshape(-1))


def test_still_video_equals_image_and_odd_frame_counts_pad():
  frame = np.asarray(_image(70, 50))
  image_patches, image_grid = preprocess_image(frame, SETTINGS)
  video_patches, video_grid, seconds = preprocess_video(Video(np.stack([frame] * 3), fps=2.0), SETTINGS, fps=None)
  assert video_grid == (2, *image_grid[1:]) and seconds == 1.0
  n = image_patches.shape[0]
  np.testing.assert_array_equal(video_patches[:n], image_patches)
  np.testing.assert_array_equal(video_patches[n:], image_patches)   # the third frame is repeated to pair up


def test_video_frame_sampling_sets_seconds_per_grid():
  frames = RNG.integers(0, 256, (40, 56, 56, 3), dtype=np.uint8)   # 4 s at 10 fps
  _, grid, seconds = preprocess_video(Video(frames, fps=10.0), SETTINGS, fps=2.0)
  assert grid[0] == 4 and seconds == pytest.approx(1.0)   # 8 frames kept at 2 fps, 2 frames per grid step


@pytest.fixture(scope="module")
def tokenizer():
  corpus = ["describe the picture please", "a cat sits on a mat", "what colour is the square?"] * 10
  return train_tokenizer(corpus, vocab_size=300)


class _ImageOnlyProcessor(Qwen2_5_VLProcessor):
  """transformers' processor without its video processor (which needs torchvision)."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
    self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
    self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
    self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
    ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


def test_processor_matches_transformers(tokenizer):
  messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture"},
                                           {"type": "image"}]}]
  images = [_image(60, 90), _image(100, 45)]
  ours = Processor(tokenizer, SETTINGS)
  text = ours.render(messages)
  assert text.endswith("<|im_start|>assistant\n") and text.count("<|image_pad|>") == 2
  theirs = _ImageOnlyProcessor(Qwen2VLImageProcessorPil(size={"shortest_edge": SETTINGS.min_pixels,
                                                             "longest_edge": SETTINGS.max_pixels}), tokenizer,
                               chat_template=tokenizer.chat_template)
  expected = theirs(text=[text, "short <|image_pad|>"], images=images + [_image(30, 30)], padding=True,
                    padding_side="left", return_tensors="np")
  out = ours([text, "short <|image_pad|>"], images=images + [_image(30, 30)])
  np.testing.assert_array_equal(out["input_ids"], expected["input_ids"])
  np.testing.assert_array_equal(out["attention_mask"], expected["attention_mask"])
  np.testing.assert_array_equal(out["image_grid_thw"], expected["image_grid_thw"])
  assert out["attention_mask"][1, 0] == 0   # padded on the left


def test_processor_round_trips_through_a_directory(tokenizer, tmp_path):
  tokenizer.save_pretrained(tmp_path)
  (tmp_path / "preprocessor_config.json").write_text('{"min_pixels": 3136, "max_pixels": 12544}')
  loaded = Processor.from_pretrained(tmp_path)
  assert loaded.image_settings == SETTINGS
  assert loaded("a cat")["input_ids"].tolist() == Processor(tokenizer)("a cat")["input_ids"].tolist()


def test_processor_errors(tokenizer, tmp_path):
  processor = Processor(tokenizer, SETTINGS)
  with pytest.raises(ValueError, match="1 image placeholders .* 2 images were given"):
    processor("<|image_pad|>", images=[_image(30, 30), _image(30, 30)])
  with pytest.raises(PromptTooLongError, match="prompt 0 has .* tokens"):
    processor("<|image_pad|> describe the picture", images=[_image(112, 112)], max_length=10)
  corrupt = tmp_path / "corrupt.png"
  buffer = io.BytesIO()
  _image(40, 40).save(buffer, format="PNG")
  corrupt.write_bytes(buffer.getvalue()[:60])
  with pytest.raises(ImageError, match="corrupt or truncated"):
    processor("<|image_pad|>", images=[corrupt])
  with pytest.raises(ImageError, match="does not exist"):
    processor("<|image_pad|>", images=[tmp_path / "missing.png"])
  with pytest.raises(ImageError, match="uint8"):
    processor("<|image_pad|>", images=[np.zeros((30, 30, 3), np.float32)])
