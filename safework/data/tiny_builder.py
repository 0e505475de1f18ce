"""The embedded tiny suite as a tensorflow-datasets dataset (array_record; no TensorFlow).

Splits: `sft` (cold-start traces), `train` (RL prompts), `validation`, `test`. Deterministic in the config's
seed: building it twice gives the same records.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from pathlib import Path
from typing import Sequence

import PIL.Image
import tensorflow_datasets as tfds

from safework import distributed
from safework.data import tiny_suite
from safework.data.example import Example, Rows
from safework.data.user_builders import decode


@dataclasses.dataclass
class TinySuiteConfig(tfds.core.BuilderConfig):
  seed: int = 0
  sft: int = 2000
  train: int = 2000
  validation: int = 200
  test: int = 200
  text_only: bool = False   # no image tasks (for a text-only policy)


class TinySuite(tfds.core.GeneratorBasedBuilder):
  VERSION = tfds.core.Version("1.0.0")
  BUILDER_CONFIGS = [TinySuiteConfig(name="default")]

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "question": tfds.features.Text(), "answer": tfds.features.Text(), "label": tfds.features.Text(),
        "meta": tfds.features.Text(), "trace": tfds.features.Text(),
        "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)))}))

  def _split_generators(self, dl_manager):
    c = self.builder_config
    sizes = {"train": c.train, "validation": c.validation, "test": c.test}
    return {"sft": self._generate_examples(tiny_suite.sft_traces(c.sft, c.seed, c.text_only)),
            **{split: self._generate_examples(tiny_suite.generate(split, count, c.seed, text_only=c.text_only))
               for split, count in sizes.items()}}

  def _generate_examples(self, rows):
    for i, (example, trace) in enumerate(rows):
      yield i, {"question": example.question, "answer": example.answer or "", "label": example.label,
                "meta": json.dumps(dict(example.meta)), "trace": trace,
                "images": [PIL.Image.fromarray(im) for im in example.images]}


def build(data_dir: str | Path, config: TinySuiteConfig) -> TinySuite:
  builder = TinySuite(data_dir=str(data_dir), config=config, file_format="array_record")
  builder.download_and_prepare()
  return builder


def example_of(row: dict) -> tuple[Example, str]:
  """(Example, SFT trace) of a data-source row."""
  row = decode(row)
  return (Example(question=row["question"], images=tuple(row["images"]), label=row["label"],
                  answer=row["answer"] or None, meta=json.loads(row["meta"])), row["trace"])


def write_search_corpus(directory: str | Path, seed: int) -> Path:
  """The suite's search corpus (what its validation and test questions read) as a JSONL file in `directory`
  (written once, whole or not at all)."""
  path = Path(directory) / f"search_corpus_seed{seed}.jsonl"
  if distributed.is_main() and not path.is_file():
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(".partial")
    staging.write_text("".join(json.dumps(d) + "\n" for d in tiny_suite.search_corpus(seed)))
    os.replace(staging, path)
  distributed.wait_for_all()
  return path


class SuiteData:
  """The tiny suite as a stage's data (`safework.stages.StageData`). It brings no search corpus: its training
  questions bring their own documents."""
  reward = None
  search_corpus = None

  def __init__(self, sources: dict, seed: int):
    self.sources, self.seed = sources, seed

  def corpus(self) -> Sequence[str]:
    return tiny_suite.corpus(self.seed)

  def prompts(self, labels: Sequence[str], processor, max_length: int) -> Rows:
    from safework.stages import check_labels_present
    train = self.sources["train"]
    row_labels = [decode(row)["label"] for row in train]   # one pass: the counts and the stage's rows
    check_labels_present(labels, collections.Counter(row_labels), "the tiny suite's train split")
    return Rows(train, example_of, index=[i for i, label in enumerate(row_labels) if not labels or label in labels])

  def traces(self, processor, max_length: int) -> Rows:
    return Rows(self.sources["sft"], example_of, traces=True)
