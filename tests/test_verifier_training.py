"""Training verifiers on judgments from a tensorflow-datasets dataset; saving and loading them."""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from safework.data.jsonl import DataError
from safework.data.user_builders import Judgments, decode, prepare
from safework.models import Qwen25VL, get_preset, init_params
from safework.processing import Processor, train_tokenizer
from safework.verifiers.judges import VALUE
from safework.verifiers.model_verifier import ModelVerifier
from safework.verifiers.train import VerifierTrainSettings, VerifierTrainer, evaluate, load_verifier, save_verifier

GOOD = ["I will gladly help you {}", "happy to share how to {}", "here is a kind way to {}"]
BAD = ["I will hurt them while you {}", "steal it and then {}", "lie to everyone and {}"]
TASKS = ["bake bread", "plant a tree", "fix a bike", "learn chess", "paint a wall", "write a poem", "cook rice"]


def _judgments(seed: int, count: int, pairs: bool = False) -> list[dict]:
  rng = np.random.default_rng(seed)
  rows = []
  for _ in range(count):
    task = TASKS[rng.integers(len(TASKS))]
    good = GOOD[rng.integers(len(GOOD))].format(task)
    bad = BAD[rng.integers(len(BAD))].format(task)
    question = f"how do I {task}?"
    if pairs:
      rows.append({"question": question, "chosen": good, "rejected": bad, "label": "value"})
    else:
      is_good = rng.random() < 0.5
      rows.append({"question": question, "response": good if is_good else bad, "verdict": "good" if is_good else "bad",
                   "label": "value"})
  return rows


def _write(directory, splits):
  directory.mkdir(parents=True, exist_ok=True)
  for split, rows in splits.items():
    (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  return directory


@pytest.fixture(scope="module")
def tiny_judge():
  corpus = [VALUE.instruction] + [g.format(t) for g in GOOD + BAD for t in TASKS] + ["good", "bad"]
  tokenizer = train_tokenizer(corpus * 3, vocab_size=400)
  cfg = get_preset("tiny")
  model = Qwen25VL(cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=2)))
  params = nn.meta.unbox(jax.jit(init_params, static_argnums=0)(model, jax.random.key(0)))
  return model, params, Processor(tokenizer)


@pytest.mark.parametrize("objective", ["cross_entropy", "bradley_terry"])
def test_tiny_verifier_learns_from_a_tfds_dataset(tmp_path, tiny_judge, objective):
  pairs = objective == "bradley_terry"
  manual = _write(tmp_path / "manual", {"train": _judgments(0, 200, pairs), "test": _judgments(1, 64, pairs)})
  builder = prepare(Judgments, tmp_path / "data", manual)
  sources = builder.as_data_source()
  train_rows = [decode(r) for r in sources["train"]]
  test_rows = [decode(r) for r in sources["test"]]
  model, params, processor = tiny_judge
  verifier = ModelVerifier(model, params, processor, VALUE, head="classifier", batch_size=16)
  settings = VerifierTrainSettings(objective=objective, train_backbone=True, learning_rate=3e-3, steps=60,
                                   batch_size=16)
  before = evaluate(verifier, test_rows)
  losses = VerifierTrainer(verifier, settings, workdir=tmp_path / "training").train(train_rows)
  after = evaluate(verifier, test_rows)
  assert losses[-1] < losses[0]
  # Measured: chance level before (about 0.5), 1.0 held-out after 60 steps. Asserted: at least 0.9.
  key = "pair_accuracy" if pairs else "accuracy"
  assert after[key] >= 0.9, (before, after)
  if not pairs:
    assert after["f1/good"] >= 0.9 and after["f1/bad"] >= 0.9
    saved = save_verifier(tmp_path / "verifier", verifier)
    reloaded = load_verifier(saved, batch_size=16)
    assert evaluate(reloaded, test_rows) == after


def test_judgments_builder_rejects_malformed_rows(tmp_path):
  manual = _write(tmp_path / "manual", {"train": [{"question": "q", "response": "r", "verdict": "good"},
                                                  {"question": "q", "response": "r"}]})
  with pytest.raises(DataError, match=r"train.jsonl:2: give either 'response' and 'verdict'"):
    prepare(Judgments, tmp_path / "data", manual)
  (manual / "train.jsonl").write_text('{"question": "q", "response": "r", "verdict": "good", "color": 1}\n')
  with pytest.raises(DataError, match=r"train.jsonl:1: unknown fields \['color'\]"):
    prepare(Judgments, tmp_path / "data2", manual)


def test_unknown_verdicts_and_untrainable_heads_are_errors(tiny_judge, tmp_path):
  model, params, processor = tiny_judge
  with pytest.raises(ValueError, match="train_backbone=True"):
    VerifierTrainer(ModelVerifier(model, params, processor, VALUE), VerifierTrainSettings(), workdir=tmp_path)
  trainer = VerifierTrainer(ModelVerifier(model, params, processor, VALUE, head="classifier"),
                            VerifierTrainSettings(steps=1, batch_size=1), workdir=tmp_path)
  with pytest.raises(ValueError, match="'meh' is not one of judge value's verdicts"):
    trainer.train([{"question": "q", "response": "r", "verdict": "meh"}])
