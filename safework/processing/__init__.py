"""Preprocessing in numpy: images, videos, chat templates and tokenisation for Qwen2.5-VL."""

from safework.processing.image import ImageError, VisionSettings, preprocess_image, smart_resize
from safework.processing.processor import Processor, PromptTooLongError, left_pad
from safework.processing.tokenizer import CHAT_TEMPLATE, train_tokenizer
from safework.processing.video import Video, preprocess_video

__all__ = ["CHAT_TEMPLATE", "ImageError", "Processor", "PromptTooLongError", "Video", "VisionSettings", "left_pad",
           "preprocess_image", "preprocess_video", "smart_resize", "train_tokenizer"]
