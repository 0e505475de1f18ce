"""Inference-time intervention: steps of the reasoning, and resuming after a human edit."""

import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest

from safework import sharding
from safework.benchmarks import pipeline
from safework.data.example import Example
from safework.experiment import section, settings
from safework.intervention.judges import parse_guides
from safework.intervention.edits import edited_prefix, resume_after_edit, split_steps
from safework.intervention.search import StepSearch
from safework.intervention.settings import SearchSettings
from safework.models import forward, from_pretrained
from safework.models.checkpoint import abstract_params
from safework.processing import Processor
from safework.report import write_report
from safework.sampling import Sampler, SamplingSettings
from safework.sampling.masks import BannedSequences, banned_next
from safework.sampling.tokens import NO_TOKEN


def test_steps_split_at_delimiters_and_an_edit_drops_what_followed():
  text = "<think>first step.\n\nsecond step.\n\nthird"
  assert split_steps(text) == ["<think>first step.\n\n", "second step.\n\n", "third"]
  assert "".join(split_steps(text, ("\n\n", ". "))) == text
  assert split_steps("a. b\n\nc", ("\n\n", ". ")) == ["a. ", "b\n\n", "c"]
  assert edited_prefix(text, 1, "a safer second step.\n\n") == "<think>first step.\n\na safer second step.\n\n"
  assert edited_prefix(text, 3, " more") == text + " more"   # after the last step: a continuation
  with pytest.raises(ValueError, match="the response has 3 steps; step 4 cannot be replaced"):
    edited_prefix(text, 4, "x")


def test_resuming_after_an_edit_equals_generating_from_the_edited_text(chat_checkpoint, tmp_path):
  """Two rows (one with an image) with edits of different lengths: prefill once, extend by the edits, decode; the
  tokens equal a fresh prefill of prompt + edit."""
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  image = tmp_path / "image.png"
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(image)
  texts = [processor.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]),
           processor.render([{"role": "user", "content": [{"type": "text", "text": "what colour is the square?"}]}])]
  batch = processor(texts, images=[image])
  edits = ["<think>let me think", "<think>the answer is 4</think> the"]
  settings = SamplingSettings(max_new_tokens=6, temperature=0.0, eos_ids=())
  sampler = Sampler(model)
  prompt = sampler.prefill(params, batch, settings.max_new_tokens, extra_slots=16)
  resumed = resume_after_edit(sampler, params, prompt, processor.tokenizer, edits, settings, jax.random.key(0))

  rows = [np.asarray(ids)[np.asarray(mask) > 0].tolist() + processor.tokenizer.encode(edit, add_special_tokens=False)
          for ids, mask, edit in zip(batch["input_ids"], batch["attention_mask"], edits)]
  width = max(map(len, rows))
  fresh = dict(batch, input_ids=np.array([[0] * (width - len(r)) + r for r in rows], np.int32),
               attention_mask=np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32))
  expected = sampler.generate(params, fresh, jax.random.key(0), settings)
  np.testing.assert_array_equal(np.asarray(resumed.tokens), np.asarray(expected.tokens))
  np.testing.assert_allclose(np.asarray(resumed.logprobs), np.asarray(expected.logprobs), atol=1e-4)
  again = resume_after_edit(sampler, params, prompt, processor.tokenizer, edits, settings, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(resumed.tokens))   # the prompt was kept
  other = resume_after_edit(sampler, params, prompt, processor.tokenizer, ["a cat", "a mat on"], settings,
                            jax.random.key(0))
  assert not np.array_equal(np.asarray(other.logprobs), np.asarray(resumed.logprobs))   # the edit is what it reads


# -- the step search ---------------------------------------------------------------------------------------------

