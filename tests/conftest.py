"""Test set-up: 8 simulated CPU devices compiled for speed of compiling, offline Hugging Face, JAX's persistent
compilation cache."""

import os
from pathlib import Path

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = f"{_flags} --xla_force_host_platform_device_count=8"
# Tiny programs: LLVM's optimisation of the CPU code costs more compile time than it saves (-13% suite time); the
# HLO and its numerics are the same.
if "xla_backend_optimization_level" not in _flags:
  _flags = f"{_flags} --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(__file__).resolve().parents[1] / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ["SAFEWORK_PLAN_CACHE"] = ""   # the planner's tests compile: no memory remembered from another run
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
  """Saves tiny random transformers models on first use: hf_checkpoints(tied=..., kv_heads=...) -> (dir, model)."""
  from tests import hf_reference
  cache = {}

  def get(tied: bool = False, kv_heads: int = 2):
    key = (tied, kv_heads)
    if key not in cache:
      model = hf_reference.tiny_model(hf_reference.tiny_config(tied=tied, kv_heads=kv_heads), seed=len(cache))
      path = tmp_path_factory.mktemp(f"hf_tied{int(tied)}_kv{kv_heads}")
      model.save_pretrained(path)
      cache[key] = (path, model)
    return cache[key]

  return get


@pytest.fixture(scope="session")
def tiny_tokenizer():
  """A byte-level BPE tokenizer whose special ids match tests/hf_reference.py."""
  from safework.processing import train_tokenizer
  corpus = ["describe the picture please", "a cat sits on a mat", "what colour is the square?",
            "<think>let me think</think> the answer is 4"] * 10
  return train_tokenizer(corpus, vocab_size=300)


@pytest.fixture(scope="session")
def chat_checkpoint(hf_checkpoints, tiny_tokenizer, tmp_path_factory):
  """A tiny checkpoint directory with weights, config and a tokenizer: what a user points the tools at."""
  src, hf = hf_checkpoints(tied=False, kv_heads=2)
  path = tmp_path_factory.mktemp("chat_checkpoint")
  hf.save_pretrained(path)
  tiny_tokenizer.save_pretrained(path)
  return path


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: end-to-end runs of a minute or more (kept few and lean)")


def pytest_collection_modifyitems(config, items):
  """The slow tests first: under xdist they then run beside the many short ones instead of after them (longest
  first keeps the workers' loads even)."""
  items.sort(key=lambda item: item.get_closest_marker("slow") is None)
