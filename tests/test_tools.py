"""The search tool: the corpus and its BM25 index, tool calls, and generation that pauses for tools."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safework.data.example import Example
from safework.data.jsonl import DataError
from safework.data.user_builders import check_prompts
from safework.models import forward, from_pretrained, get_preset
from safework.processing import Processor
from safework.rewards.base import Rewards
from safework.rewards.constraint import FALSE_CERTAIN, ConstraintSettings, dual_ascent, lagrangian, with_false_certain
from safework.rl.losses import LossSettings, policy_objective
from safework.rl.rollout import Rollout, training_rows
from safework.sampling import PromptBatch, Sampler, SamplingSettings
from safework.sft import SFTSettings, sft_rows
from safework.tools.calls import ToolSettings, pending_call, result_tokens, run_call, trace_tokens
from safework.tools.corpus import Document, SearchIndex, question_documents, read_corpus
from safework.tools.generate import ToolUse, generate_with_tools
from safework.verifiers.calibration import calibration_metrics, confidence_or_certain, stated_confidence
from safework.verifiers.recipes import rule_scorer

DOCUMENTS = [
    {"id": "zorbin", "title": "Zorbin", "text": "The zorbin is a blue bird that nests on Mount Kel."},
    {"id": "kel", "title": "Mount Kel", "text": "Mount Kel is the highest mountain of Varnia."},
    {"id": "varnia", "title": "Varnia", "text": "Varnia is a small country that exports glass."},
]


def _corpus(path, documents=DOCUMENTS):
  path.write_text("".join(json.dumps(d) + "\n" for d in documents))
  return path


def test_a_bad_corpus_line_is_named_with_the_fix(tmp_path):
  bad = tmp_path / "bad.jsonl"
  for text, message in [('{"id": "a", "title": "t", "text": "x"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
                        ('{"id": "a", "title": "t"}\n', r"bad.jsonl:1: \['text'\] missing or not strings"),
                        ('{"id": "a", "title": "t", "text": "x"}\n{"id": "a", "title": "u", "text": "y"}\n',
                         r"bad.jsonl:2: id 'a' is already used by .*bad.jsonl:1"),
                        ("\n", "holds no documents")]:
    bad.write_text(text)
    with pytest.raises(ValueError, match=message):
      read_corpus(bad)
  with pytest.raises(FileNotFoundError, match="is not a file"):
    read_corpus(tmp_path / "missing.jsonl")


class _OneToken:
  """A processor for which every prompt is one token (only the rows' other checks matter)."""
  render = staticmethod(lambda messages: "")
  count_tokens = staticmethod(lambda text, image_sizes: 1)


def test_a_questions_own_documents_are_checked_with_its_file_and_line(tmp_path):
  assert question_documents({"task": "x"}, "q") is None
  assert question_documents({"documents": DOCUMENTS}, "q")[1] == Document(**DOCUMENTS[1])
  for documents, message in [({"id": "a"}, r"train.jsonl:3: meta.documents must be a list .* got dict"),
                             ([DOCUMENTS[0], {"id": "b", "title": "t"}],
                              r"train.jsonl:3: meta.documents\[1\]: \['text'\] missing or not strings"),
                             ([DOCUMENTS[0], DOCUMENTS[0]],
                              r"meta.documents\[1\]: id 'zorbin' is already used by .*meta.documents\[0\]"),
                             ([], r"train.jsonl:3: meta.documents holds no documents")]:
    with pytest.raises(ValueError, match=message):
      question_documents({"documents": documents}, "train.jsonl:3")
  # A user's split file: the bad row is named before anything is built.
  (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": "a", "label": "search"}) + "\n" + json.dumps(
      {"prompt": "b", "label": "search", "meta": {"documents": [{"id": 1, "title": "t", "text": "x"}]}}) + "\n")
  with pytest.raises(DataError, match=r"train.jsonl:2: meta.documents\[0\]: \['id'\] missing"):
    check_prompts(tmp_path, "train", processor=_OneToken(), max_length=10)


