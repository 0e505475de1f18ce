"""Helpers for experiment files and the entry point: typed `get_config(arg)` knobs, sections -> settings.

Only experiment files and `safework.main` see a `ConfigDict`; library code takes the frozen dataclasses that
`settings(...)` builds, which reject unknown keys with the list of known ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import ml_collections

T = TypeVar("T")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'variant=7b,runlocal' -> {variant: '7b', runlocal: True}, typed like the defaults (big_vision style)."""
  parsed = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      parsed[key] = True
    elif isinstance(default, bool):
      parsed[key] = value.lower() in ("1", "true", "yes")
    elif default is None:
      parsed[key] = value
    else:
      parsed[key] = type(default)(value)
  return ml_collections.ConfigDict(parsed)


def settings(cls: type[T], section: Any, **extra: Any) -> T:
  """Builds the frozen dataclass `cls` from a config section; unknown keys are an error naming the known ones."""
  values = dict(section.to_dict() if isinstance(section, ml_collections.ConfigDict) else section or {})
  values.update(extra)
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(values) - set(fields))
  if unknown:
    raise ValueError(f"unknown keys {unknown} for {cls.__name__}; known keys: {sorted(fields)}")
  for name, value in values.items():   # ConfigDicts hold lists where the dataclasses want tuples
    if isinstance(value, list):
      values[name] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
  out = cls(**values)
  return out.validate() if hasattr(out, "validate") else out
