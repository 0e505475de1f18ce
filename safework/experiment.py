"""Helpers for experiment files and the entry point: typed `get_config(arg)` knobs, sections <-> settings.

Only experiment files and `safework.main` see a `ConfigDict`. Library code takes frozen dataclasses, whose
defaults are the one home of every default: `section(cls, **changes)` gives an experiment file a section with
every field (so any of them can be overridden from the command line), and `settings(cls, section)` turns it back
into the dataclass, rejecting unknown keys with the close matches.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

import ml_collections
from ml_collections import config_dict

T = TypeVar("T")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def close_matches(name: str, known) -> str:
  """' (did you mean 'x'?)' for a misspelt name, else ''."""
  matches = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
  return f" (did you mean {' or '.join(repr(m) for m in matches)}?)" if matches else ""


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """'variant=7b,runlocal' -> {variant: '7b', runlocal: True}, typed like the defaults (big_vision style)."""
  parsed = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}{close_matches(key, defaults)}; known: {sorted(defaults)}")
    default = defaults[key]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      parsed[key] = True
    elif isinstance(default, bool):
      if value.lower() not in _TRUE + _FALSE:
        raise ValueError(f"config argument {key}={value!r} is not a boolean: write {key}=true or {key}=false")
      parsed[key] = value.lower() in _TRUE
    elif default is None or isinstance(default, str):
      parsed[key] = value
    else:
      try:
        parsed[key] = type(default)(value)
      except ValueError:
        raise ValueError(f"config argument {key}={value!r} is not a {type(default).__name__}") from None
  return ml_collections.ConfigDict(parsed)


def _scalar_type(annotation) -> type | None:
  """The type a None default stands for (int for `int | None`), to make a typed placeholder."""
  args = [a for a in typing.get_args(annotation) if a is not type(None)]
  return args[0] if len(args) == 1 and isinstance(args[0], type) else None


def _fields(cls: type, keys) -> dict[str, dataclasses.Field]:
  """The dataclass's fields; keys that are none of them are an error naming the close matches."""
  fields = {f.name: f for f in dataclasses.fields(cls)}
  unknown = sorted(set(keys) - set(fields))
  if unknown:
    raise ValueError(f"unknown keys {unknown} for {cls.__name__}{close_matches(unknown[0], fields)}; "
                     f"known keys: {sorted(fields)}")
  return fields


def section(cls: type, **changes: Any) -> ml_collections.ConfigDict:
  """Every field of the settings dataclass `cls` with its default, `changes` applied (unknown ones rejected)."""
  fields = _fields(cls, changes)
  hints = typing.get_type_hints(cls)
  out = ml_collections.ConfigDict()
  for name, field in fields.items():
    value = changes.get(name, field.default if field.default is not dataclasses.MISSING else field.default_factory())
    if isinstance(value, tuple):
      value = _lists(value)
    if value is None and _scalar_type(hints[name]) is not None:
      value = config_dict.placeholder(_scalar_type(hints[name]))
    out[name] = value
  return out


def settings(cls: type[T], section: Any, **extra: Any) -> T:
  """Builds the frozen dataclass `cls` from a config section; unknown keys are an error naming the known ones."""
  values = dict(section.to_dict() if isinstance(section, ml_collections.ConfigDict) else section or {})
  values.update(extra)
  _fields(cls, values)
  hints = typing.get_type_hints(cls)
  for name, value in values.items():   # ConfigDicts hold lists where the dataclasses want tuples
    if isinstance(value, list) and _wants_tuple(hints[name]):
      values[name] = _tuples(value)
  out = cls(**values)
  return out.validate() if hasattr(out, "validate") else out


def _lists(value):
  return [_lists(v) for v in value] if isinstance(value, (tuple, list)) else value


def _tuples(value):
  return tuple(_tuples(v) for v in value) if isinstance(value, (tuple, list)) else value


def _wants_tuple(annotation) -> bool:
  origin = typing.get_origin(annotation)
  if origin in (typing.Union, types.UnionType):
    return any(_wants_tuple(a) for a in typing.get_args(annotation))
  return origin is tuple or annotation is tuple
