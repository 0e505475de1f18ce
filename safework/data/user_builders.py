"""tensorflow-datasets builders for data users bring as files (array_record output, no TensorFlow needed).

Put `train.jsonl` / `validation.jsonl` / `test.jsonl` (or `.csv`) in a directory and pass it as `manual_dir`:

- `UserPrompts`: RL/eval/SFT rows: `prompt` (required), `images` (paths), `reference` (gold answer), `label` (the
  reward recipe: safety, value, knowledge, ...), `meta` (a JSON object: harm category, constraints, `documents`
  that the question's searches read instead of the corpus, ...), `response` (an SFT trace
  `<think> ... </think> answer`). A builder config keeps only some labels (a stage's).
- `Judgments`: labelled judgments to train verifiers: `question` (required), `images`, `answer` (gold), `label`,
  and either `response` + `verdict` (classification) or `chosen` + `rejected` (preference pairs).

Malformed rows fail with the file and line (`safework.data.jsonl.DataError`), before any model is loaded:
`check_prompts` reads the raw files first (labels, prompt lengths, images), and the build decodes every image.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

import tensorflow_datasets as tfds

from safework.data.example import Example
from safework.data.jsonl import DataError, image_size, read_rows, resolve_image
from safework.tools.corpus import question_documents

SPLITS = ("train", "validation", "test")


class _ManualRows:
  """Shared machinery: one file per split in manual_dir, rows checked by `read_rows`."""
  VERSION = tfds.core.Version("1.0.0")
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Put train/validation/test .jsonl or .csv files in manual_dir."
  SCHEMA: dict[str, type] = {}
  REQUIRED: tuple[str, ...] = ()

  def _split_generators(self, dl_manager):
    return {split: self._generate_examples(path) for split, path in split_files(dl_manager.manual_dir).items()}

  def _generate_examples(self, path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    for line, row in read_rows(path, self.SCHEMA, self.REQUIRED):
      if not self._keep(row):
        continue
      row["images"] = [resolve_image(path, line, path.parent, name) for name in row["images"]]
      for image in row["images"]:
        image_size(path, line, image, decode=True)
      yield f"{path.name}:{line}", self._encode(path, line, row)

  def _keep(self, row: dict) -> bool:
    return True

  def _encode(self, path: Path, line: int, row: dict) -> dict:
    return row


@dataclasses.dataclass
class UserPromptsConfig(tfds.core.BuilderConfig):
  labels: tuple[str, ...] = ()   # keep rows with these labels only (empty: all rows)


def prompts_config(labels: Sequence[str] = ()) -> UserPromptsConfig:
  labels = tuple(sorted(labels))
  name = "all" if not labels else "labels_" + hashlib.sha1(",".join(labels).encode()).hexdigest()[:12]
  return UserPromptsConfig(name=name, labels=labels)


class UserPrompts(_ManualRows, tfds.core.GeneratorBasedBuilder):
  SCHEMA = {"prompt": str, "images": list, "reference": str, "label": str, "meta": dict, "response": str}
  REQUIRED = ("prompt",)
  BUILDER_CONFIGS = [prompts_config()]

  def _info(self):
    text = {k: tfds.features.Text() for k in self.SCHEMA if k != "images"}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        **text, "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)))}))

  def _keep(self, row: dict) -> bool:
    return not self.builder_config.labels or (row["label"] or "normal") in self.builder_config.labels

  def _encode(self, path, line, row):
    return dict(row, label=row["label"] or "normal", meta=json.dumps(row["meta"]))


class Judgments(_ManualRows, tfds.core.GeneratorBasedBuilder):
  SCHEMA = {"question": str, "images": list, "answer": str, "label": str, "response": str, "verdict": str,
            "chosen": str, "rejected": str}
  REQUIRED = ("question",)

  def _info(self):
    text = {k: tfds.features.Text() for k in self.SCHEMA if k != "images"}
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        **text, "images": tfds.features.Sequence(tfds.features.Image(shape=(None, None, 3)))}))

  def _encode(self, path, line, row):
    classification = bool(row["response"]) and bool(row["verdict"])
    preference = bool(row["chosen"]) and bool(row["rejected"])
    if classification == preference:
      raise DataError(f"{path}:{line}: give either 'response' and 'verdict', or 'chosen' and 'rejected'")
    return row


def split_files(manual_dir: str | Path) -> dict[str, Path]:
  """The split files of a user data directory ({split}.jsonl, else {split}.csv)."""
  manual = Path(manual_dir)
  if not manual.is_dir():
    raise DataError(f"data directory {manual} does not exist")
  files = {}
  for split in SPLITS:
    found = [manual / f"{split}{suffix}" for suffix in (".jsonl", ".csv") if (manual / f"{split}{suffix}").is_file()]
    if found:
      files[split] = found[0]
  if not files:
    raise DataError(f"{manual} has none of {[s + '.jsonl' for s in SPLITS]} (or .csv)")
  return files


def prepare(builder_cls, data_dir: str | Path, manual_dir: str | Path, config: tfds.core.BuilderConfig | None = None):
  """Builds (once) the array_record dataset of `builder_cls` from the files in `manual_dir`."""
  split_files(manual_dir)   # clear errors before tfds asserts on the directory
  builder = builder_cls(data_dir=str(data_dir), file_format="array_record", config=config)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def check_prompts(manual_dir: str | Path, split: str, processor, max_length: int,
                  known_labels: Sequence[str] | None = None, need_response: bool = False) -> dict[str, int]:
  """Checks a split's raw rows before anything is built or loaded: known labels, prompt lengths (images counted
  from their headers), readable images, a trace where SFT needs one. Returns the row count per label."""
  files = split_files(manual_dir)
  if split not in files:
    raise DataError(f"{manual_dir} has no {split} split; it has {sorted(files)}")
  path, counts = files[split], {}
  for line, row in read_rows(path, UserPrompts.SCHEMA, UserPrompts.REQUIRED):
    label = row["label"] or "normal"
    if known_labels is not None and label not in known_labels:
      from safework.experiment import close_matches
      raise DataError(f"{path}:{line}: label {label!r}{close_matches(label, known_labels)} is not a known label; "
                      f"known labels: {sorted(known_labels)}")
    if need_response and not row["response"]:
      raise DataError(f"{path}:{line}: SFT rows need a 'response' (the trace <think> ... </think> answer)")
    try:
      question_documents(row["meta"], f"{path}:{line}")
    except ValueError as e:
      raise DataError(str(e)) from None
    sizes = [image_size(path, line, resolve_image(path, line, path.parent, name)) for name in row["images"]]
    example = Example(question=row["prompt"], images=tuple(row["images"]), label=label)
    tokens = example.prompt_tokens(processor, sizes)
    if tokens > max_length:
      raise DataError(f"{path}:{line}: the prompt has {tokens} tokens (images expanded), more than the "
                      f"{max_length} allowed; shorten it, lower max_pixels, or raise the limit")
    counts[label] = counts.get(label, 0) + 1
  return counts


def decode(row: dict[str, Any]) -> dict[str, Any]:
  """A data-source row with text as `str` (tfds returns bytes)."""
  return {k: v.decode() if isinstance(v, bytes) else v for k, v in row.items()}


def user_example(row: dict[str, Any]) -> tuple[Example, str]:
  """(Example, SFT trace or "") of a `UserPrompts` row."""
  row = decode(row)
  return (Example(question=row["prompt"], images=tuple(row["images"]), label=row["label"] or "normal",
                  answer=row["reference"] or None, meta=json.loads(row["meta"] or "{}")), row["response"])
