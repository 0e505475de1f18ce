"""The planner: compiled for a TPU slice that is not here (through libtpu), checked against hand counts."""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from experiments import m3rl_kg
from safework.models import get_preset
from safework.models.config import to_hf_dict
from safework.plan import parse_topology
from safework.plan.costs import decoder_weights

REPO = Path(__file__).resolve().parents[1]


def test_slice_names_follow_cloud_tpu():
  v5p = parse_topology("v5p-16")   # v5p counts TensorCores: 8 chips
  assert (v5p.chips, v5p.topology_name) == (8, "v5p:2x2x2")
  assert parse_topology("v5p-8").topology_name == "v5p:2x2x1"
  assert parse_topology("v5p-64").topology_name == "v5p:2x4x4"
  assert parse_topology("v5e-256").topology_name == "v5e:16x16"
  assert parse_topology("v6e-8").topology_name == "v6e:2x4"
  assert parse_topology("v4-32").chips == 16
  assert parse_topology("h100-8").chips == 8 and not parse_topology("h100-8").is_tpu
  for bad in ("v5p-3", "tpu-8", "v5e-12"):
    with pytest.raises(ValueError, match="topology"):
      parse_topology(bad)


def _hand_count_params(cfg) -> tuple[int, int, int, int]:
  """All parameters, those an fsdp axis cannot split (no embed dimension), and the same two of the vision tower."""
  t, v = cfg.text, cfg.vision
  d, n, k, h, f, y = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.head_dim, t.intermediate_size, \
      t.num_hidden_layers
  layer = d * (n + 2 * k) * h + (n + 2 * k) * h + n * h * d + 3 * d * f + 2 * d
  text = t.vocab_size * d + y * layer + d                   # tied embedding, layers, final norm
  c, vf, wide = v.hidden_size, v.intermediate_size, v.hidden_size * v.merge_unit
  block = c * 3 * c + 3 * c + c * c + c + 2 * c * vf + 2 * vf + vf * c + c + 2 * c
  vision = v.patch_dim * c + v.depth * block + c + wide * wide + wide + wide * d + d
  vision_unsplit = v.depth * (3 * c + 2 * vf) + wide   # vision qkv and mlp biases, fc1 bias
  unsplit = y * (n + 2 * k) * h + vision_unsplit       # + the decoder's q/k/v biases
  return text + vision, unsplit, vision, vision_unsplit


@pytest.fixture(scope="module")
def three_b_width(tmp_path_factory):
  """The 3B shape at one decoder layer and one vision block: a config.json is all the planner reads."""
  base = get_preset("3b")
  cfg = base.replace(text=dataclasses.replace(base.text, num_hidden_layers=1),
                     vision=dataclasses.replace(base.vision, depth=1, fullatt_block_indexes=(0,)))
  path = tmp_path_factory.mktemp("plan3b")
  (path / "config.json").write_text(json.dumps(to_hf_dict(cfg)))
  return path, cfg