def test_the_index_is_built_once_per_corpus_and_finds_by_bm25(tmp_path):
  corpus = _corpus(tmp_path / "corpus.jsonl")
  index = SearchIndex.build(corpus, tmp_path / "index")
  assert [d.id for d in index.search("what colour is the zorbin bird", 3)] == ["zorbin"]
  assert [d.id for d in index.search("Kel mountain", 3)][0] == "kel"
  assert index.search("the of and", 3) == [] and index.read(" varnia ").title == "Varnia"
  assert index.read("../../etc/passwd") is None   # an id is looked up, never opened
  stamp = (tmp_path / "index" / "corpus.sha256").stat().st_mtime_ns
  SearchIndex.build(corpus, tmp_path / "index")
  assert (tmp_path / "index" / "corpus.sha256").stat().st_mtime_ns == stamp   # the same corpus: read back
  _corpus(corpus, DOCUMENTS + [{"id": "glass", "title": "Glass", "text": "Glass of Varnia is green."}])
  assert SearchIndex.build(corpus, tmp_path / "index").read("glass") is not None   # a changed corpus: rebuilt


def test_calls_are_read_at_the_end_of_the_text_and_results_fit_their_budget(tmp_path, tiny_tokenizer):
  index = SearchIndex.build(_corpus(tmp_path / "corpus.jsonl"), tmp_path / "index")
  assert pending_call("<think>hmm <search> zorbin colour </search>\n") == ("search", "zorbin colour")
  assert pending_call("<search>zorbin</search> so it is blue") is None and pending_call("<read>x</search>") is None
  settings = ToolSettings(results=2)
  assert run_call(index, "search", "zorbin", settings).startswith("[zorbin] Zorbin: The zorbin is a blue bird")
  assert run_call(index, "read", "kel", settings) == "Mount Kel: Mount Kel is the highest mountain of Varnia."
  assert run_call(index, "read", "nowhere", settings) == "no document with id 'nowhere'"
  tokens = result_tokens(tiny_tokenizer, run_call(index, "read", "kel", settings), 30)
  text = tiny_tokenizer.decode(tokens)
  assert len(tokens) == 30 and text.startswith("<result>Mount Kel") and text.endswith("</result>")
  with pytest.raises(ValueError, match="tools.result_tokens=12 cannot hold the result tags"):
    result_tokens(tiny_tokenizer, "text", 12)
  with pytest.raises(ValueError, match="tool setting chunk_tokens must be at least 1"):
    ToolSettings(chunk_tokens=0).validate()


def test_sft_trains_the_policys_tokens_of_a_trace_and_never_the_tools(chat_checkpoint):
  """A written trace is tokenized as a rollout holds it (the policy's text and each result encoded apart, the
  result through `result_tokens`), and the SFT loss mask is zero exactly on the result's tokens."""
  processor = Processor.from_pretrained(chat_checkpoint)
  tokenizer = processor.tokenizer
  before, found, after = "<think>look up<search>kel</search>", "Mount Kel: it is high.", " high</think> done"
  trace = f"{before}<result>{found}</result>{after}"
  ids, from_tool = trace_tokens(tokenizer, trace)
  encode = lambda text: tokenizer.encode(text, add_special_tokens=False)
  result = result_tokens(tokenizer, found, 10 ** 6)
  assert ids == encode(before) + result + encode(after)
  assert from_tool == [False] * len(encode(before)) + [True] * len(result) + [False] * len(encode(after))
  assert trace_tokens(tokenizer, "<think>no tool</think> fine") == (encode("<think>no tool</think> fine"),
                                                                      [False] * len(encode("<think>no tool</think> fine")))
  model, _ = from_pretrained(chat_checkpoint)
  settings = SFTSettings(steps=1, batch_size=2, prompt_length=64, response_length=96)
  rows, _ = sft_rows([Example("q"), Example("q")], [trace, "<think>x</think> y"], processor, model.config, settings)
  end = encode(tokenizer.eos_token)
  mask = np.asarray(rows.loss_mask)
  expected = np.zeros((2, 96), np.float32)
  expected[0, :len(ids) + len(end)] = [not t for t in from_tool] + [True] * len(end)
  expected[1, :len(encode("<think>x</think> y") + end)] = 1
  np.testing.assert_array_equal(mask, expected)
  response_ids = np.asarray(rows.input_ids)[0, -96:][:len(ids)]
  np.testing.assert_array_equal(response_ids, ids)