def test_banned_sequences_mask_the_token_that_would_complete_them():
  banned = BannedSequences(((3,), (5, 6, 7)))
  history = np.array([[5, 6, NO_TOKEN], [5, 1, NO_TOKEN], [6, 5, 6]])
  logits = banned(jnp.zeros((3, 8)), jnp.asarray(history), jnp.asarray(2))
  expected = np.zeros((3, 8))
  expected[:, 3] = -np.inf      # a one-token sequence: never
  expected[0, 7] = -np.inf      # only row 0 ends with 5, 6
  np.testing.assert_array_equal(np.asarray(logits), expected)
  early = banned(jnp.zeros((3, 8)), jnp.asarray(history), jnp.asarray(1))   # after one token: no head complete
  assert np.isinf(np.asarray(early)[:, 7]).sum() == 0
  assert banned_next([9, 5, 6], banned.sequences) == {7} and banned_next([6], banned.sequences) == set()


@pytest.fixture(scope="module")
def policy(chat_checkpoint):
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  texts = [processor.render([{"role": "user", "content": [{"type": "text", "text": q}]}])
           for q in ("what colour is the square?", "a cat")]
  batch = processor(texts)
  examples = [Example(question=q) for q in ("what colour is the square?", "a cat")]
  return model, params, processor, Sampler(model), batch, examples


def _distinct_characters(examples, responses, lengths):
  """A deterministic stand-in verifier that every candidate can score differently on."""
  return np.array([len(set(r)) / 40 for r in responses], np.float32)


def _search(policy, settings, scorer=_distinct_characters, max_new_tokens=8):
  model, params, processor, sampler, _, _ = policy
  sampling = SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0, pad_id=0)
  return StepSearch(sampler, processor.tokenizer, {"safety": scorer}, settings, sampling)


def test_one_greedy_candidate_per_fixed_size_step_is_plain_greedy_decoding(policy):
  """Steps of 3 tokens, each resumed from the kept cache: the same tokens and log-probs as one decode call."""
  model, params, processor, sampler, batch, examples = policy
  settings = SearchSettings(candidates=1, delimiters=(), step_tokens=3, temperature=0.0)
  results = _search(policy, settings, max_new_tokens=9).run(params, batch, examples, jax.random.key(0))
  plain = sampler.generate(params, batch, jax.random.key(0), SamplingSettings(max_new_tokens=9, temperature=0.0))
  for row, result in enumerate(results):
    assert [len(processor.tokenizer.encode(s.text, add_special_tokens=False)) > 0 for s in result.steps] == [True] * 3
    np.testing.assert_array_equal(result.tokens, np.asarray(plain.tokens)[row])
    np.testing.assert_allclose(result.logprobs, np.asarray(plain.logprobs)[row], atol=1e-5)
    assert result.generated_tokens == 9 and not result.finished


def _teacher_forced_logprobs(model, params, batch, row, tokens):
  ids = np.asarray(batch["input_ids"])[row:row + 1]
  mask = np.asarray(batch["attention_mask"])[row:row + 1]
  full = dict(input_ids=np.concatenate([ids, [tokens]], 1),
              attention_mask=np.concatenate([mask, [[1] * len(tokens)]], 1))
  logits = np.asarray(forward(model, params, **full), np.float64)[0, ids.shape[1] - 1:-1]
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  return logp[np.arange(len(tokens)), tokens]


@pytest.mark.parametrize("beam", [1, 2])
def test_rerank_keeps_the_best_candidates_and_continues_from_their_caches(policy, beam):
  """Each kept step is the best its beam drew (beam 1), and the response's log-probs, read from the caches of the
  kept candidates step after step, equal a teacher-forced forward of prompt + response (a wrong row taken or put
  would change them)."""
  model, params, processor, sampler, batch, examples = policy
  settings = SearchSettings(candidates=3, beam=beam, delimiters=(), step_tokens=3, temperature=1.0)
  results = _search(policy, settings, max_new_tokens=9).run(params, batch, examples, jax.random.key(1))
  for row, result in enumerate(results):
    assert len(result.steps) == 3 and all(len(s.candidates) == 3 * (beam if i == 0 else 1)
                                          for i, s in enumerate(result.steps[:1]))
    if beam == 1:
      assert all(s.score == max(c.score for c in s.candidates) for s in result.steps)
    assert result.score == _distinct_characters(None, [result.response], None)[0]
    assert result.response == processor.tokenizer.decode(list(result.tokens), skip_special_tokens=True)
    np.testing.assert_allclose(result.logprobs, _teacher_forced_logprobs(model, params, batch, row, result.tokens),
                               atol=1e-4)
    assert result.generated_tokens == 9 * 3 * beam


