"""Every experiment file, for every variant, builds a config that parses into valid stages; knobs are strict."""

import pytest

from experiments import common, deliberative_search, efficient_rl, m3rl_kg, m3rl_svkg, sft, tiny_safeladder, toy_rl
from safework.experiment import parse_arg, section, settings
from safework.ladder import Ladder
from safework.policy import PolicySettings
from safework.rl.optim import OptimSettings
from safework.rl.rollout import RolloutSettings
from safework.stages import RLStage, SFTStage, parse_stage
from safework.training import TrainSettings

STAGES = {"sft": sft, "m3rl_kg": m3rl_kg, "m3rl_svkg": m3rl_svkg, "efficient_rl": efficient_rl,
          "deliberative_search": deliberative_search}
JUDGES = ("safety", "value")   # the tiny ladder's trained judges, scorers of its svkg stages


@pytest.mark.parametrize("variant", common.VARIANTS)
@pytest.mark.parametrize("name", sorted(STAGES))
@pytest.mark.parametrize("runlocal", [False, True])
def test_stage_files_build_valid_configs(name, variant, runlocal):
  arg = (f"variant={variant}" + (",runlocal" if runlocal else "") + ",init=/ckpt/previous,data=/data/rows" +
         ("" if name == "sft" else ",knowledge_verifier=/k") +
         (",safety_verifier=/s,value_verifier=/v" if name in ("m3rl_svkg", "efficient_rl") else ""))
  config = STAGES[name].get_config(arg)
  assert config.job == "train" and config.kind == ("sft" if name == "sft" else "rl")
  assert config.model.checkpoint == "/ckpt/previous" and config.data.manual_dir == "/data/rows"
  settings(PolicySettings, {k: v for k, v in config.model.items() if k != "checkpoint"})
  assert set(config.mesh) == {"data", "fsdp", "tensor"}
  stage = parse_stage(config, extra_scorers=JUDGES if variant == "tiny" else (), top_level=True)
  assert isinstance(stage, SFTStage if name == "sft" else RLStage)
  if isinstance(stage, RLStage):
    assert stage.rollout.rows % stage.rollout.minibatch_size == 0 and stage.reward.labels


@pytest.mark.parametrize("variant", ["7b", "72b"])
def test_large_variants_carry_the_papers_hyperparameters(variant):
  knobs = f"variant={variant},safety_verifier=/s,value_verifier=/v,knowledge_verifier=/k"
  kg = parse_stage(m3rl_kg.get_config(f"variant={variant},knowledge_verifier=/k"), top_level=True)
  svkg = parse_stage(m3rl_svkg.get_config(knobs), top_level=True)
  efficient = parse_stage(efficient_rl.get_config(knobs), top_level=True)
  for stage in (kg, svkg, efficient):
    assert stage.optim.learning_rate == 1e-6 and stage.optim.b2 == 0.95 and stage.optim.weight_decay == 0.01
    assert (stage.rollout.prompts_per_rollout, stage.rollout.samples_per_prompt) == (128, 8)
    assert stage.rollout.max_new_tokens == 8192 and stage.rollout.minibatch_size == 128
    assert stage.loss.kl_estimator == "k3" and stage.loss.kl_beta == 0.001
  assert kg.loss.policy_loss == "ppo" and svkg.loss.policy_loss == "cpgd"
  assert svkg.reward.verifiers["safety"].path == "/s" and svkg.reward.verifiers["value"].judge == "value"
  assert efficient.reward.verifiers == svkg.reward.verifiers
  assert efficient.rollout.advantage == "length_conditional"
  # Advantages on the reward's scale: divided by 8192 they would vanish next to the KL term.
  assert efficient.rollout.length_scale == 1.0 and efficient.rollout.length_alpha < 1
  config = m3rl_svkg.get_config(knobs)
  assert config.model.dtype == "bfloat16" and config.model.remat == "full"


@pytest.mark.parametrize("size,stages", [
    (None, ["sft", "m3rl_kg", "m3rl_svkg", "efficient_rl", "deliberative_search"]),
    ("runlocal", ["sft", "m3rl_kg", "m3rl_svkg"]),
    ("smoke", ["sft", "m3rl_kg", "m3rl_svkg", "efficient_rl"])])
def test_tiny_ladder_and_toy_configs(size, stages):
  ladder = Ladder.from_config(tiny_safeladder.get_config(size))
  assert list(ladder.stages) == stages
  runlocal = size is not None
  toy = parse_stage(toy_rl.get_config("runlocal" if runlocal else None), top_level=True)
  assert toy.reward is None and toy.rollout.num_rollouts == (6 if runlocal else 20)
  if runlocal:
    assert ladder.tools is None
    return
  search = ladder.stages["deliberative_search"]
  # The suite's corpus (the ladder writes it), searched by every checkpoint's evaluation as by the stage.
  assert ladder.tools == search.tools and search.tools.corpus == "" and search.reward.labels == ("search",)
  assert search.response_length == search.rollout.max_new_tokens + search.tools.max_calls * search.tools.result_tokens


@pytest.mark.parametrize("variant", ["tiny", "7b"])
def test_the_deliberative_search_stage_reads_its_corpus_and_constrains_its_correctness(variant):
  stage = parse_stage(deliberative_search.get_config(f"variant={variant},corpus=/data/wiki.jsonl,data=/q"),
                      top_level=True)
  assert stage.tools.corpus == "/data/wiki.jsonl" and stage.constraint.correctness == "math_rule"
  assert stage.reward.recipes["search"] == (("math_rule", 1.0), ("confidence_format", 0.25))
  judged = parse_stage(deliberative_search.get_config(f"variant={variant},knowledge_verifier=/k"), top_level=True)
  assert judged.constraint.correctness == "knowledge" and judged.reward.verifiers["knowledge"].path == "/k"
  if variant != "tiny":
    assert stage.tools.results == 3 and stage.rollout.max_new_tokens == 8192 and stage.loss.policy_loss == "cpgd"


def test_sections_hold_every_setting_with_its_one_default():
  rollout = section(RolloutSettings, max_new_tokens=64)
  assert set(rollout) == set(RolloutSettings.__dataclass_fields__)
  assert settings(RolloutSettings, rollout) == RolloutSettings(max_new_tokens=64)
  rollout.top_k = 5   # a None default is a typed placeholder: it can be set, from the command line too
  assert settings(RolloutSettings, rollout).top_k == 5
  with pytest.raises(ValueError, match=r"unknown keys \['max_new_token'\] for RolloutSettings \(did you mean "
                                       r"'max_new_tokens'\?\)"):
    section(RolloutSettings, max_new_token=64)


def test_unknown_arguments_bad_values_and_unknown_keys_are_errors():
  with pytest.raises(ValueError, match=r"unknown config argument 'varient' \(did you mean 'variant'\?\)"):
    sft.get_config("varient=7b")
  with pytest.raises(ValueError, match="variant='13b'"):
    sft.get_config("variant=13b")
  with pytest.raises(ValueError, match=r"runlocal='ture' is not a boolean: write runlocal=true"):
    sft.get_config("runlocal=ture")
  with pytest.raises(ValueError, match=r"unknown keys \['lr'\] for OptimSettings; known keys"):
    settings(OptimSettings, {"lr": 1.0})
  with pytest.raises(ValueError, match="on_bad_update='skp'"):
    settings(TrainSettings, {"on_bad_update": "skp"})
  assert parse_arg("runlocal,steps=3", runlocal=False, steps=1).steps == 3
  with pytest.raises(ValueError, match="steps='three' is not a int"):
    parse_arg("steps=three", steps=1)
