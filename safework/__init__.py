"""SafeWork-JAX: safety-oriented RL post-training of vision-language models (SafeLadder) in JAX."""

import glob
import importlib.util
import os

__version__ = "0.1.0"


def _skip_an_absent_tpu() -> None:
  """With libtpu installed for ahead-of-time compiles (the `plan` extra) on a machine without a TPU, JAX probes
  for one at start and prints TPU initialisation errors; there, JAX is told to use the GPU or CPU only. An explicit
  JAX_PLATFORMS, or a TPU VM (its /dev/accel* or /dev/vfio devices), is left alone."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  if glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*"):
    return
  cuda = any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (13, 12))
  os.environ["JAX_PLATFORMS"] = "cuda,cpu" if cuda else "cpu"


_skip_an_absent_tpu()
