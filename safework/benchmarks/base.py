"""What every benchmark reader shares: the item, the judgement, the interface, and strict file readers.

Benchmarks are read in their own published formats (CSV, JSON, JSONL beside image folders). A reader checks every
row before any model is loaded: a missing file, column, field or image is a `BenchmarkFileError` naming the file,
the line (or key) and the fix. Files are only read (never executed); paths in them stay inside the benchmark's
folder.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Protocol, Sequence

import numpy as np

from safework.data.example import Example
from safework.data.jsonl import json_objects
from safework.verifiers.judges import JudgeSpec


class BenchmarkFileError(ValueError):
  """A benchmark file that cannot be read as its format says: the message names the file, the row and the fix."""


@dataclasses.dataclass(frozen=True)
class Item:
  """One benchmark prompt: what the policy is asked and what the metrics and judges need.

  `reference` is what a benchmark's own judge reads beside the response (HarmBench's context, SIUO's reference
  answer); `meta` the benchmark's own fields (XSTest's label and type, ...), kept in responses.jsonl.
  """
  id: str
  prompt: str
  images: tuple[str, ...] = ()
  category: str = ""
  reference: str | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def example(self) -> Example:
    return Example(question=self.prompt, images=self.images, label="safety", answer=self.reference,
                   meta=dict(self.meta))


@dataclasses.dataclass(frozen=True)
class Judgement:
  """A response as the judges saw it: the rules' refusal class (always), and per model-judge prompt its most
  likely verdict and score."""
  refusal: str
  verdicts: Mapping[str, str] = dataclasses.field(default_factory=dict)
  scores: Mapping[str, float] = dataclasses.field(default_factory=dict)


class Benchmark(Protocol):
  """A benchmark may also define `judged(item, spec) -> (spec, Example)`: what a judge prompt sees of an item
  (default: the spec as is, `item.example()`); `rule_scores(response) -> {name: score}`: its own rule checks,
  kept in each `Judgement.scores`; `rules_judge = False` when its metrics need a model judge."""
  name: str
  default_file: str   # read when --data names the benchmark's folder
  # The model-judge prompts its metrics can use, by --judge kind: {score name: judge prompt}.
  judges: Mapping[str, Mapping[str, JudgeSpec]]

  def read(self, path: Path) -> list[Item]:
    """Every item of the file (or of the folder's default file), checked."""

  def metrics(self, items: Sequence[Item], judgements: Sequence[Judgement], judge: str
              ) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """(metrics, metrics by category) under `judge` ("rules" or a kind of `judges`)."""


def resolve(path: Path, default_file: str) -> Path:
  """The benchmark file: `path` itself, or `default_file` inside the folder `path`."""
  path = Path(path)
  target = path / default_file if path.is_dir() else path
  if not target.is_file():
    where = f"{path} has no {default_file}" if path.is_dir() else f"{path} does not exist"
    raise BenchmarkFileError(f"{where}: give the benchmark's file or the folder that holds {default_file}")
  return target


def csv_rows(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
  """(line number, row) of a CSV file with a header that has every `required` column."""
  with open(path, newline="", encoding="utf-8-sig") as f:
    reader = csv.DictReader(f)
    header = reader.fieldnames or []
    missing = [c for c in required if c not in header]
    if missing:
      raise BenchmarkFileError(f"{path}:1: the header lacks column(s) {missing}; it has {header}. Is this the "
                               f"benchmark's published file?")
    for row in reader:
      yield reader.line_num, row


def jsonl_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
  return json_objects(path, BenchmarkFileError)


def json_file(path: Path) -> Any:
  try:
    return json.loads(Path(path).read_text(encoding="utf-8"))
  except json.JSONDecodeError as e:
    raise BenchmarkFileError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def field(row: Mapping[str, Any], name: str, where: str) -> str:
  """A non-empty text field of a row."""
  value = row.get(name)
  if value is None or (isinstance(value, str) and not value.strip()):
    raise BenchmarkFileError(f"{where}: the field {name!r} is missing or empty")
  return str(value)


def image_in(folder: Path, name: str, where: str) -> str:
  """An image file named by a benchmark row, inside `folder` (names that leave it are refused)."""
  folder = Path(folder).resolve()
  path = (folder / name).resolve()
  if folder not in path.parents:
    raise BenchmarkFileError(f"{where}: the image {name!r} points outside {folder}")
  if not path.is_file():
    raise BenchmarkFileError(f"{where}: the image {path} is not there; put the benchmark's images in {folder}")
  return str(path)


def unique_ids(items: Sequence[Item], path: Path) -> list[Item]:
  seen: dict[str, int] = {}
  for i, item in enumerate(items):
    if item.id in seen:
      raise BenchmarkFileError(f"{path}: the id {item.id!r} appears twice (items {seen[item.id]} and {i})")
    seen[item.id] = i
  if not items:
    raise BenchmarkFileError(f"{path}: no items")
  return list(items)


def rate(values: Sequence[bool | float]) -> float:
  return float(np.mean(values)) if len(values) else float("nan")


def by_category(items: Sequence[Item], values: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
  """Each metric's mean per item category: values[name] holds one number per item."""
  categories = sorted({item.category for item in items})
  out = {}
  for category in categories:
    rows = [i for i, item in enumerate(items) if item.category == category]
    out[category] = {name: rate([v[i] for i in rows]) for name, v in values.items()} | {"n": float(len(rows))}
  return out
