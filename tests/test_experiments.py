"""Every experiment file, for every variant, builds a config whose sections make valid settings."""

import pytest

from experiments import common, efficient_rl, m3rl_kg, m3rl_svkg, sft, tiny_safeladder, toy_rl
from safework.evaluation import EvalSettings
from safework.experiment import parse_arg, settings
from safework.policy import PolicySettings
from safework.rl.losses import LossSettings
from safework.rl.optim import OptimSettings
from safework.rl.rollout import RolloutSettings
from safework.rl.trainer import TrainSettings
from safework.sft import SFTSettings

STAGES = {"sft": sft, "m3rl_kg": m3rl_kg, "m3rl_svkg": m3rl_svkg, "efficient_rl": efficient_rl}


def _validate_stage(stage):
  if stage.kind == "sft":
    settings(SFTSettings, stage.sft)
  else:
    rollout = settings(RolloutSettings, stage.rollout)
    settings(LossSettings, stage.loss)
    settings(TrainSettings, stage.train)
    assert stage.labels and set(stage.reward.recipes) <= set(stage.labels) | {"jailbreak"}
    assert rollout.rows % rollout.minibatch_size == 0
  settings(OptimSettings, stage.optim)


@pytest.mark.parametrize("variant", common.VARIANTS)
@pytest.mark.parametrize("name", sorted(STAGES))
@pytest.mark.parametrize("runlocal", [False, True])
def test_stage_files_build_valid_configs(name, variant, runlocal):
  arg = f"variant={variant}" + (",runlocal" if runlocal else "") + ",init=/ckpt/previous,data=/data/rows"
  config = STAGES[name].get_config(arg)
  assert config.job == STAGES[name].stage(variant).kind
  assert config.model.checkpoint == "/ckpt/previous" and config.data.manual_dir == "/data/rows"
  settings(PolicySettings, {k: v for k, v in config.model.items() if k != "checkpoint"})
  assert set(config.mesh) == {"data", "fsdp", "tensor"}
  _validate_stage(config)


@pytest.mark.parametrize("variant", ["7b", "72b"])
def test_large_variants_carry_the_papers_hyperparameters(variant):
  kg = m3rl_kg.get_config(f"variant={variant}")
  svkg = m3rl_svkg.get_config(f"variant={variant},safety_verifier=/s,value_verifier=/v,knowledge_verifier=/k")
  for config in (kg, svkg):
    assert config.optim.learning_rate == 1e-6 and config.optim.b2 == 0.95 and config.optim.weight_decay == 0.01
    assert (config.rollout.prompts_per_rollout, config.rollout.samples_per_prompt) == (128, 8)
    assert config.rollout.minibatch_size == 128 and config.loss.kl_estimator == "k3" and config.loss.kl_beta == 0.001
    assert config.model.dtype == "bfloat16" and config.model.remat == "full"
  assert kg.loss.policy_loss == "ppo" and svkg.loss.policy_loss == "cpgd"
  assert svkg.reward.verifiers.safety.path == "/s" and svkg.reward.verifiers.value.judge == "value"
  assert efficient_rl.get_config(f"variant={variant}").rollout.advantage == "length_conditional"


@pytest.mark.parametrize("runlocal", [False, True])
def test_tiny_ladder_and_toy_configs(runlocal):
  config = tiny_safeladder.get_config("runlocal" if runlocal else None)
  assert config.stage_order == ["sft", "m3rl_kg", "m3rl_svkg", "efficient_rl"]
  for name in config.stage_order:
    _validate_stage(config.stages[name])
  settings(EvalSettings, config.eval)
  settings(PolicySettings, config.model)
  toy = toy_rl.get_config("runlocal" if runlocal else None)
  settings(RolloutSettings, toy.rollout)


def test_unknown_arguments_and_keys_are_errors():
  with pytest.raises(ValueError, match="unknown config argument 'varient'"):
    sft.get_config("varient=7b")
  with pytest.raises(ValueError, match="variant='13b'"):
    sft.get_config("variant=13b")
  with pytest.raises(ValueError, match=r"unknown keys \['lr'\] for OptimSettings; known keys"):
    settings(OptimSettings, {"lr": 1.0})
  assert parse_arg("runlocal,steps=3", runlocal=False, steps=1).steps == 3
