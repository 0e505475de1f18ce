"""The policy a run starts from: a Hugging Face checkpoint directory, or a preset initialised from scratch.

The processor (tokenizer + image settings) comes first and cheaply, so that data can be checked against it before
any weights are read; the parameters are then born sharded on the mesh. From scratch, the tokenizer is trained on
the task's own corpus and saved in the work directory, so every process and every resumption uses the same one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import transformers

from safework import distributed, sharding
from safework.models import CausalLM, build_model, get_preset, init_params
from safework.models.checkpoint import abstract_params, load_config, load_params
from safework.models.internvl_config import InternVLConfig
from safework.models.presets import INTERNVL_TINY_EXTRA_TOKENS
from safework.models.text import ATTENTION
from safework.processing import Processor, VisionSettings, train_tokenizer
from safework.processing.internvl_images import TileSettings
from safework.processing.tokenizer import CHAT_TEMPLATE, TILE_CHAT_TEMPLATE


@dataclasses.dataclass(frozen=True)
class PolicySettings:
  checkpoint: str | None = None   # a local Hugging Face checkpoint directory; None: initialise `preset`
  preset: str = "tiny"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  attention: str = "einsum"       # the reference; splash on TPU, dot_product (cuDNN) on GPU, blockwise (flash in
                                  # plain JAX) anywhere; see models.text.attend
  min_pixels: int = 56 * 56       # image budget of the processor for presets (checkpoints bring their own)
  max_pixels: int = 28 * 28 * 64

  def validate(self) -> "PolicySettings":
    if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
      raise FileNotFoundError(f"policy checkpoint {self.checkpoint} is not a directory")
    for name in ("dtype", "param_dtype"):
      try:
        jnp.dtype(getattr(self, name))
      except TypeError:
        raise ValueError(f"{name}={getattr(self, name)!r} is not a dtype (float32, bfloat16, ...)") from None
    if self.attention not in ATTENTION:
      raise ValueError(f"attention={self.attention!r}: choose one of {ATTENTION}")
    if self.checkpoint is None:
      get_preset(self.preset)
    return self


def load_processor(settings: PolicySettings, workdir: str | Path, corpus: Sequence[str] = ()) -> Processor:
  """The policy's processor; for a preset from scratch, the tokenizer trained on `corpus` (once per workdir)."""
  if settings.checkpoint is not None:
    return Processor.from_pretrained(settings.checkpoint)
  config = get_preset(settings.preset)
  vocab_size = config.text.vocab_size
  image_settings, extra_tokens, template = _preset_images(config, settings)
  tokenizer_dir = Path(workdir) / "tokenizer"
  if (tokenizer_dir / "tokenizer.json").is_file():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
  else:
    if not corpus:
      raise ValueError(f"preset {settings.preset!r} from scratch needs a corpus to train its tokenizer on; start "
                       "from a checkpoint (init=...) to use its tokenizer")
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size, extra_tokens=extra_tokens, chat_template=template)
    if distributed.is_main():
      tokenizer.save_pretrained(tokenizer_dir)
  if len(tokenizer) > vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary {vocab_size}")
  return Processor(tokenizer, image_settings)


def _preset_images(config, settings: PolicySettings) -> tuple[VisionSettings | TileSettings, tuple[str, ...], str]:
  """A preset's image settings within the pixel budget, the special tokens its tokenizer adds after the tiny ones
  (InternVL's image tokens, at the ids its preset names), and its chat template."""
  if isinstance(config, InternVLConfig):
    side = config.vision.image_size
    tiles = TileSettings(tile_size=side, max_tiles=max(1, settings.max_pixels // side**2),
                         image_seq_length=config.tokens_per_tile)
    return tiles, INTERNVL_TINY_EXTRA_TOKENS, TILE_CHAT_TEMPLATE
  return VisionSettings(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels), (), CHAT_TEMPLATE


def policy_config(settings: PolicySettings):
  """The policy's architecture: the checkpoint's config.json, or the preset."""
  return load_config(settings.checkpoint) if settings.checkpoint is not None else get_preset(settings.preset)


def policy_model(settings: PolicySettings) -> CausalLM:
  """The policy's model definition; no weights are read."""
  return build_model(policy_config(settings), dtype=jnp.dtype(settings.dtype),
                     param_dtype=jnp.dtype(settings.param_dtype),
                     remat_policy=settings.remat, attention=settings.attention)


def policy_params(settings: PolicySettings, model: CausalLM, mesh: jax.sharding.Mesh, rules: sharding.Rules,
                  seed: int = 0) -> dict:
  """The parameters, born sharded: read from the checkpoint, or initialised from `seed`."""
  if settings.checkpoint is not None:
    return load_params(settings.checkpoint, model, sharding.param_shardings(abstract_params(model), mesh, rules))
  return sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(seed), mesh, rules)