@pytest.mark.slow
def test_a_3b_width_stage_compiled_for_v5p_matches_the_hand_count(three_b_width):
  pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu (requirements.txt installs it on Linux x86)")
  from safework.plan.build import plan_stage
  path, cfg = three_b_width
  config = m3rl_kg.get_config("variant=3b")
  config.model.checkpoint, config.model.max_pixels = str(path), 0   # text only: the arguments are countable
  config.mesh = dict(data=1, fsdp=4, tensor=1)
  config.reward.recipes, config.reward.verifiers = {"general_rule": [["math_rule", 1.0]]}, {}
  config.optim.freeze_prefixes = []   # every parameter has moments
  rollout = config.rollout
  rollout.prompts_per_rollout, rollout.samples_per_prompt, rollout.minibatch_size = 4, 2, 8
  rollout.max_prompt_length, rollout.max_new_tokens = 64, 64
  rollout.compaction_levels = 0   # compaction changes no byte counted here; its loop bodies only cost compile time
  config.train.micro_batch_size, config.train.logprob_chunk = 4, 64
  plan = plan_stage(config, parse_topology("v5p-8"), log=lambda _: None)

  assert plan.devices == 4 and plan.hbm_bytes_per_device == 95 * 2**30
  assert list(plan.programs) == ["prefill", "decode", "logprobs", "train_step"]
  total, unsplit, vision, vision_unsplit = _hand_count_params(cfg)
  params_per_chip = 4 * ((total - unsplit) / 4 + unsplit)          # fp32, fsdp = 4
  moments_per_chip = 2 * params_per_chip                           # Adam's mu and nu, sharded alike
  step = plan.programs["train_step"]
  state = dict(step.largest)["train state"]
  np.testing.assert_allclose(state, params_per_chip + moments_per_chip, rtol=1e-4)   # + step counters
  # XLA's own count of the step's arguments: the state and 8 rows x 128 tokens of training data, 2 rows per chip.
  rows_bytes = 2 * (128 * (4 + 1 + 3 * 4 + 4) + 64 * 4 * 5 + 4)
  np.testing.assert_allclose(step.argument_bytes, state + rows_bytes, rtol=0.01)
  # The paper's rollout decodes from a bf16 copy; resident beside it: the fp32 masters, their moments and the
  # reference policy (bf16 too).
  decode = plan.programs["decode"]
  assert dict(decode.largest)["sampling params"] == pytest.approx(params_per_chip / 2, rel=1e-4)
  assert dict(decode.largest)["reference policy"] == pytest.approx(params_per_chip / 2, rel=1e-4)
  assert dict(decode.largest)["policy params (masters)"] == pytest.approx(params_per_chip, rel=1e-4)
  vision_per_chip = 4 * ((vision - vision_unsplit) / 4 + vision_unsplit)
  # jit does not pass the vision tower's parameters to the decode loop; they are in HBM all the same.
  np.testing.assert_allclose(decode.argument_bytes, (params_per_chip - vision_per_chip) / 2, rtol=0.01)
  np.testing.assert_allclose(decode.argument_bytes + decode.resident_bytes,
                             params_per_chip / 2 + params_per_chip + moments_per_chip + params_per_chip / 2, rtol=1e-3)
  # Counted work: 2 FLOPs per decoder weight per token dominate the logprob pass of 8 rows x 128 tokens.
  assert plan.programs["logprobs"].flops > 2 * decoder_weights(cfg) * 8 * 128
  assert plan.fits and "FITS" in plan.table()
  assert set(plan.to_json()["programs"]["decode"]) == {"argument_bytes", "output_bytes", "temp_bytes",
                                                       "resident_bytes", "total_bytes", "flops", "bytes_accessed"}


def test_the_planner_command_writes_json_and_names_a_bad_topology(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO))
  run = lambda *args: subprocess.run([sys.executable, "-m", "safework.plan", "--config",
                                      str(REPO / "experiments/toy_rl.py"), *args], capture_output=True, text=True,
                                     env=env, cwd=tmp_path, timeout=600)
  bad = run("--topology", "v5p-7")
  assert bad.returncode == 2 and "v5p-7" in bad.stderr and "even count" in bad.stderr
  out = tmp_path / "plan.json"
  good = run("--topology", "h100-2", "--json", str(out))
  assert good.returncode == 0, good.stderr[-2000:]
  plan = json.loads(out.read_text())
  assert plan["topology"] == "h100-2" and plan["chips"] == 2 and plan["estimate"] and plan["fits"]
  assert {"prefill", "decode", "logprobs", "train_step"} <= set(plan["programs"])
  assert "ESTIMATE" in good.stdout and "FITS" in good.stdout
  assert math.isclose(plan["hbm_bytes_per_chip"], 80e9)


