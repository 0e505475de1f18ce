"""Training metrics to a JSONL file and TensorBoard (tensorboardX: no TensorFlow needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Mapping

import jax
import numpy as np


class MetricsWriter:
  def __init__(self, workdir: str | Path, tensorboard: bool = True, is_writer: bool = True):
    self.path = Path(workdir) / "metrics.jsonl"
    self.is_writer = is_writer
    self._tb = None
    if is_writer:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if tensorboard:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.is_writer:
      return
    clean = {k: _scalar(v) for k, v in metrics.items()}
    with self.path.open("a") as f:
      f.write(json.dumps({"step": int(step), **clean}) + "\n")
    if self._tb is not None:
      for key, value in clean.items():
        if value is not None:
          self._tb.add_scalar(key, value, int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _scalar(value) -> float | None:
  value = float(np.asarray(value))
  return value if math.isfinite(value) else None


def read_metrics(workdir: str | Path) -> list[dict]:
  path = Path(workdir) / "metrics.jsonl"
  return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def truncate_metrics(workdir: str | Path, step: int) -> None:
  """Drops the JSONL rows logged after `step` (a resumed run logs them again); process 0 writes the file."""
  path = Path(workdir) / "metrics.jsonl"
  if path.exists() and jax.process_index() == 0:
    path.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(workdir) if r["step"] <= step))
