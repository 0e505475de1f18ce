"""On-device sampling: jitted prefill and a while-loop decode over a caller-owned KV cache."""

from safework.sampling.sampler import Prefix, SampleOutput, Sampler, bucket_length
from safework.sampling.settings import SamplingSettings

__all__ = ["Prefix", "SampleOutput", "Sampler", "SamplingSettings", "bucket_length"]
