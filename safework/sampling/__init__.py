"""On-device sampling: jitted prefill and a while-loop decode over a caller-owned KV cache."""

from safework.sampling.prompts import PromptBatch
from safework.sampling.sampler import Prefix, SampleOutput, Sampler
from safework.sampling.shapes import bucket_length, pad_left
from safework.sampling.settings import SamplingSettings

__all__ = ["Prefix", "PromptBatch", "SampleOutput", "Sampler", "SamplingSettings", "bucket_length", "pad_left"]
