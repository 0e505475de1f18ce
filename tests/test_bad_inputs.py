"""Bad input is named early (the thing, the file and line, the fix), before any model weights are read."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import transformers

from experiments import m3rl_kg, m3rl_svkg
from safework import stages
from safework.data.example import Example
from safework.data.jsonl import DataError
from safework.models import from_pretrained
from safework.models.checkpoint import CheckpointError
from safework.processing import Processor, Video, VisionSettings
from safework.sample import check_lengths
from safework.verifiers.build import reward_spec
from safework.verifiers.judges import SAFETY
from safework.verifiers.model_verifier import ModelVerifier
from tests import hf_reference as ref

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_weights(monkeypatch):
  """Fails the test if a stage gets as far as reading the policy's weights."""
  def loaded(*args, **kwargs):
    raise AssertionError("the policy's weights were loaded before the bad input was found")
  monkeypatch.setattr(stages, "policy_params", loaded)


def _data(tmp_path, rows, name="train.jsonl"):
  data = tmp_path / "data"
  data.mkdir(exist_ok=True)
  (data / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
  return data


def _kg(tmp_path, data, checkpoint):
  config = m3rl_kg.get_config(f"variant=tiny,data={data},init={checkpoint}")
  return stages.from_config(config, tmp_path / "work")


def _png(path, size=(40, 30)):
  PIL.Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)
  return path.name


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "2+2?", "label": "general_rule"}, {"prompt": "capital?", "label": "knowlege_rule"}],
     r"train.jsonl:2: label 'knowlege_rule' \(did you mean 'knowledge_rule' or 'knowledge'\?\) is not a known label"),
    ([{"prompt": " ".join(["word"] * 200), "label": "general_rule"}],
     r"train.jsonl:1: the prompt has \d+ tokens \(images expanded\), more than the 80 allowed"),
    ([{"prompt": "what is it?", "images": ["missing.png"], "label": "general_rule"}],
     r"train.jsonl:1: image 'missing.png' not found"),
], ids=["unknown_label", "prompt_too_long", "missing_image"])
def test_user_rows_are_checked_before_the_model_loads(tmp_path, chat_checkpoint, no_weights, rows, message):
  with pytest.raises(DataError, match=message):
    _kg(tmp_path, _data(tmp_path, rows), chat_checkpoint)()


def test_a_misspelt_recipe_label_is_named_not_left_out(tmp_path, chat_checkpoint, no_weights):
  data = _data(tmp_path, [{"prompt": "2+2?", "label": "general_rule"},
                          {"prompt": "capital?", "label": "knowledge_rule"}])
  config = m3rl_kg.get_config(f"variant=tiny,data={data},init={chat_checkpoint}")
  config.reward.recipes = {"general_rule": [["math_rule", 1.0]], "knowlege_rule": [["math_rule", 1.0]]}
  with pytest.raises(DataError, match=r"a recipe for label 'knowlege_rule' \(did you mean 'knowledge_rule'\?\), but "
                                      r"no row of .* has it"):
    stages.from_config(config, tmp_path / "work")()


def test_corrupt_images_and_empty_files_name_the_file_and_line(tmp_path, chat_checkpoint, no_weights):
  data = _data(tmp_path, [{"prompt": "ok?", "label": "general_rule"}])
  (data / "broken.png").write_bytes((data / _png(data / "full.png")).read_bytes()[:60])   # header only
  (data / "garbage.png").write_text("not an image at all")
  for image, line in (("garbage.png", 2), ("broken.png", 2)):
    _data(tmp_path, [{"prompt": "ok?", "label": "general_rule"},
                     {"prompt": "what is it?", "images": [image], "label": "general_rule"}])
    shutil.rmtree(tmp_path / "work", ignore_errors=True)
    with pytest.raises(DataError, match=rf"train.jsonl:{line}: image .*{image} cannot be read"):
      _kg(tmp_path, data, chat_checkpoint)()
  (data / "train.jsonl").write_text("\n")
  with pytest.raises(DataError, match=r"train.jsonl holds no rows"):
    _kg(tmp_path, data, chat_checkpoint)()


def test_rows_of_other_stages_are_left_out_not_trained_on(tmp_path, chat_checkpoint, monkeypatch):
  data = _data(tmp_path, [{"prompt": "2+2?", "label": "general_rule", "reference": "4"},
                          {"prompt": "lock picking?", "label": "safety"},
                          {"prompt": "capital of France?", "label": "knowledge_rule", "reference": "Paris"}])
  seen = {}

  class Stop(Exception):
    pass

  def capture(**kwargs):
    seen["prompts"] = [kwargs["prompts"][i] for i in range(len(kwargs["prompts"]))]
    raise Stop
  monkeypatch.setattr(stages, "RLTrainer", capture)
  with pytest.raises(Stop):
    _kg(tmp_path, data, chat_checkpoint)()
  assert sorted(e.question for e in seen["prompts"]) == ["2+2?", "capital of France?"]


