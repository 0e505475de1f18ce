"""Verifier throughput: one verdict-head forward per batch against decoding the verdict with the sampler.

  python -m safework.bench verifiers --preset 7b --dtype bfloat16 --batch 64 --prompt_len 1024 --verdict_tokens 8

The paper's judges are generative: they prefill the judge prompt and decode a verdict of a few tokens. The verdict
head reads the same first-token distribution in the prefill's single forward pass, so the decoding steps are
what it saves. Weights are random (same shapes as the preset).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from safework import sharding
from safework.bench.roofline import Ceilings, best_time
from safework.bench.sampler import decoder_param_count
from safework.models import Qwen25VL, get_preset, init_params
from safework.models.inputs import prepare_inputs
from safework.sampling import Sampler, SamplingSettings
from safework.verifiers.model_verifier import JudgePixels, ModelVerifier


def run(preset: str, batch: int, prompt_len: int, verdict_tokens: int, dtype: str, ceilings: Ceilings) -> dict:
  cfg = get_preset(preset)
  dt = jnp.dtype(dtype)
  model = Qwen25VL(cfg, dtype=dt, param_dtype=dt)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": -1})
  verdict_ids = np.arange(10, 16, dtype=np.int32)
  with jax.set_mesh(mesh):
    params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(0), mesh, sharding.DEFAULT_RULES)
    ids = np.random.default_rng(0).integers(20, min(cfg.text.vocab_size, 150000), (batch, prompt_len)).astype(np.int32)
    mask = np.ones_like(ids)
    prepared = prepare_inputs(cfg, ids, mask)
    head = jax.jit(lambda p, i, m, pr: ModelVerifier.logprobs_fn(model, "verdict", verdict_ids, p, None, i, m,
                                                                 JudgePixels(), pr))
    head_s = best_time(lambda: head(params, ids, mask, prepared), repeats=3)
    sampler = Sampler(model, mesh=mesh)
    settings = SamplingSettings(max_new_tokens=verdict_tokens, temperature=0.0)
    decode_s = best_time(lambda: sampler.generate(params, dict(input_ids=ids, attention_mask=mask), jax.random.key(0),
                                                  settings).tokens, repeats=3)
  read_params, _ = decoder_param_count(model)
  flops = 2 * read_params * batch * prompt_len
  return {"preset": preset, "dtype": dtype, "batch": batch, "prompt_len": prompt_len, "verdict_tokens": verdict_tokens,
          "device": ceilings.device, "head_samples_per_s": batch / head_s, "decode_samples_per_s": batch / decode_s,
          "speedup": decode_s / head_s, "head_mfu": ceilings.compute_time(flops) / head_s}
