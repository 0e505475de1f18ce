"""Preprocessing in numpy: images (Qwen2.5-VL patches, InternVL tiles), videos, chat templates and tokenisation."""

from safework.processing.image import ImageError, VisionSettings, preprocess_image, smart_resize
from safework.processing.processor import Processor, PromptTooLongError, left_pad
from safework.processing.tokenizer import CHAT_TEMPLATE, train_tokenizer
from safework.processing.video import Video, preprocess_video

__all__ = ["CHAT_TEMPLATE", "ImageError", "Processor", "PromptTooLongError", "Video", "VisionSettings", "left_pad",
           "preprocess_image", "preprocess_video", "smart_resize", "train_tokenizer"]
