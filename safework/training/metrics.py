"""Training metrics to a JSONL file and TensorBoard (tensorboardX: no TensorFlow needed); process 0 writes.

`metrics.jsonl` holds one JSON object per optimizer step. A run killed mid-write leaves a partial last line:
reading skips it (with a warning) and a resumed run rewrites the file up to its checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Mapping

import numpy as np

from safework import distributed

log = logging.getLogger(__name__)
FILE = "metrics.jsonl"


class MetricsWriter:
  def __init__(self, workdir: str | Path, tensorboard: bool = True):
    self.path = Path(workdir) / FILE
    self.is_writer = distributed.is_main()
    self._tb = None
    if self.is_writer:
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
  """The rows of `metrics.jsonl`; a line that does not parse (a write cut short by a kill) is skipped."""
  path = Path(workdir) / FILE
  if not path.exists():
    return []
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), start=1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError:
      log.warning("%s:%d is not a complete JSON row (a write cut short?); it is skipped", path, number)
  return rows


def truncate_metrics(workdir: str | Path, step: int) -> None:
  """Keeps the rows up to `step` (a resumed run logs the later ones again) and drops unreadable lines."""
  path = Path(workdir) / FILE
  if path.exists() and distributed.is_main():
    path.write_text("".join(json.dumps(r) + "\n" for r in read_metrics(workdir) if r.get("step", 0) <= step))
