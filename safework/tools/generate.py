"""Generation with tools: decode in chunks; a row that closes a tool call pauses, the tool runs on the host for every
paused row at once, its result is appended through `Sampler.extend` (the prompt is never recomputed), and decoding
resumes. Rows that call no tool wait at most one chunk for those that do.

The response of a row interleaves the policy's tokens and the tools' results; `tool_mask` marks the latter, which
are context, not actions (no loss, KL or entropy on them). Positions run on through a result, so the policy's
log-probs equal those of one forward pass over prompt + the whole response.

Axis legend: P prompts, G samples per prompt, B = P G rows (prompt-major), N response width.
"""

from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safework.data.example import Example
from safework.distributed import host_array
from safework.sampling.masks import end_rows
from safework.sampling.sampler import Sampler
from safework.sampling.shapes import bucket_length, left_padded_block
from safework.sampling.settings import SamplingSettings
from safework.sampling.text import delimiter_stops
from safework.tools.calls import CLOSING_TAGS, ToolSettings, pending_call, result_tokens, run_call
from safework.tools.corpus import Document, SearchIndex, question_documents


@dataclasses.dataclass
class ToolRollout:
  """Host arrays of responses generated with tools."""
  tokens: np.ndarray               # [B, N] int32: policy tokens and tool results in order, pad after the end
  logprobs: np.ndarray             # [B, N] policy log-probs (0 on tool tokens)
  behaviour_logprobs: np.ndarray   # [B, N] log-probs under the distribution drawn from (0 on tool tokens)
  tool_mask: np.ndarray            # [B, N] bool: tokens a tool wrote
  lengths: np.ndarray              # [B] tokens of each response
  done: np.ndarray                 # [B] ended by an end token or stop sequence (False: cut at a budget)
  calls: np.ndarray                # [B] tool calls answered
  read_tokens: np.ndarray          # [B] tool-result tokens in the context


def response_width(max_new_tokens: int, tools: ToolSettings) -> int:
  """Columns of a response: the policy's own tokens plus every result it may read."""
  return max_new_tokens + tools.max_calls * tools.result_tokens


def cache_reserve(max_new_tokens: int, tools: ToolSettings) -> int:
  """Cache slots generation with tools reserves after the prompt: the policy's tokens, every result (in its bucket)
  and the chunk each call may leave part-used (a row waits while others finish their chunk)."""
  return max_new_tokens + tools.max_calls * (bucket_length(tools.result_tokens, minimum=1) + tools.chunk_tokens) + \
      tools.chunk_tokens


@dataclasses.dataclass(frozen=True)
class ToolUse:
  """The search tool at hand while generating: how calls are answered, and the local index they read (None: every
  question brings its own documents)."""
  settings: ToolSettings
  index: SearchIndex | None

  @classmethod
  def build(cls, settings: ToolSettings, directory: str | Path) -> "ToolUse":
    """The tool over `settings.corpus`, indexed once into `directory` (no corpus: no index)."""
    settings = settings.validate()
    return cls(settings, SearchIndex.build(settings.corpus, directory) if settings.corpus else None)

  def response_length(self, max_new_tokens: int) -> int:
    return response_width(max_new_tokens, self.settings)


def example_documents(example: Example) -> list[Document] | None:
  """The documents an example brings for its own searches (`meta["documents"]`; None: it searches the corpus)."""
  return question_documents(example.meta, f"the question {example.question[:60]!r}")


@dataclasses.dataclass
class _Row:
  tokens: list = dataclasses.field(default_factory=list)
  logprobs: list = dataclasses.field(default_factory=list)
  behaviour: list = dataclasses.field(default_factory=list)
  from_tool: list = dataclasses.field(default_factory=list)
  calls: int = 0
  done: bool = False      # no more tokens (ended, or cut)
  ended: bool = False     # ended by an end token or stop sequence

  @property
  def policy_tokens(self) -> int:
    return len(self.tokens) - sum(self.from_tool)

  def add(self, tokens, logprobs, behaviour, from_tool: bool) -> None:
    self.tokens += list(tokens)
    self.logprobs += list(logprobs)
    self.behaviour += list(behaviour)
    self.from_tool += [from_tool] * len(tokens)


