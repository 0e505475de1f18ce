"""Hugging Face checkpoints in and out: `config.json` plus safetensors (single file or sharded with an index), for
every family of `models.families` (chosen by `config.json`'s `model_type`).

Weights are read with `safetensors` only (never pickle), converted tensor by tensor and placed on device at once,
so the host never holds a second full copy of the model. With shardings, each device's part of a tensor is read
from the file on its own (a host of a pod reads only the rows its devices hold). Every problem
with a checkpoint (missing, unexpected or mis-shaped tensors) is collected and reported in one error.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from safework.models.families import build_model, config_from_hf_dict, family_of, init_params
from safework.models.hf_keys import IGNORED_KEYS, HfTensor


INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files a checkpoint directory may carry besides weights and config; copied on export.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
               "added_tokens.json", "chat_template.json", "chat_template.jinja", "preprocessor_config.json",
               "processor_config.json", "video_preprocessor_config.json", "generation_config.json")


class CheckpointError(ValueError):
  """A checkpoint that does not fit the model: lists every missing, unexpected or mis-shaped tensor."""


def load_config(path: str | Path):
  """The config of a checkpoint directory's `config.json`, of whichever family its `model_type` names."""
  config_file = Path(path) / "config.json"
  if not config_file.is_file():
    raise CheckpointError(f"{config_file} does not exist: a checkpoint directory needs a config.json")
  return config_from_hf_dict(json.loads(config_file.read_text()))