@pytest.mark.parametrize("change,message", [
    (lambda c: c.loss.update(policy_loss="cpdg"), r"policy_loss='cpdg' is not one of"),
    (lambda c: c.reward.verifiers.safety.update(heads="verdict"),
     r"unknown keys \['heads'\] for VerifierSpec \(did you mean 'head'\?\)"),
    (lambda c: c.reward.recipes.update(safety=[["safty", 1.0]]),
     r"the recipe of label 'safety' uses 'safty' \(did you mean 'safety'\?\)"),
    (lambda c: c.reward.update(rules={"efficiency": {"max_token": 10}}),
     r"reward rule 'efficiency': unknown arguments \['max_token'\]"),
    (lambda c: c.rollout.update(temperature=0.0), r"temperature must be positive"),
    (lambda c: c.optim.update(freeze_prefixes=["visaul"]), r"freeze prefix 'visaul' matches no parameter"),
], ids=["loss_name", "verifier_key", "recipe_component", "rule_argument", "greedy_rollout", "freeze_prefix"])
def test_typos_in_settings_fail_before_the_model_loads(tmp_path, chat_checkpoint, no_weights, change, message):
  config = m3rl_svkg.get_config(f"variant=3b,data={tmp_path},init={chat_checkpoint},safety_verifier=/s,"
                                "value_verifier=/v,knowledge_verifier=/k")
  change(config)
  with pytest.raises(ValueError, match=message):
    stages.from_config(config, tmp_path / "work")()


def test_a_verifier_without_a_path_is_named():
  with pytest.raises(ValueError, match=r"verifier 'safety' needs a path"):
    reward_spec({"recipes": {"safety": [["safety", 1.0]]}, "verifiers": {"safety": {"judge": "safety"}}})


def test_truncated_weights_and_missing_tokenizer_files_are_named(tmp_path, chat_checkpoint):
  broken = tmp_path / "broken"
  shutil.copytree(chat_checkpoint, broken)
  weights = broken / "model.safetensors"
  weights.write_bytes(weights.read_bytes()[:5000])
  with pytest.raises(CheckpointError, match=rf"{weights} cannot be read as safetensors .* truncated or damaged"):
    from_pretrained(broken)
  for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
    (broken / name).unlink(missing_ok=True)
  with pytest.raises(FileNotFoundError, match=rf"{broken} has no tokenizer files"):
    Processor.from_pretrained(broken)


def test_sample_refuses_a_prompt_or_budget_beyond_the_positions(chat_checkpoint):
  check_lengths(100, 412, 512)
  with pytest.raises(ValueError, match=r"lower --max_new_tokens to at most 412"):
    check_lengths(100, 413, 512)
  with pytest.raises(ValueError, match=r"shorten the prompt"):
    check_lengths(600, 1, 512)
  with pytest.raises(ValueError, match=r"--max_new_tokens=0: generate at least one token"):
    check_lengths(10, 0, 512)
  result = subprocess.run([sys.executable, "-m", "safework.sample", f"--checkpoint={chat_checkpoint}",
                           "--prompt=hello", "--max_new_tokens=100000"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  assert result.returncode == 1 and "Traceback" not in result.stderr
  assert "more than the model's 512 positions: lower --max_new_tokens to at most" in result.stderr


def test_a_judge_given_a_video_judges_it_like_transformers(chat_checkpoint):
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  processor.video_settings = VisionSettings(min_pixels=56 * 56, max_pixels=56 * 56 * 2)
  frames = np.random.default_rng(0).integers(0, 256, (4, 56, 84, 3), dtype=np.uint8)
  examples = [Example("what happens in the video?", videos=(Video(frames, fps=2.0),), label="safety"),
              Example("what happens in the video?", videos=(Video(frames[::-1].copy(), fps=2.0),), label="safety")]
  verifier = ModelVerifier(model, params, processor, SAFETY, batch_size=2)
  ours = verifier.verdict_logprobs(examples, ["<think>x</think> a scene"] * 2)
  arrays = verifier.batch_arrays(examples, ["<think>x</think> a scene"] * 2)
  assert "pixel_values_videos" in arrays and (arrays["input_ids"] == ref.VIDEO).sum() > 0
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(chat_checkpoint,
                                                                       attn_implementation="eager").eval()
  logits = ref.hf_forward(hf, **{k: v.astype(np.int64) if v.dtype.kind == "i" else v for k, v in arrays.items()
                                 if k != "padding_images"}).logits[:, -1].float()
  expected = torch.log_softmax(logits, -1)[:, torch.from_numpy(verifier.verdict_ids).long()].numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  assert not np.allclose(ours[0], ours[1])   # the frames matter: the video is judged, not dropped