def generate_with_tools(sampler: Sampler, params, batch: dict, rng: jax.Array, sampling: SamplingSettings,
                        tool: ToolUse, tokenizer, num_samples: int = 1, first_row: int = 0,
                        documents: Sequence[Sequence[Document] | None] | None = None) -> ToolRollout:
  """`num_samples` responses per prompt of `batch`, each with up to `sampling.max_new_tokens` tokens of its own and
  `max_calls` tool results. Row i of a round draws with fold_in(round key, first_row * G + i), so generating a
  batch in chunks of prompts samples the same. A prompt's own `documents` (None: none) are what its calls search
  instead of the tool's corpus."""
  tools = tool.settings
  indexes = {}   # prompt -> the index its calls read

  def index_of(row: int) -> SearchIndex:
    prompt = row // num_samples
    own = documents[prompt] if documents is not None else None
    if own is None:
      if tool.index is None:
        raise ValueError(f"prompt {first_row + prompt} of the batch brings no documents (meta.documents) and the "
                         "tool has no corpus: give tools.corpus, or documents with every question")
      return tool.index
    if prompt not in indexes:
      indexes[prompt] = SearchIndex.of(list(own))
    return indexes[prompt]

  max_new, chunk = sampling.max_new_tokens, tools.chunk_tokens
  prefix = sampler.prefill(params, batch, cache_reserve(max_new, tools))
  prompts = prefix.key_valid.shape[0]
  if num_samples > 1:
    prefix = prefix.take(jnp.repeat(jnp.arange(prompts), num_samples))
  rows = [_Row() for _ in range(prompts * num_samples)]
  step_sampling = sampling.replace(stop_sequences=sampling.stop_sequences + delimiter_stops(tokenizer, CLOSING_TAGS))
  for round_index in itertools.count():
    if all(row.done for row in rows):
      break
    budget = min(chunk, prefix.capacity - int(prefix.write_index))
    if budget < 1:   # out of cache room: the rows still going are cut
      for row in rows:
        row.done = True
      break
    prefix = end_rows(prefix, np.array([row.done for row in rows]), sampling.eos_ids)   # finished rows
    out = sampler.decode(params, prefix, jax.random.fold_in(rng, round_index), step_sampling.replace(
        max_new_tokens=budget), first_row=first_row * num_samples)
    prefix = out.prefix
    tokens, lengths, logprobs, behaviour = (host_array(x) for x in (out.tokens, out.lengths, out.logprobs,
                                                                    out.behaviour_logprobs))
    results = {}
    for r, row in enumerate(rows):
      if row.done:
        continue
      n = min(int(lengths[r]), max_new - row.policy_tokens)
      row.add(tokens[r, :n], logprobs[r, :n], behaviour[r, :n], from_tool=False)
      row.ended = bool(n) and sampling.ends(row.tokens[-n:])   # the tokens just drawn
      call = None if row.ended else pending_call(tokenizer.decode(row.tokens, skip_special_tokens=True))
      if call is not None and row.calls < tools.max_calls:
        results[r] = result_tokens(tokenizer, run_call(index_of(r), *call, tools), tools.result_tokens)
      row.done = row.ended or row.policy_tokens >= max_new
    if results:
      block = left_padded_block([results.get(r, []) for r in range(len(rows))])
      for r, ids in results.items():
        rows[r].add(ids, [0.0] * len(ids), [0.0] * len(ids), from_tool=True)
        rows[r].calls += 1
      if int(prefix.write_index) + bucket_length(block[0].shape[1], minimum=1) > prefix.capacity:
        for row in rows:
          row.done = True
      else:
        prefix = sampler.extend(params, prefix, *block)
  width = response_width(max_new, tools)
  out = ToolRollout(tokens=np.full((len(rows), width), sampling.pad_id, np.int32),
                    logprobs=np.zeros((len(rows), width), np.float32),
                    behaviour_logprobs=np.zeros((len(rows), width), np.float32),
                    tool_mask=np.zeros((len(rows), width), bool), lengths=np.zeros(len(rows), np.int32),
                    done=np.array([row.ended for row in rows]), calls=np.array([row.calls for row in rows]),
                    read_tokens=np.array([sum(row.from_tool) for row in rows]))
  for r, row in enumerate(rows):
    n = len(row.tokens)
    out.tokens[r, :n], out.logprobs[r, :n], out.behaviour_logprobs[r, :n] = row.tokens, row.logprobs, row.behaviour
    out.tool_mask[r, :n], out.lengths[r] = row.from_tool, n
  return out