def safetensors_files(path: str | Path) -> list[Path]:
  """The weight files of a checkpoint directory, from its index when it is sharded."""
  path = Path(path)
  if (path / INDEX_FILE).is_file():
    weight_map = json.loads((path / INDEX_FILE).read_text())["weight_map"]
    files = [path / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
      raise CheckpointError(f"{path / INDEX_FILE} names shards that are not in {path}: {missing}")
    return files
  if (path / SINGLE_FILE).is_file():
    return [path / SINGLE_FILE]
  files = sorted(path.glob("*.safetensors"))
  if not files:
    pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    hint = (f" It has {pickled}: pickled weights are never loaded (they can run code); convert them to "
            "safetensors with transformers first." if pickled else "")
    raise CheckpointError(f"no safetensors weights in {path} (expected {SINGLE_FILE} or {INDEX_FILE}).{hint}")
  return files


def _open_safetensors(file: Path):
  """A safetensors file opened for reading; a truncated or damaged one is named in a `CheckpointError`."""
  try:
    return safe_open(file, framework="np")
  except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header or size
    raise CheckpointError(f"{file} cannot be read as safetensors ({e}); the file is truncated or damaged: copy it "
                          "again from its source") from None


def abstract_params(model: nn.Module) -> Any:
  """Shapes, dtypes and logical axes of the model's parameters, without allocating them."""
  return jax.eval_shape(functools.partial(init_params, model), jax.random.key(0))


def _flat(tree) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(nn.meta.unbox(tree))


def _place(parts: list[tuple[HfTensor, Any]], stacked: bool, shape: tuple[int, ...], dtype, sharding) -> jax.Array:
  """Our parameter, converted from its checkpoint tensors ((entry, slice reader) per layer when `stacked`); with a
  sharding, each device's part is read on its own (only the layers and rows it holds)."""
  def read(box):
    if not stacked:
      entry, reader = parts[0]
      return entry.read(reader, shape, box).astype(dtype)
    box = box or (slice(None),) * len(shape)
    layers = range(*box[0].indices(shape[0]))
    return np.stack([parts[i][0].read(parts[i][1], shape[1:], box[1:]).astype(dtype) for i in layers])
  if sharding is None:
    return jnp.asarray(read(None))
  return jax.make_array_from_callback(shape, sharding, read)


def load_params(path: str | Path, model: nn.Module, shardings: Any = None) -> dict:
  """Reads a checkpoint's tensors into the parameter tree of `model` (in its `param_dtype`).

  `shardings`, when given, is a tree of `jax.sharding.Sharding` like the parameters; each tensor goes straight
  into its sharding.
  """
  targets = _flat(abstract_params(model))
  family = family_of(model.config)
  table = family.tensor_map(model.config)
  wanted = {one.key: (param, one) for param, entry in table.items() for _, one in entry.per_layer()}
  flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  found, unexpected, mismatched = {}, [], {}
  with contextlib.ExitStack() as files:
    for file in safetensors_files(path):
      f = files.enter_context(_open_safetensors(file))
      for raw_key in f.keys():
        key = family.canonical_key(raw_key)
        if key not in wanted:
          tied_copy = key == "lm_head.weight" and model.config.tie_word_embeddings
          if not (tied_copy or IGNORED_KEYS.search(key)):
            unexpected.append(raw_key)
          continue
        entry = wanted[key][1]
        shape = tuple(f.get_slice(raw_key).get_shape())
        if shape != entry.shape:
          mismatched[key] = f"{raw_key}: checkpoint {shape}, model expects {entry.shape}"
          continue
        found[key] = (entry, f.get_slice(raw_key))
    missing = [key for key in wanted if key not in found and key not in mismatched]
    problems = []
    if missing:
      hint = (" (the checkpoint may tie its embeddings: check tie_word_embeddings in config.json)"
              if missing == ["lm_head.weight"] else "")
      problems.append(f"{len(missing)} missing tensors{hint}: {missing}")
    if unexpected:
      problems.append(f"{len(unexpected)} unexpected tensors (is this a {family.name} checkpoint?): {unexpected}")
    if mismatched:
      problems.append(f"{len(mismatched)} tensors with the wrong shape: {list(mismatched.values())}")
    if problems:
      raise CheckpointError(f"checkpoint {path} does not match the model of its config.json:\n  " +
                            "\n  ".join(problems))
    loaded = {}
    for param, entry in table.items():
      target = targets[param]
      parts = [found[one.key] for _, one in entry.per_layer()]
      loaded[param] = _place(parts, entry.layers > 0, target.shape, target.dtype, flat_shardings.get(param))
  return traverse_util.unflatten_dict(loaded)


def from_pretrained(path: str | Path, dtype=jnp.float32, param_dtype=None, remat_policy: str = "none",
                    shardings: Any | Callable[[nn.Module], Any] = None) -> tuple[nn.Module, dict]:
  """Loads a Hugging Face checkpoint directory of any known family -> (model, params).

  `dtype` is the compute dtype; parameters are stored in `param_dtype` (default: `dtype`). `shardings` is a
  tree of shardings for the parameters, or a function of the model that returns one.
  """
  model = build_model(load_config(path), dtype=dtype, param_dtype=param_dtype or dtype, remat_policy=remat_policy)
  if callable(shardings):
    shardings = shardings(model)
  return model, load_params(path, model, shardings)


def _host_array(x: jax.Array) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _plan_shards(entries: list[tuple[Any, int | None, HfTensor]], itemsize: int, max_bytes: int) -> list[list]:
  shards, current, size = [], [], 0
  for item in entries:
    nbytes = math.prod(item[2].shape) * itemsize
    if current and size + nbytes > max_bytes:
      shards.append(current)
      current, size = [], 0
    current.append(item)
    size += nbytes
  return shards + [current] if current else shards


def save_pretrained(path: str | Path, model: nn.Module, params: dict, dtype=None, max_shard_bytes: int = 5 << 30,
                    assets_from: str | Path | None = None) -> Path:
  """Writes a checkpoint that `transformers` loads: config.json, safetensors (legacy key layout), and the
  tokenizer/processor files of `assets_from` (e.g. the checkpoint the model came from) when it has them.

  Tensors are converted shard by shard; `dtype` defaults to the parameters' own dtype.
  """
  path = Path(path)
  family = family_of(model.config)
  table = family.tensor_map(model.config)
  flat = _flat(params)
  if set(flat) != set(table):
    raise CheckpointError(f"params do not match the model: missing {sorted(set(table) - set(flat))}, "
                          f"unexpected {sorted(set(flat) - set(table))}")
  dtype = np.dtype(dtype or next(iter(flat.values())).dtype)
  entries = [(param, layer, one) for param, entry in table.items() for layer, one in entry.per_layer()]
  shards = _plan_shards(entries, dtype.itemsize, max_shard_bytes)
  is_writer = jax.process_index() == 0
  if is_writer:
    path.mkdir(parents=True, exist_ok=True)
    config = family.to_hf_dict(model.config) | {"dtype": dtype.name}
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
  weight_map = {}
  for i, shard in enumerate(shards):
    name = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    tensors = {}
    for param, layer, entry in shard:   # a stacked parameter is gathered one layer at a time
      value = _host_array(flat[param] if layer is None else flat[param][layer]).astype(dtype)
      tensors[entry.key] = np.ascontiguousarray(entry.to_hf(value))
    if is_writer:
      save_file(tensors, str(path / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in tensors})
  if is_writer and len(shards) > 1:
    total = sum(math.prod(entry.shape) * dtype.itemsize for _, _, entry in entries)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
  if is_writer and assets_from is not None:
    for name in ASSET_FILES:
      if (Path(assets_from) / name).is_file():
        shutil.copy2(Path(assets_from) / name, path / name)
  return path