def test_masking_resamples_without_the_first_tokens_of_rejected_candidates(policy):
  """Every candidate rejected: greedy resamples draw the 2nd and 3rd most likely first tokens."""
  model, params, processor, sampler, batch, examples = policy
  settings = SearchSettings(candidates=1, delimiters=(), step_tokens=2, temperature=0.0, threshold=0.5, resamples=2)
  never = lambda examples, responses, lengths: np.zeros(len(responses), np.float32)
  results = _search(policy, settings, scorer=never, max_new_tokens=2).run(params, batch, examples, jax.random.key(0))
  first = np.asarray(sampler.prefill(params, batch, 2).last_logits)
  for row, result in enumerate(results):
    (step,) = result.steps
    assert step.resampled == 2 and len(step.candidates) == 3
    firsts = [c.tokens[0] for c in step.candidates]
    np.testing.assert_array_equal(firsts, np.argsort(-first[row])[:3])
    assert result.tokens[0] == firsts[-1] and result.generated_tokens == 6


def test_a_reviewed_step_resumes_from_the_persons_text(policy):
  """A person rewrites step 0 of row 1: the row continues as greedy decoding from prompt + their text would."""
  model, params, processor, sampler, batch, examples = policy
  settings = SearchSettings(candidates=1, delimiters=(), step_tokens=3, temperature=0.0)
  seen = []

  def review(prompt, step, text, score):
    seen.append((prompt, step))
    return "a cat sits" if (prompt, step) == (1, 0) else None

  results = _search(policy, settings, max_new_tokens=9).run(params, batch, examples, jax.random.key(0), review,
                                                           edit_slots=8)
  person = processor.tokenizer.encode("a cat sits", add_special_tokens=False)
  after = 9 - len(person)   # tokens row 1 generates after the edit, in steps of 3
  assert sorted(seen) == [(0, s) for s in range(3)] + [(1, s) for s in range(1 + -(-after // 3))]
  edited = results[1]
  assert edited.steps[0].edited and edited.steps[0].text == "a cat sits"
  assert edited.tokens[:len(person)] == tuple(person)
  prompt = sampler.prefill(params, batch, 9, extra_slots=16)
  resumed = resume_after_edit(sampler, params, prompt, processor.tokenizer, ["", "a cat sits"],
                              SamplingSettings(max_new_tokens=after, temperature=0.0), jax.random.key(0))
  np.testing.assert_array_equal(edited.tokens[len(person):], np.asarray(resumed.tokens)[1])
  assert np.isnan(edited.logprobs[:len(person)]).all() and edited.generated_tokens == 3 + after


def test_search_settings_and_guides_name_what_is_wrong(tmp_path, tiny_tokenizer):
  assert (SearchSettings.for_mode("mask").candidates, SearchSettings.for_mode("mask").threshold) == (1, 0.5)
  assert SearchSettings.for_mode("rerank").threshold is None
  assert SearchSettings.for_mode("rerank+mask", candidates=8).mode == "rerank+mask"
  with pytest.raises(ValueError, match="intervention 'mask' draws one candidate per step"):
    SearchSettings.for_mode("mask", candidates=4)
  with pytest.raises(ValueError, match="'rerank' does not mask"):
    SearchSettings.for_mode("rerank", threshold=0.3)
  with pytest.raises(ValueError, match="not one of"):
    SearchSettings.for_mode("beam")
  with pytest.raises(ValueError, match="2 candidates drawn greedily would be identical"):
    SearchSettings(candidates=2, temperature=0.0).validate()
  gated = SearchSettings(recipes=(("safety", (("safety", 1.0),)), ("*", (("value", 2.0),))))
  assert gated.recipe("safety") == (("safety", 1.0),) and gated.recipe("math") == (("value", 2.0),)
  assert SearchSettings(recipes=(("safety", (("safety", 1.0),)),)).recipe("math") == ()
  assert settings(SearchSettings, section(SearchSettings, recipes=gated.recipes)) == gated   # experiment files
  with pytest.raises(ValueError, match=r"weighs verifiers \['value'\], which were not given"):
    StepSearch(None, tiny_tokenizer, {"safety": _distinct_characters}, gated, SamplingSettings())
  with pytest.raises(ValueError, match="give KIND:CHECKPOINT"):
    parse_guides(["safety"])
  with pytest.raises(FileNotFoundError, match="is not a directory"):
    parse_guides([f"safety:{tmp_path / 'missing'}"])
  with pytest.raises(ValueError, match="KIND must be one of"):
    parse_guides([f"harmfulness:{tmp_path}"])
  config = pipeline.default_config()
  with pytest.raises(ValueError, match="needs a verifier to guide it"):
    pipeline.search_settings("rerank", {}, config)
  with pytest.raises(ValueError, match="add --intervention"):
    pipeline.search_settings(None, {"safety": str(tmp_path)}, config)
  assert pipeline.search_settings("mask", {"safety": str(tmp_path)}, config).threshold == 0.5


def test_the_report_marks_evaluations_with_an_intervention(tmp_path):
  plain = {"stage": "sft", "step": 3, "capability": 0.1, "safety": 0.5, "value": 1.0, "format": 1.0,
           "response_tokens": 20.0}
  searched = dict(plain, intervention="rerank", safety=0.8, generated_tokens=90.0, seconds_per_answer=0.2)
  write_report(tmp_path, [plain, searched], {})
  table = (tmp_path / "report.md").read_text()
  assert "| sft | 3 | 0.100 | 0.500 | 1.000 | 1.000 | 20.000 | nan | nan |" in table
  assert "| sft + rerank | 3 | 0.100 | 0.800 | 1.000 | 1.000 | 20.000 | 90.000 | 0.200 |" in table
  assert (tmp_path / "ai45.png").stat().st_size > 0


def test_the_search_on_a_mesh_equals_the_search_on_one_device(policy, chat_checkpoint):
  """Beams of 2, 2 candidates, every step rejected once and resampled with masks (take, put and the masks on
  sharded caches): the same responses, scores and log-probs as on one device."""
  model, params, processor, sampler, batch, examples = policy
  settings = SearchSettings(candidates=2, beam=2, delimiters=(), step_tokens=3, threshold=0.99, resamples=1)
  sampling = SamplingSettings(max_new_tokens=6, temperature=0.0, pad_id=0)
  expected = StepSearch(sampler, processor.tokenizer, {"safety": _distinct_characters}, settings,
                        sampling).run(params, batch, examples, jax.random.key(3))
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  _, sharded = from_pretrained(chat_checkpoint, shardings=lambda m: sharding.param_shardings(
      abstract_params(m), mesh, sharding.DEFAULT_RULES))
  with jax.set_mesh(mesh):
    got = StepSearch(Sampler(model, mesh=mesh), processor.tokenizer, {"safety": _distinct_characters}, settings,
                     sampling).run(sharded, batch, examples, jax.random.key(3))
  assert all(step.resampled == 1 for result in expected for step in result.steps)
  for a, b in zip(got, expected):
    assert (a.tokens, a.score, a.steps) == (b.tokens, b.score, b.steps)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
