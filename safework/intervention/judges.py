"""The verifiers that guide a step search from the command line: `KIND:CHECKPOINT`, a saved verifier (its own head
and prompt, e.g. the tiny SafeLadder's judges) or a Hugging Face judge asked the paper's KIND prompt through its
verdict head."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp

from safework.verifiers.judges import JUDGES
from safework.verifiers.model_verifier import ModelVerifier


def parse_guides(texts: Sequence[str]) -> dict[str, str]:
  """['safety:/ckpt', ...] -> {kind: checkpoint}, checked before anything is loaded."""
  guides = {}
  for text in texts:
    kind, _, checkpoint = text.partition(":")
    if not kind or not checkpoint:
      raise ValueError(f"--judge {text!r}: give KIND:CHECKPOINT (e.g. safety:/ckpt/judge)")
    if kind in guides:
      raise ValueError(f"--judge names {kind!r} twice")
    path = Path(checkpoint)
    if not path.is_dir():
      raise FileNotFoundError(f"--judge {text!r}: {checkpoint} is not a directory")
    if not (path / "verifier.json").is_file() and kind not in JUDGES:
      raise ValueError(f"--judge {text!r}: {checkpoint} is a plain checkpoint, asked a judge prompt of the paper: "
                       f"KIND must be one of {sorted(JUDGES)} (or give a saved verifier)")
    guides[kind] = checkpoint
  return guides


def load_guides(guides: dict[str, str], mesh: jax.sharding.Mesh | None = None, dtype=jnp.float32,
                batch_size: int = 64) -> dict[str, ModelVerifier]:
  """Each guide's verifier, scoring `batch_size` rows per jitted call."""
  from safework.models import from_pretrained
  from safework.processing import Processor
  from safework.verifiers.train import load_verifier
  out = {}
  for kind, checkpoint in guides.items():
    if (Path(checkpoint) / "verifier.json").is_file():
      out[kind] = load_verifier(checkpoint, mesh=mesh, dtype=dtype, batch_size=batch_size)
    else:
      model, params = from_pretrained(checkpoint, dtype=dtype)
      out[kind] = ModelVerifier(model, params, Processor.from_pretrained(checkpoint), JUDGES[kind], mesh=mesh,
                                batch_size=batch_size)
  return out