def test_a_program_that_does_not_fit_is_named_with_its_largest_buffers_and_knob():
  from safework.plan.build import out_of_memory_temporaries
  from safework.plan.report import Plan, ProgramCost
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (285.17G) "
             "exceeds available HBM (95.74G).")
  assert out_of_memory_temporaries(message) == int(285.17 * 2**30)
  assert out_of_memory_temporaries("INVALID_ARGUMENT: something else") is None
  gb = 10**9
  cost = lambda temp: ProgramCost(argument_bytes=2 * gb, output_bytes=0, temp_bytes=temp, alias_bytes=0,
                                  resident_bytes=gb, flops=1e12, bytes_accessed=1e9,
                                  largest=(("prompt cache", 2 * gb), ("optimizer state", gb)))
  plan = Plan(stage="s", topology=parse_topology("v5p-8"), hbm_bytes_per_device=95 * 2**30, devices=4,
              mesh={"fsdp": 4}, programs={"prefill": cost(gb), "decode": cost(300 * gb)}, estimate=False,
              knobs={"decode": "rollout.generation_prompts"})
  assert not plan.fits and plan.fits_program(plan.programs["prefill"])
  verdict = plan.verdict()
  assert verdict.startswith("DOES NOT FIT: decode needs 303.00 GB") and "prefill" not in verdict
  assert "prompt cache 2.00 GB" in verdict and "turn rollout.generation_prompts" in verdict


def test_compiled_memory_is_remembered_by_program_text_and_slice(tmp_path, monkeypatch):
  import jax
  import jax.numpy as jnp
  from safework.plan.build import program_memory
  monkeypatch.setenv("SAFEWORK_PLAN_CACHE", str(tmp_path))
  lowered = jax.jit(lambda x: jnp.tanh(x @ x)).lower(jnp.zeros((64, 64)))
  first = program_memory(lowered, parse_topology("h100-8"))
  (remembered,) = tmp_path.glob("*.json")
  remembered.write_text(json.dumps({**first._asdict(), "temp": 12345}))
  assert program_memory(lowered, parse_topology("h100-8")).temp == 12345   # read back, not compiled again
  assert program_memory(lowered, parse_topology("h100-16")) == first       # another slice: compiled
  program_memory(jax.jit(lambda x: x @ x).lower(jnp.zeros((64, 64))), parse_topology("h100-8"))
  assert len(list(tmp_path.glob("*.json"))) == 3                             # another program: compiled


@pytest.mark.parametrize("preset", ["llama_tiny", "internvl_tiny"])
def test_the_other_backbones_compile_for_a_slice(preset):
  """A text-only Llama plans text prompts (no vision program); InternVL plans its tiles (a vision program whose
  argument holds every prompt's tiles)."""
  pytest.importorskip("libtpu", reason="compiling for TPU needs libtpu (requirements.txt installs it on Linux x86)")
  from safework.plan.build import plan_stage
  config = m3rl_kg.get_config("variant=3b")
  config.model.preset, config.model.max_pixels = preset, 56 * 56 * 3   # internvl_tiny: 3 tiles of 56 x 56
  config.mesh = dict(data=1, fsdp=4, tensor=1)
  config.reward.recipes, config.reward.verifiers = {"general_rule": [["math_rule", 1.0]]}, {}
  rollout = config.rollout
  rollout.prompts_per_rollout, rollout.samples_per_prompt, rollout.minibatch_size = 4, 2, 8
  rollout.max_prompt_length, rollout.max_new_tokens, rollout.compaction_levels = 64, 64, 0
  config.train.micro_batch_size, config.train.logprob_chunk = 4, 64
  plan = plan_stage(config, parse_topology("v5p-8"), log=lambda _: None)
  vision = ["vision"] if preset == "internvl_tiny" else []
  assert list(plan.programs) == vision + ["prefill", "decode", "logprobs", "train_step"]
  if vision:
    pixels = 4 * 3 * 3 * 56 * 56 * 4   # 4 prompts x 3 tiles, fp32, replicated
    assert dict(plan.programs["vision"].largest)["images"] == pytest.approx(pixels, rel=1e-3)
    assert plan.programs["vision"].flops > 0
  assert plan.fits
