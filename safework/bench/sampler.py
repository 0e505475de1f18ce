"""Sampler throughput: prefill and decode tokens/s, as fractions of the roofline, next to transformers.

  python -m safework.bench sampler --preset 7b --batch 64 --group 8 --prompt_len 256 --gen_len 256

Weights are random (same shapes as the preset); prompts are random text tokens; no row stops early.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from safework import sharding
from safework.bench.roofline import Ceilings, best_time
from safework.models import Qwen25VL, get_preset, init_params
from safework.models.checkpoint import abstract_params
from safework.sampling import Sampler, SamplingSettings, bucket_length


def decoder_param_count(model: Qwen25VL) -> tuple[int, int]:
  """(parameters read per decoded token, embedding rows gathered instead) of the language model."""
  flat = jax.tree_util.tree_flatten_with_path(abstract_params(model))[0]
  count = lambda keep: sum(math.prod(leaf.shape) for path, leaf in flat if keep(jax.tree_util.keystr(path)))
  decoder = count(lambda p: "'decoder'" in p)
  cfg = model.config
  head = cfg.text.vocab_size * cfg.text.hidden_size
  return decoder + head, (0 if cfg.tie_word_embeddings else head)


def run(preset: str, batch: int, group: int, prompt_len: int, gen_len: int, dtype: str, ceilings: Ceilings,
        mesh_shape: dict | None = None) -> dict:
  cfg = get_preset(preset)
  dt = jnp.dtype(dtype)
  model = Qwen25VL(cfg, dtype=dt, param_dtype=dt)
  mesh = sharding.make_mesh(mesh_shape or {"data": 1, "fsdp": 1, "tensor": -1})
  with jax.set_mesh(mesh):
    params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(0), mesh, sharding.DEFAULT_RULES)
    sampler = Sampler(model, mesh=mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(10, min(cfg.text.vocab_size, 150000), (batch, prompt_len)).astype(np.int32)
    inputs = dict(input_ids=ids, attention_mask=np.ones_like(ids))
    settings = SamplingSettings(max_new_tokens=gen_len, temperature=1.0, eos_ids=())
    prefill_s = best_time(lambda: sampler.prefill(params, inputs, gen_len).last_logits, repeats=3)
    prefix = sampler.prefill(params, inputs, gen_len)
    decode = lambda: sampler.decode(params, prefix, jax.random.key(1), settings, num_samples=group,
                                    keep_prefix=True).tokens
    total_s = best_time(decode, repeats=3)

  rows, steps = batch * group, gen_len
  t = cfg.text
  read_params, _ = decoder_param_count(model)
  itemsize = dt.itemsize
  context = bucket_length(prompt_len) + gen_len / 2
  kv_bytes = rows * context * t.num_hidden_layers * 2 * t.num_key_value_heads * t.head_dim * itemsize
  step_bytes = read_params * itemsize + kv_bytes
  step_flops = 2 * read_params * rows + 4 * t.num_hidden_layers * t.hidden_size * context * rows
  step_s = total_s / steps
  ideal_step = max(ceilings.memory_time(step_bytes), ceilings.compute_time(step_flops))
  prefill_flops = 2 * read_params * batch * prompt_len + 2 * t.num_hidden_layers * t.hidden_size * prompt_len**2 * batch
  return {
      "preset": preset, "dtype": dtype, "batch": batch, "group": group, "prompt_len": prompt_len, "gen_len": gen_len,
      "device": ceilings.device, "prefill_tokens_per_s": batch * prompt_len / prefill_s,
      "prefill_mfu": ceilings.compute_time(prefill_flops) / prefill_s,
      "decode_tokens_per_s": rows * steps / total_s, "decode_step_ms": 1e3 * step_s,
      "decode_bandwidth_ratio": ceilings.memory_time(step_bytes) / step_s,
      "decode_roofline_ratio": ideal_step / step_s,
  }


def transformers_peer(preset: str, batch: int, group: int, prompt_len: int, gen_len: int, dtype: str) -> dict | None:
  """The same generation with transformers `generate`, in its own process (torch and jax apart)."""
  args = [sys.executable, "-m", "safework.bench.hf_peer", preset, str(batch), str(group), str(prompt_len),
          str(gen_len), dtype]
  try:
    out = subprocess.run(args, capture_output=True, text=True, timeout=3600, check=True)
  except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
    print(f"transformers peer failed: {getattr(e, 'stderr', e)}", file=sys.stderr)
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def _tiny_setup(preset: str, dtype: str):
  """A model with random weights in the sampling dtype (what the sampler decodes from: the bf16 copy of the fp32
  masters in production), on all local devices."""
  cfg = get_preset(preset)
  dt = jnp.dtype(dtype)
  model = Qwen25VL(cfg, dtype=dt, param_dtype=dt)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": -1})
  params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(0), mesh, sharding.DEFAULT_RULES)
  return cfg, model, mesh, params


def _prompts(cfg, batch: int, prompt_len: int) -> dict:
  ids = np.random.default_rng(0).integers(10, min(cfg.text.vocab_size, 150000), (batch, prompt_len)).astype(np.int32)
  return dict(input_ids=ids, attention_mask=np.ones_like(ids))


def _decode_time(sampler: Sampler, params, prefill, settings: SamplingSettings, compact: bool,
                 repeats: int = 3) -> float:
  """The fastest decode of a fresh prefix (donated), the prefill not timed."""
  best = float("inf")
  for _ in range(repeats + 1):   # the first run compiles
    prefix = jax.block_until_ready(prefill())
    start = time.perf_counter()
    jax.block_until_ready(sampler.decode(params, prefix, jax.random.key(1), settings, compact=compact).tokens)
    best = min(best, time.perf_counter() - start)
  return best


def cache_cost(preset: str, batch: int, prompt_len: int, gen_len: int, dtype: str,
               capacities: tuple[int, int] = (128, 2048)) -> dict:
  """Decode step time at the same filled length with a small and a large reserved cache (goal: within 1.3x)."""
  cfg, model, mesh, params = _tiny_setup(preset, dtype)
  settings = SamplingSettings(max_new_tokens=gen_len, temperature=1.0, eos_ids=())
  times = {}
  with jax.set_mesh(mesh):
    sampler = Sampler(model, mesh=mesh)
    for capacity in capacities:
      extra = capacity - bucket_length(prompt_len) - gen_len
      if extra < 0:
        raise ValueError(f"capacity {capacity} is below the prompt bucket + gen_len")
      prefill = lambda: sampler.prefill(params, _prompts(cfg, batch, prompt_len), gen_len, extra_slots=extra)
      times[capacity] = _decode_time(sampler, params, prefill, settings, compact=False) / gen_len
  small, large = capacities
  return {"case": "cache_cost", "preset": preset, "dtype": dtype, "batch": batch, "filled": bucket_length(prompt_len)
          + gen_len, **{f"step_ms_capacity_{c}": 1e3 * t for c, t in times.items()},
          "large_over_small": times[large] / times[small], "goal": "<= 1.3"}


def _stop_short_rows(short_rows: int, short_len: int, eos: int):
  """A logits processor that ends the first `short_rows` rows at step `short_len` (EOS forced), others never."""
  def force(logits, history, step):
    del history
    rows = jnp.arange(logits.shape[0])[:, None]
    stop = (rows < short_rows) & (step == short_len - 1)
    is_eos = jnp.arange(logits.shape[1])[None] == eos
    return jnp.where(stop, jnp.where(is_eos, 0.0, -jnp.inf), jnp.where(is_eos, -jnp.inf, logits))
  return force


def ragged(preset: str, batch: int, prompt_len: int, dtype: str, short_len: int = 32, long_len: int = 512,
           long_fraction: float = 0.1) -> dict:
  """90% of rows stop after `short_len` tokens, 10% run to `long_len`: total time against the long rows alone
  (goal: within 1.5x; rows that finish early should stop costing)."""
  cfg, model, mesh, params = _tiny_setup(preset, dtype)
  eos = int(cfg.eos_token_id if not isinstance(cfg.eos_token_id, tuple) else cfg.eos_token_id[0])
  long_rows = max(1, int(round(batch * long_fraction)))
  with jax.set_mesh(mesh):
    sampler = Sampler(model, mesh=mesh)

    def total(rows: int, short_rows: int) -> float:
      settings = SamplingSettings(max_new_tokens=long_len, temperature=1.0, eos_ids=(eos,),
                                  logits_processor=_stop_short_rows(short_rows, short_len, eos))
      prefill = lambda: sampler.prefill(params, _prompts(cfg, rows, prompt_len), long_len)
      return _decode_time(sampler, params, prefill, settings, compact=True, repeats=2)   # as the rollout decodes
    mixed, alone = total(batch, batch - long_rows), total(long_rows, 0)
  return {"case": "ragged", "preset": preset, "dtype": dtype, "rows": batch, "long_rows": long_rows,
          "short_len": short_len, "long_len": long_len, "mixed_s": mixed, "long_rows_alone_s": alone,
          "mixed_over_alone": mixed / alone, "goal": "<= 1.5"}