@dataclasses.dataclass(frozen=True)
class _CallFirst:
  """A logits processor: every `period`-th row spells `sequence` at the start of each decode call; no row draws the
  `never` ids (the model's vision placeholders, which a text forward would read as images)."""
  sequence: tuple[int, ...]
  period: int
  never: tuple[int, ...]

  def __call__(self, logits, history, step):
    logits = logits.at[:, jnp.asarray(self.never)].set(-jnp.inf)
    forced = jnp.asarray(self.sequence)[jnp.minimum(step, len(self.sequence) - 1)]
    rows = (jnp.arange(logits.shape[0]) % self.period == 0) & (step < len(self.sequence))
    only = jnp.where(jnp.arange(logits.shape[-1]) == forced, 0.0, -jnp.inf)
    return jnp.where(rows[:, None], only, logits)


def test_generation_pauses_for_the_tool_and_resumes_with_its_result_in_context(chat_checkpoint, tmp_path):
  """Rows 0 and 2 search at the start of every chunk (a forcing processor), rows 1 and 3 never do: these equal plain
  greedy decoding; the results are the tool's; every policy log-prob equals one forward pass over the prompt and the
  whole response, results included."""
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  tokenizer = processor.tokenizer
  index = SearchIndex.build(_corpus(tmp_path / "corpus.jsonl"), tmp_path / "index")
  texts = [processor.render([{"role": "user", "content": [{"type": "text", "text": q}]}]) for q in ("a cat", "hi")]
  batch = processor(texts)
  call = tuple(tokenizer.encode("<search>zorbin", add_special_tokens=False) +
               tokenizer.encode("</search>", add_special_tokens=False))
  tools = ToolSettings(max_calls=1, results=1, result_tokens=40, chunk_tokens=len(call) + 2)
  cfg = model.config
  vision_ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
  sampling = SamplingSettings(max_new_tokens=2 * len(call) + 4, temperature=0.0, pad_id=0,
                              logits_processor=_CallFirst(call, 2, vision_ids))
  sampler = Sampler(model)
  out = generate_with_tools(sampler, params, batch, jax.random.key(0), sampling, ToolUse(tools, index), tokenizer,
                            num_samples=2)
  expected_result = result_tokens(tokenizer, run_call(index, "search", "zorbin", tools), 40)
  plain = sampler.generate(params, batch, jax.random.key(0), sampling.replace(
      logits_processor=_CallFirst(call, 2 ** 30, vision_ids)), num_samples=2)   # (row 0 would call: not compared)
  for r in range(4):
    n = out.lengths[r]
    tokens, from_tool = out.tokens[r, :n], out.tool_mask[r, :n]
    if r % 2:   # never calls: plain greedy decoding, chunk after chunk
      assert out.calls[r] == 0 and not from_tool.any()
      np.testing.assert_array_equal(tokens, np.asarray(plain.tokens)[r, :n])
    else:
      assert out.calls[r] == 1 and out.read_tokens[r] == len(expected_result)
      assert tokens[:len(call)].tolist() == list(call) and tokens[from_tool].tolist() == expected_result
      assert tokens[len(call):len(call) + len(expected_result)].tolist() == expected_result   # right after the call
      assert (out.logprobs[r, :n][from_tool] == 0).all()
    assert n - from_tool.sum() == sampling.max_new_tokens   # the policy's own budget (no end token drawn)
    ids, mask = np.asarray(batch["input_ids"])[r // 2], np.asarray(batch["attention_mask"])[r // 2]
    logits = np.asarray(forward(model, params, input_ids=np.concatenate([ids, tokens])[None],
                                attention_mask=np.concatenate([mask, np.ones(n, mask.dtype)])[None]), np.float64)
    logits = logits[0, len(ids) - 1:-1]
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    np.testing.assert_allclose(out.logprobs[r, :n][~from_tool], logp[np.arange(n), tokens][~from_tool], atol=1e-4)


def test_a_question_with_documents_of_its_own_searches_them_and_the_others_the_corpus(chat_checkpoint, tmp_path):
  """Both prompts search "zorbin" first thing: the one that brings documents reads its own (where the zorbin is a
  red fish), the other the corpus. Without a corpus, a question without documents is named."""
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  tokenizer = processor.tokenizer
  index = SearchIndex.build(_corpus(tmp_path / "corpus.jsonl"), tmp_path / "index")
  batch = processor([processor.render([{"role": "user", "content": [{"type": "text", "text": q}]}])
                     for q in ("a cat", "hi")])
  call = tuple(tokenizer.encode("<search>zorbin</search>", add_special_tokens=False))
  tools = ToolSettings(max_calls=1, results=1, result_tokens=80, chunk_tokens=len(call))
  cfg = model.config
  vision_ids = (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id)
  sampling = SamplingSettings(max_new_tokens=len(call) + 2, temperature=0.0, pad_id=0,
                              logits_processor=_CallFirst(call, 1, vision_ids))
  own = [Document("fish", "Zorbin", "The zorbin is a red fish of Lake Um.")]
  out = generate_with_tools(Sampler(model), params, batch, jax.random.key(0), sampling, ToolUse(tools, index),
                            tokenizer, documents=[own, None])
  read = [tokenizer.decode(out.tokens[r, :out.lengths[r]][out.tool_mask[r, :out.lengths[r]]]) for r in range(2)]
  assert out.calls.tolist() == [1, 1]
  assert "[fish] Zorbin: The zorbin is a red fish" in read[0] and "blue bird" not in read[0]
  assert "[zorbin] Zorbin: The zorbin is a blue bird" in read[1]
  with pytest.raises(ValueError, match=r"prompt 1 of the batch brings no documents .* the tool has no corpus"):
    generate_with_tools(Sampler(model), params, batch, jax.random.key(0), sampling, ToolUse(tools, None), tokenizer,
                        documents=[own, None])


# -- calibration and the constraint ---------------------------------------------------------------------------------

def test_stated_confidence_and_calibration_by_hand():
  assert stated_confidence("<think>x</think> \\boxed{4} <confidence>0.8</confidence>") == 0.8
  assert stated_confidence("<think><confidence>0.2</confidence></think> 4") is None   # only the final answer's
  assert stated_confidence("4 <confidence>1.5</confidence>") is None and confidence_or_certain("4") == 1.0
  assert rule_scorer("confidence_format")([None] * 3, ["<think>a</think> 4 <confidence>.5</confidence>",
                                                       "<think>a</think> 4 <confidence>high</confidence>",
                                                       "4 <confidence>0.5</confidence>"], [0] * 3).tolist() == [1, 0, 0]
  correct = np.array([1, 0, 0, 1])
  confidence = np.array([0.9, 0.95, 0.3, 0.25])
  metrics = calibration_metrics(correct, confidence, threshold=0.7)
  assert metrics["false_certain_rate"] == 0.25 and metrics["accuracy"] == 0.5
  assert np.isclose(metrics["brier"], (0.1 ** 2 + 0.95 ** 2 + 0.3 ** 2 + 0.75 ** 2) / 4)
  # bins: [0.2, 0.3) holds 0.25 (right), [0.3, 0.4) holds 0.3 (wrong), [0.9, 1.0] holds 0.9 (right), 0.95 (wrong)
  ece = 0.25 * abs(1 - 0.25) + 0.25 * abs(0 - 0.3) + 0.5 * abs(0.5 - 0.925)
  assert np.isclose(metrics["ece"], ece)


def test_the_constraint_penalises_false_certain_rows_and_its_multiplier_ascends():
  settings = ConstraintSettings(target=0.1, threshold=0.7, step_size=2.0).validate()
  examples = [Example("q", label="search", answer="4"), Example("q", label="search", answer="4"),
              Example("q", label="safety")]
  responses = ["\\boxed{5} <confidence>0.9</confidence>", "\\boxed{5} <confidence>0.2</confidence>", "no"]
  scored = Rewards(total=np.array([0.0, 0.0, 1.0]), components={"math_rule": np.array([0.0, 0.0, 0.0])},
                   applicable={"math_rule": np.array([True, True, False])})
  scored, rows = with_false_certain(examples, responses, scored, settings)
  assert rows.tolist() == [True, True, False]
  assert scored.components[FALSE_CERTAIN].tolist() == [1.0, 0.0, 0.0] and scored.means()[FALSE_CERTAIN] == 0.5
  np.testing.assert_allclose(lagrangian(scored.total, scored.components[FALSE_CERTAIN], rows, 3.0), [-3.0, 0.0, 1.0])
  assert dual_ascent(0.5, rate=0.5, settings=settings) == 0.5 + 2.0 * 0.4   # violated: up
  assert dual_ascent(0.5, rate=0.0, settings=settings) == 0.5 - 2.0 * 0.1   # slack: down
  assert dual_ascent(0.1, rate=0.0, settings=settings) == 0.0 and dual_ascent(9.9, 1.0, settings) == 10.0
  with pytest.raises(ValueError, match="reward component 'knowledge'"):
    with_false_certain(examples, responses, scored, ConstraintSettings(correctness="knowledge"))


def test_a_tool_token_never_receives_gradient():
  """Training rows of a rollout with tool results: the loss's gradient with respect to each token's log-prob is zero
  on every token a tool wrote (policy loss and KL alike), and not on the policy's."""
  responses = np.array([[5, 6, 7, 8, 9, 0], [5, 6, 7, 8, 0, 0]], np.int32)
  tool_mask = np.array([[0, 1, 1, 0, 0, 0], [0, 0, 1, 1, 0, 0]], bool)
  prompts = PromptBatch(input_ids=np.array([[1, 2], [1, 3]], np.int32), attention_mask=np.ones((2, 2), np.int32))
  logp = np.full(responses.shape, -1.0, np.float32)
  rollout = Rollout(prompts=prompts, responses=responses, lengths=np.array([5, 4]), done=np.ones(2, bool),
                    policy_logp=logp, behaviour_logp=logp, rewards=np.array([1.0, 0.0]), components={},
                    trained=np.ones(2, bool), advantages=np.array([1.0, -1.0], np.float32), ref_logp=logp - 0.5,
                    tool_mask=tool_mask)
  batch, _ = training_rows(rollout, get_preset("tiny"), LossSettings(kl_in="loss", kl_beta=0.1))
  mask = np.asarray(batch.loss_mask)
  assert (mask[tool_mask] == 0).all() and mask[~tool_mask & (np.arange(6) < [[5], [4]])].all()
  settings = LossSettings(kl_in="loss", kl_beta=0.1)
  loss = lambda logp: policy_objective(settings, logp, batch.old_logp, batch.ref_logp, batch.advantages,
                                       batch.loss_mask, 2, float(mask.sum()), 6)[0]
  grad = np.asarray(jax.grad(loss)(jnp.asarray(logp) + 0.1))
  assert (grad[tool_mask] == 0).all() and (grad[mask > 0] != 0).all()
