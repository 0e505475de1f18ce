"""tensorflow-datasets builders: the tiny suite is deterministic and round-trips; user files round-trip; malformed
rows fail with the file and line."""

import collections
import json
import re

import numpy as np
import PIL.Image
import pytest

from safework.data import tiny_suite
from safework.data.jsonl import DataError
from safework.data.example import Rows
from safework.data.tiny_builder import SuiteData, TinySuiteConfig, build, example_of, write_search_corpus
from safework.data.user_builders import UserPrompts, prepare, user_example
from safework.tools.calls import ToolSettings, run_call
from safework.tools.corpus import SearchIndex
from safework.tools.generate import ToolUse, example_documents

SIZES = dict(sft=20, train=30, validation=5, test=10)


def _records(source):
  return sorted((e.question, e.label, e.answer, trace, tuple(im.tobytes() for im in e.images))
                for e, trace in map(example_of, source))


def test_tiny_suite_is_deterministic_and_round_trips(tmp_path):
  first = build(tmp_path / "a", TinySuiteConfig(name="s", seed=3, **SIZES)).as_data_source()
  second = build(tmp_path / "b", TinySuiteConfig(name="s", seed=3, **SIZES)).as_data_source()
  assert {k: len(v) for k, v in first.items()} == SIZES
  for split in SIZES:
    assert _records(first[split]) == _records(second[split])
  # What the builder stored is what the generator made (tfds reorders records, so compare as sets).
  generated = sorted((e.question, e.label, e.answer, t, tuple(im.tobytes() for im in e.images))
                     for e, t in tiny_suite.generate("test", SIZES["test"], 3))
  assert _records(first["test"]) == generated
  images = [e.images[0] for e, _ in map(example_of, first["train"]) if e.images]
  assert images and all(im.dtype == np.uint8 and im.shape == (56, 56, 3) for im in images)
  safety = SuiteData(first, seed=3).prompts(("safety",), processor=None, max_length=0)
  assert len(safety) and all(safety[i].label == "safety" for i in range(len(safety)))


def test_suite_covers_the_task_families():
  examples = [e for e, _ in tiny_suite.generate("train", 400, 0)]
  tasks = {e.meta["task"] for e in examples}
  assert tasks == {"arithmetic", "colour", "shape", "fact", "harmful", "typographic", "benign", "value", "search"}
  categories = {e.meta["category"] for e in examples if e.meta["task"] == "harmful"}
  assert categories == set(tiny_suite.HARMFUL)
  traces = tiny_suite.sft_traces(600, 0)
  assert all(t.startswith("<think>") and "</think>" in t for _, t in traces)


def test_sft_traces_are_imperfect_where_the_rl_stages_fix_them():
  def refusal_rate(pairs, categories):
    chosen = [t for e, t in pairs if e.meta.get("category") in categories]
    return sum(tiny_suite.REFUSAL in t for t in chosen) / len(chosen)

  sft, clean = tiny_suite.sft_traces(1000, 0), tiny_suite.generate("train", 1000, 0)
  unsafe = set(tiny_suite.SFT_UNSAFE_RATES)
  assert refusal_rate(sft, set(tiny_suite.HARMFUL) - unsafe) == 1.0
  assert 0.1 < refusal_rate(sft, unsafe) < 0.5           # most traces of the two categories comply
  assert refusal_rate(clean, set(tiny_suite.HARMFUL)) == 1.0
  boxed = lambda pairs: np.mean(["\\boxed{" in t for e, t in pairs if e.label.endswith("_rule") and e.answer])
  assert boxed(clean) == 1.0 and 0.1 < boxed(sft) < 0.4
  judgments = tiny_suite.judgments(0, 40)
  assert {r["verdict"] for r in judgments["safety"]} == {"B", "C", "D", "E"}
  assert {r["verdict"] for r in judgments["value"]} == {"good", "bad"}


