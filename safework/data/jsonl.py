"""Reading user rows from JSONL/CSV files, with errors that name the file and the line.

Used by the tfds builders for user data (prompts, judgments): a malformed row stops the build with a message such
as `rows.jsonl:17: field 'question' is missing`, never with a stack trace from deep inside tfds.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence


class DataError(ValueError):
  """A malformed input row; the message names the file and the line."""


def _coerce(path: Path, line: int, row: Mapping[str, Any], schema: Mapping[str, type], required: Sequence[str]
            ) -> dict[str, Any]:
  missing = [k for k in required if row.get(k) in (None, "")]
  if missing:
    raise DataError(f"{path}:{line}: field {missing[0]!r} is missing (required: {list(required)})")
  unknown = sorted(set(row) - set(schema))
  if unknown:
    raise DataError(f"{path}:{line}: unknown fields {unknown}; known fields: {sorted(schema)}")
  out = {}
  for key, kind in schema.items():
    value = row.get(key)
    if value is None or value == "":
      out[key] = [] if kind is list else ""
    elif kind is list:
      if isinstance(value, str):   # CSV: a ';'-separated list
        value = [v for v in value.split(";") if v]
      if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}:{line}: field {key!r} must be a list of strings, got {value!r}")
      out[key] = value
    elif kind is dict:
      if isinstance(value, str):
        try:
          value = json.loads(value)
        except json.JSONDecodeError as e:
          raise DataError(f"{path}:{line}: field {key!r} is not a JSON object: {e}") from None
      if not isinstance(value, dict):
        raise DataError(f"{path}:{line}: field {key!r} must be an object, got {type(value).__name__}")
      out[key] = value
    else:
      if isinstance(value, (dict, list)):
        raise DataError(f"{path}:{line}: field {key!r} must be text, got {type(value).__name__}")
      out[key] = str(value)
  return out


def read_rows(path: str | Path, schema: Mapping[str, type], required: Sequence[str]) -> Iterator[tuple[int, dict]]:
  """(line number, row) of a .jsonl or .csv file, each row checked against `schema` (name -> str/list/dict).

  A file without any row is an error (an empty split would otherwise surface as a tfds assertion)."""
  path = Path(path)
  if not path.is_file():
    raise DataError(f"{path} does not exist")
  empty = True
  for line, row in _rows(path, schema, required):
    empty = False
    yield line, row
  if empty:
    raise DataError(f"{path} holds no rows; give it at least one, or remove the file")


def _rows(path: Path, schema: Mapping[str, type], required: Sequence[str]) -> Iterator[tuple[int, dict]]:
  if path.suffix == ".csv":
    with path.open(newline="") as f:
      for line, row in enumerate(csv.DictReader(f), start=2):
        yield line, _coerce(path, line, row, schema, required)
    return
  for line, row in json_objects(path):
    yield line, _coerce(path, line, row, schema, required)


def json_objects(path: Path, error: type[Exception] = DataError) -> Iterator[tuple[int, dict]]:
  """(line number, object) of every non-empty line of a JSONL file; a line that is not a JSON object raises `error`
  naming the file and the line."""
  with open(path, encoding="utf-8") as f:
    for line, text in enumerate(f, start=1):
      if not text.strip():
        continue
      try:
        row = json.loads(text)
      except json.JSONDecodeError as e:
        raise error(f"{path}:{line}: not valid JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(row, dict):
        raise error(f"{path}:{line}: a row must be a JSON object, got {type(row).__name__}")
      yield line, row


def resolve_image(path: Path, line: int, base: Path, name: str) -> str:
  image = (base / name) if not Path(name).is_absolute() else Path(name)
  if not image.is_file():
    raise DataError(f"{path}:{line}: image {name!r} not found (relative paths start at {base})")
  return str(image)


def image_size(path: Path, line: int, image: str, decode: bool = False) -> tuple[int, int]:
  """(height, width) of an image file; `decode` reads all its pixels (a truncated file fails only then)."""
  import PIL.Image
  try:
    with PIL.Image.open(image) as pil:
      if decode:
        pil.load()
      return pil.height, pil.width
  except (OSError, SyntaxError, ValueError) as e:   # PIL's errors for unreadable, truncated or unknown files
    raise DataError(f"{path}:{line}: image {image} cannot be read ({type(e).__name__}: {e}); replace or remove "
                    "it") from None
