"""One prompt of a task: the question (with images or videos), its row label and reference answer."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from safework import distributed


@dataclasses.dataclass(frozen=True)
class Example:
  """A prompt as the policy sees it, plus what the rewards need to judge the response.

  `label` selects the reward recipe (safety, value, knowledge, ...); `answer` is the gold answer (if any);
  images are arrays, PIL images or paths; `meta` carries task-specific fields (harm category, ...).
  """
  question: str
  images: tuple[Any, ...] = ()
  videos: tuple[Any, ...] = ()
  label: str = "normal"
  answer: str | None = None
  system: str | None = None
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def messages(self) -> list[dict[str, Any]]:
    content = ([{"type": "image"}] * len(self.images) + [{"type": "video"}] * len(self.videos) +
               [{"type": "text", "text": self.question}])
    system = [{"role": "system", "content": self.system}] if self.system else []
    return system + [{"role": "user", "content": content}]

  def prompt_tokens(self, processor, image_sizes=()) -> int:
    """Tokens of this prompt under `processor`'s chat template, its images counted from their (height, width)."""
    return processor.count_tokens(processor.render(self.messages()), image_sizes)


def to_wire(example: Example) -> dict[str, Any]:
  """An example as JSON values and arrays (images read into RGB arrays), to send to another host."""
  from safework.processing.image import load_image, to_rgb
  return {"question": example.question, "label": example.label, "answer": example.answer, "system": example.system,
          "meta": dict(example.meta), "images": [np.asarray(to_rgb(load_image(im))) for im in example.images],
          "video_frames": [np.asarray(v.frames) for v in example.videos],
          "video_fps": [float(v.fps) for v in example.videos]}


def from_wire(item: dict[str, Any]) -> Example:
  from safework.processing.video import Video
  videos = tuple(Video(frames, fps) for frames, fps in zip(item.get("video_frames") or [], item["video_fps"]))
  return Example(question=item["question"], images=tuple(item.get("images") or ()), videos=videos,
                 label=item["label"], answer=item["answer"], system=item["system"], meta=item["meta"])


class PromptSource(Protocol):
  """Random access to a task's prompts (a list, a tfds data source, ...)."""

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> Example: ...


class Rows:
  """Random access, without copying, to a data source's rows decoded by `decode(row) -> (Example, trace)`: as
  examples (a `PromptSource`), or as (example, trace) pairs with `traces`; `index` restricts it to some rows."""

  def __init__(self, source, decode: Callable[[Any], tuple[Example, str]], traces: bool = False,
               index: Sequence[int] | None = None):
    self.source, self.decode, self.traces = source, decode, traces
    self.index = list(range(len(source))) if index is None else list(index)

  def __len__(self) -> int:
    return len(self.index)

  def __getitem__(self, i: int):
    pair = self.decode(self.source[self.index[i]])
    return pair if self.traces else pair[0]


class ShuffledStream:
  """An endless stream over a source: epoch e visits the source in the permutation seeded by (seed, e).

  `take(position, count)` is a pure function of the position, so resuming a run at a saved position yields the
  same prompts as the uninterrupted run.
  """

  def __init__(self, source: PromptSource, seed: int):
    if len(source) == 0:
      raise ValueError("the prompt source is empty")
    self.source, self.seed = source, seed
    self._orders: dict[int, np.ndarray] = {}

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      self._orders = {epoch: np.random.default_rng([self.seed, epoch]).permutation(len(self.source))}
    return self._orders[epoch]

  def index(self, position: int) -> int:
    """The source index at a stream position."""
    epoch, offset = divmod(position, len(self.source))
    return int(self._order(epoch)[offset])

  def take(self, position: int, count: int) -> list[Example]:
    """The examples at positions [position, position + count); with several hosts each reads its share."""
    return distributed.read_shared(count, lambda i: self.source[self.index(position + i)], to_wire, from_wire)

