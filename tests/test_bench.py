"""The benchmark scripts run and report their fields (no timing is asserted: speed is measured, not tested)."""

import jax.numpy as jnp

from safework.bench import roofline, sampler


def test_sampler_benchmark_reports_roofline_ratios():
  ceilings = roofline.measure(jnp.float32)
  assert ceilings.bandwidth > 0 and ceilings.matmul_rate > 0
  result = sampler.run("tiny", batch=2, group=2, prompt_len=16, gen_len=8, dtype="float32", ceilings=ceilings)
  for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "decode_bandwidth_ratio", "decode_roofline_ratio",
              "prefill_mfu"):
    assert result[key] > 0


def test_train_benchmark_reports_mfu_and_the_rollout_split():
  from safework.bench import train
  result = train.run("tiny", batch=4, prompt_len=16, gen_len=8, dtype="float32", remat="none", micro_batch=2,
                     ceilings=roofline.measure(jnp.float32), group=2)
  assert result["mfu"] > 0 and result["train_tokens_per_s"] > 0 and 0 < result["rollout_fraction"] < 1


def test_verifier_benchmark_compares_the_head_with_decoding():
  from safework.bench import verifiers
  result = verifiers.run("tiny", batch=2, prompt_len=16, verdict_tokens=2, dtype="float32",
                         ceilings=roofline.measure(jnp.float32))
  assert result["head_samples_per_s"] > 0 and result["decode_samples_per_s"] > 0 and result["speedup"] > 0