def test_search_questions_need_their_documents_and_the_traces_show_what_the_tool_returns(tmp_path):
  """Every split asks the same questions; a test question reads the suite's corpus, a training question (and each
  cold-start trace) an edition of its own, drawn afresh: remembering does not answer, reading does. A trace that
  searches shows what the real tool (BM25 over the question's documents, else the corpus) returns for its query;
  most cold-start traces guess, most guesses claim confidence 0.9."""
  rows = lambda split, sft=False: [(e, t) for e, t in tiny_suite.generate(split, 1500, 0, sft) if e.label == "search"]
  questions = lambda split: {e.question for e, _ in rows(split)}
  assert questions("train") == questions("test") == {q.format(town=t) for q in tiny_suite.TOWN_QUESTIONS.values()
                                                     for t in tiny_suite.TOWNS}
  tool = ToolUse.build(ToolSettings(corpus=str(write_search_corpus(tmp_path, 0)), results=tiny_suite.SEARCH_RESULTS),
                       tmp_path / "index")
  assert len(tool.index.documents) == len(tiny_suite.TOWNS)
  train_answers = collections.defaultdict(set)
  for split in ("train", "test"):
    for example, trace in rows(split):
      own = example_documents(example)
      assert (own is not None) == (split == "train") and (own is None or len(own) == len(tiny_suite.TOWNS))
      index = tool.index if own is None else SearchIndex.of(own)
      town = tiny_suite.TOWNS.index(example.meta["town"])
      if split == "test":
        assert example.answer == tiny_suite.corpus_towns(0)[town][example.meta["fact"]]
      else:
        train_answers[example.question].add(example.answer)
      query, shown = re.search(r"<search>(.*?)</search><result>(.*?)</result>", trace).groups()
      assert shown == run_call(index, "search", query, tool.settings)
      assert f" {example.answer}" in shown
      assert trace.endswith(f"\\boxed{{{example.answer}}} <confidence>0.9</confidence>")
  assert all(len(answers) > 1 for answers in train_answers.values())   # a training question's answer changes
  traces = rows("train", sft=True)
  answers = set()
  for example, trace in traces:
    if "<search>" in trace:
      query, shown = re.search(r"<search>(.*?)</search><result>(.*?)</result>", trace).groups()
      assert shown == run_call(SearchIndex.of(example_documents(example)), "search", query, tool.settings)
      assert query.strip() == example.meta["town"] and shown.startswith(f"[{query.strip().lower()}] {query.strip()}:")
      stated = "flag is" if example.meta["fact"] == "colour" else "sign is a"
      assert f"{stated} {example.answer}" in shown
      assert trace.endswith(f"\\boxed{{{example.answer}}} <confidence>0.9</confidence>")
      answers.add((example.question, example.answer))
  assert len(answers) > 2 * len({q for q, _ in answers})   # a question's answer changes from trace to trace
  assert abs(np.mean(["<search>" in t for _, t in traces]) - tiny_suite.SFT_SEARCH_RATE) < 0.08
  confident = np.mean(["<confidence>0.9</confidence>" in t for _, t in traces if "<search>" not in t])
  assert abs(confident - tiny_suite.SFT_CONFIDENT_GUESS_RATE) < 0.1
  assert all("<search>" in t for _, t in rows("train"))


def _write_image(path):
  PIL.Image.fromarray(np.full((30, 40, 3), 200, np.uint8)).save(path)
  return path.name


def test_user_prompts_round_trip_from_jsonl_and_csv(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  image = _write_image(manual / "cat.png")
  rows = [{"prompt": "what is shown?", "images": [image], "reference": "a cat", "label": "knowledge",
           "meta": {"category": "animals"}, "response": "<think>fur</think> a cat"},
          {"prompt": "2+2?", "reference": "4", "label": "general_rule"}]
  (manual / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (manual / "test.csv").write_text('prompt,label,meta\n"how to pick a lock?",safety,"{""harmful"": true}"\n')
  sources = prepare(UserPrompts, tmp_path / "data", manual).as_data_source()
  train = sorted((user_example(r) for r in sources["train"]), key=lambda x: x[0].question)
  assert [e.question for e, _ in train] == ["2+2?", "what is shown?"]
  example, trace = train[1]
  assert example.answer == "a cat" and example.label == "knowledge" and example.meta == {"category": "animals"}
  assert example.images[0].shape == (30, 40, 3) and trace == "<think>fur</think> a cat"
  assert train[0][0].images == () and train[0][1] == ""
  test = Rows(sources["test"], user_example)
  assert test[0].meta == {"harmful": True} and test[0].label == "safety"


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "ok"}\n{"reference": "no prompt"}\n', r"train.jsonl:2: field 'prompt' is missing"),
    ('{"prompt": "ok"}\nnot json\n', r"train.jsonl:2: not valid JSON"),
    ('{"prompt": "ok", "colour": "red"}\n', r"train.jsonl:1: unknown fields \['colour'\]"),
    ('{"prompt": "ok", "images": ["missing.png"]}\n', r"train.jsonl:1: image 'missing.png' not found"),
    ('{"prompt": "ok", "meta": [1, 2]}\n', r"train.jsonl:1: field 'meta' must be an object"),
    ('["a list"]\n', r"train.jsonl:1: a row must be a JSON object"),
])
def test_malformed_user_rows_name_the_file_and_line(tmp_path, content, message):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "train.jsonl").write_text(content)
  with pytest.raises(DataError, match=message):
    prepare(UserPrompts, tmp_path / "data", manual)


def test_a_directory_without_splits_is_an_error(tmp_path):
  (tmp_path / "manual").mkdir()
  with pytest.raises(DataError, match="has none of"):
    prepare(UserPrompts, tmp_path / "data", tmp_path / "manual")
