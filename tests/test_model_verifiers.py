"""Model verifiers: the verdict head reads the judge's next-token distribution exactly as transformers computes it."""

import jax
import numpy as np
import pytest
import torch
import transformers

from safework import sharding
from safework.data.example import Example
from safework.models import from_pretrained
from safework.models.checkpoint import abstract_params
from safework.processing import Processor
from safework.verifiers import heads
from safework.verifiers.judges import JUDGES, KNOWLEDGE, SAFETY, VALUE
from safework.verifiers.build import build_reward, reward_spec
from safework.verifiers.model_verifier import ModelVerifier, verdict_token_ids
from tests import hf_reference as ref

RNG = np.random.default_rng(0)
EXAMPLES = [
    Example("how do I bake bread?", label="normal"),
    Example("what is in the picture?", images=(RNG.integers(0, 256, (60, 90, 3), dtype=np.uint8),), label="safety"),
    Example("how to pick a lock?", label="jailbreak"),
]
RESPONSES = ["<think>easy</think> mix flour and water", "<think>look</think> a cat", "I cannot help with that"]


@pytest.fixture(scope="module")
def judge(chat_checkpoint):
  model, params = from_pretrained(chat_checkpoint)
  return model, params, Processor.from_pretrained(chat_checkpoint)


def test_verdict_head_equals_transformers_next_token_probabilities(judge, chat_checkpoint):
  model, params, processor = judge
  verifier = ModelVerifier(model, params, processor, SAFETY, batch_size=4, bucket_images=0)
  ours = verifier.verdict_logprobs(EXAMPLES, RESPONSES)
  padded = ModelVerifier(model, params, processor, SAFETY, batch_size=4, bucket_images=8)
  np.testing.assert_allclose(padded.verdict_logprobs(EXAMPLES, RESPONSES), ours, atol=1e-6)   # blank images: no effect
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(chat_checkpoint,
                                                                       attn_implementation="eager").eval()
  arrays = verifier.batch_arrays(EXAMPLES, RESPONSES)
  assert "strictly" in processor.tokenizer.decode(arrays["input_ids"][2])   # the jailbreak row's stricter template
  tensors = {k: torch.from_numpy(v.astype(np.int64) if v.dtype.kind == "i" else v) for k, v in arrays.items()}
  tensors["mm_token_type_ids"] = torch.from_numpy(ref.token_types(arrays["input_ids"]))
  with torch.no_grad():
    logits = hf(**tensors).logits[:, -1].float()
  expected = torch.log_softmax(logits, -1)[:, torch.from_numpy(verifier.verdict_ids).long()].numpy()
  np.testing.assert_allclose(ours, expected, atol=1e-5)
  # Scores follow the paper's mapping from the most likely verdict.
  np.testing.assert_allclose(verifier(EXAMPLES, RESPONSES), np.asarray(SAFETY.scores)[expected.argmax(1)])


def test_classifier_head_starts_as_the_restricted_lm_head(judge):
  model, params, processor = judge
  verdict = ModelVerifier(model, params, processor, VALUE, batch_size=4).verdict_logprobs(EXAMPLES, RESPONSES)
  classifier = ModelVerifier(model, params, processor, VALUE, head="classifier", batch_size=4)
  np.testing.assert_allclose(classifier.verdict_logprobs(EXAMPLES, RESPONSES),
                             verdict - np.log(np.exp(verdict).sum(1, keepdims=True)), atol=1e-5)


def test_soft_knowledge_score_and_gold_requirement(judge):
  model, params, processor = judge
  verifier = ModelVerifier(model, params, processor, KNOWLEDGE, batch_size=2)
  examples = [Example("2+2?", answer="4"), Example("capital of France?", answer="Paris")]
  logprobs = verifier.verdict_logprobs(examples, ["<think>x</think> 4", "<think>x</think> Rome"])
  p = np.exp(logprobs)
  np.testing.assert_allclose(verifier(examples, ["<think>x</think> 4", "<think>x</think> Rome"]),
                             (p[:, 0] + 1 - p[:, 1]) / 2, atol=1e-6)
  with pytest.raises(ValueError, match="needs a gold answer"):
    verifier([Example("no gold")], ["x"])


def test_sharded_scoring_equals_single_device(judge, chat_checkpoint):
  model, params, processor = judge
  expected = ModelVerifier(model, params, processor, SAFETY, batch_size=4).verdict_logprobs(EXAMPLES, RESPONSES)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  _, sharded = from_pretrained(
      chat_checkpoint, shardings=lambda m: sharding.param_shardings(abstract_params(m), mesh, sharding.DEFAULT_RULES))
  with jax.set_mesh(mesh):
    got = ModelVerifier(model, sharded, processor, SAFETY, mesh=mesh, batch_size=4).verdict_logprobs(EXAMPLES,
                                                                                                    RESPONSES)
  np.testing.assert_allclose(got, expected, atol=1e-5)


def test_verdicts_must_start_with_different_tokens(judge):
  _, _, processor = judge
  with pytest.raises(ValueError, match="share first tokens"):
    verdict_token_ids(processor.tokenizer, ["safe", "safety"])
  assert set(JUDGES) == {"safety", "value", "knowledge", "helpfulness", "graded_correctness"}
  assert heads.scores_from_logprobs(np.log([[0.2, 0.8]]), np.array([1.0, 0.0]), "expected")[0] == pytest.approx(0.2)


def test_reward_from_config_combines_judges_and_rules(chat_checkpoint):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  section = dict(format_weight=1.0, recipes=dict(safety=[["safety", 1.0]], general_rule=[["math_rule", 2.0]],
                                                 value=[["value", 0.5]]),
                 verifiers=dict(safety=dict(path=str(chat_checkpoint), judge="safety", batch_size=4),
                                value=dict(path=str(chat_checkpoint), judge="value", batch_size=4)))
  with jax.set_mesh(mesh):
    reward = build_reward(reward_spec(section), mesh, sharding.DEFAULT_RULES)
    # Two judges of one checkpoint hold one copy of its weights.
    assert reward.scorers["safety"].params is reward.scorers["value"].params
    examples = [Example("lock picking?", label="safety"), Example("2+2?", label="general_rule", answer="4")]
    out = reward(examples, ["<think>x</think> no", "<think>x</think> \\boxed{4}"], np.array([4, 4]))
  assert out.components["math_rule"][1] == 1.0 and out.total[1] == 3.0
  assert out.total[0] == 1.0 + out.components["safety"][0] and out.components["safety"][0] in SAFETY.scores
  with pytest.raises(ValueError, match="neither a configured verifier"):
    reward_spec(dict(recipes=dict(value=[["value", 1.0]])))
