"""The policy a run starts from: a Hugging Face checkpoint directory, or a preset initialised from scratch.

Either way the parameters are born sharded on the mesh and come with the processor (tokenizer + image settings)
that renders prompts for them. From scratch, the tokenizer is trained on the task's own corpus and saved in the
work directory, so every process and every resumption uses the same one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import transformers

from safework import sharding
from safework.models import Qwen25VL, from_pretrained, get_preset, init_params
from safework.models.checkpoint import abstract_params
from safework.processing import Processor, VisionSettings, train_tokenizer


@dataclasses.dataclass(frozen=True)
class PolicySettings:
  checkpoint: str | None = None   # a local Hugging Face checkpoint directory; None: initialise `preset`
  preset: str = "tiny"
  dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  seed: int = 0
  min_pixels: int = 56 * 56       # image budget of the processor for presets (checkpoints bring their own)
  max_pixels: int = 28 * 28 * 64

  def validate(self) -> "PolicySettings":
    if self.checkpoint is not None and not Path(self.checkpoint).is_dir():
      raise FileNotFoundError(f"policy checkpoint {self.checkpoint} is not a directory")
    return self


def load_policy(settings: PolicySettings, mesh: jax.sharding.Mesh, rules: sharding.Rules, workdir: str | Path,
                corpus: Sequence[str] = ()) -> tuple[Qwen25VL, dict, Processor]:
  dtype, param_dtype = jnp.dtype(settings.dtype), jnp.dtype(settings.param_dtype)
  if settings.checkpoint is not None:
    model, params = from_pretrained(
        settings.checkpoint, dtype=dtype, param_dtype=param_dtype, remat_policy=settings.remat,
        shardings=lambda m: sharding.param_shardings(abstract_params(m), mesh, rules))
    return model, params, Processor.from_pretrained(settings.checkpoint)
  cfg = get_preset(settings.preset)
  model = Qwen25VL(cfg, dtype=dtype, param_dtype=param_dtype, remat_policy=settings.remat)
  params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(settings.seed), mesh, rules)
  tokenizer_dir = Path(workdir) / "tokenizer"
  if (tokenizer_dir / "tokenizer.json").is_file():
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
  else:
    if not corpus:
      raise ValueError(f"preset {settings.preset!r} from scratch needs a corpus to train its tokenizer on")
    tokenizer = train_tokenizer(corpus, vocab_size=cfg.text.vocab_size)
    if jax.process_index() == 0:
      tokenizer.save_pretrained(tokenizer_dir)
  if len(tokenizer) > cfg.text.vocab_size:
    raise ValueError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocabulary "
                     f"{cfg.text.vocab_size}")
  image_settings = VisionSettings(min_pixels=settings.min_pixels, max_pixels=settings.max_pixels)
  return model, params, Processor(tokenizer, image_settings)
