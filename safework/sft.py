"""CoT-SFT: supervised fine-tuning on `<think> ... </think> answer` traces (SafeLadder stage 1).

The core loop (`safework.training.Trainer`) with a cross-entropy objective on the response tokens. Batch k is a
pure function of (seed, k), so a run resumes exactly from its latest checkpoint with no position to store.
Every row has the same shape (prompt left-padded to `prompt_length`, trace cut or padded to `response_length`):
one compile.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from safework import distributed, sharding
from safework.data.example import Example, from_wire, to_wire
from safework.models.protocol import CausalLM
from safework.models.vision_shards import ShardAxes, shard_axes
from safework.processing import Processor
from safework.rl.batch import SequenceBatch, VisionContext, VisionInputs, micro_batch_layout, prompt_sequences
from safework.rl.logprobs import bucketed_widths
from safework.sampling.prompts import PromptBatch
from safework.tools.calls import trace_tokens
from safework.rl.objectives import CrossEntropyObjective
from safework.rl.optim import OptimSettings, make_optimizer
from safework.training import StepBatch, StepSource, Trainer, TrainSettings

Trace = tuple[Example, str]


@dataclasses.dataclass(frozen=True)
class SFTSettings:
  steps: int = 1000
  batch_size: int = 32
  prompt_length: int = 2048       # every prompt is left-padded to exactly this (fixed shapes: one compile)
  response_length: int = 2048     # every trace is cut or right-padded to exactly this
  # A micro-batch computes over its longest trace rounded up to response_bucket * 2^k columns (the batch's traces
  # grouped by length), not response_length; 0: all columns.
  response_bucket: int = 0
  bucket_images: int = 4         # sizes per octave of a batch's image patches (a blank image pads up); 0: none

  def validate(self) -> "SFTSettings":
    if min(self.steps, self.batch_size, self.prompt_length, self.response_length) < 1:
      raise ValueError(f"SFT steps, batch_size, prompt_length and response_length must be positive: {self}")
    if self.response_bucket < 0:
      raise ValueError(f"response_bucket must be 0 (off) or positive, got {self.response_bucket}")
    return self


def sft_rows(examples: Sequence[Example], traces: Sequence[str], processor: Processor, model_config,
             settings: SFTSettings, vision_shards: ShardAxes | None = None) -> tuple[SequenceBatch, VisionInputs]:
  """Training rows (prompt + trace + end-of-turn) for a batch of traces; the images are dealt to `vision_shards`."""
  prompts = PromptBatch.of(examples, processor, settings.prompt_length, settings.bucket_images,
                           width=settings.prompt_length)
  tokenizer = processor.tokenizer
  end = tokenizer.eos_token or "<|im_end|>"
  width = settings.response_length
  tokens = np.full((len(traces), width), tokenizer.pad_token_id, np.int32)
  trained = np.zeros((len(traces), width), bool)   # the policy's tokens (a tool's result is context)
  lengths = np.zeros(len(traces), np.int32)
  for i, trace in enumerate(traces):
    ids, from_tool = trace_tokens(tokenizer, trace + end)
    lengths[i] = n = min(len(ids), width)
    tokens[i, :n], trained[i, :n] = ids[:n], ~np.asarray(from_tool[:n], bool)
  return prompt_sequences(prompts, model_config, tokens, lengths, np.zeros(tokens.shape, np.float32),
                          np.zeros(len(tokens), np.float32), loss_mask=trained, vision_shards=vision_shards)


class TraceSource(StepSource):
  """SFT batches: `batch_size` traces drawn (seeded by step) from random-access `traces`; each host reads its
  share of a batch."""

  def __init__(self, traces: Sequence[Trace], processor: Processor, model_config, settings: SFTSettings, seed: int,
               mesh: jax.sharding.Mesh, rules: sharding.Rules, micro_batches: int = 1):
    if not len(traces):
      raise ValueError("SFT needs at least one trace")
    self.traces, self.processor, self.model_config = traces, processor, model_config
    self.settings, self.seed, self.mesh, self.rules = settings, seed, mesh, rules
    self.total_steps, self.batch_size, self.micro_batches = settings.steps, settings.batch_size, micro_batches

  def examples(self, step: int) -> list[Trace]:
    picked = np.random.default_rng([self.seed, step]).choice(len(self.traces), self.settings.batch_size)
    encode = lambda pair: {**to_wire(pair[0]), "trace": pair[1]}
    return distributed.read_shared(len(picked), lambda i: self.traces[int(picked[i])], encode,
                                   lambda item: (from_wire(item), item["trace"]))

  def batch(self, step: int, params) -> StepBatch:
    pairs = self.examples(step)
    rows, vision = sft_rows([e for e, _ in pairs], [t for _, t in pairs], self.processor, self.model_config,
                            self.settings, shard_axes(self.mesh, self.rules))
    lengths = np.asarray(rows.attention_mask)[:, -rows.response_length:].sum(axis=1)   # tool results included
    rows = rows.rows(micro_batch_layout(np.arange(len(lengths)), lengths, self.micro_batches))
    place = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim, x.shape[0]))
    return StepBatch(rows=jax.tree.map(place, rows),
                     context=VisionContext(vision=jax.device_put(vision, sharding.replicated(self.mesh))),
                     tokens=int(rows.attention_mask.sum()))


class SFTTrainer:
  """Trains `params` (whose buffers it takes over: the first step donates them) on (example, trace) pairs."""

  def __init__(self, *, model: CausalLM, params, processor: Processor, traces: Sequence[Trace],
               settings: SFTSettings, optim: OptimSettings, train: TrainSettings, seed: int, workdir: str | Path,
               mesh: jax.sharding.Mesh, rules: sharding.Rules = sharding.DEFAULT_RULES):
    settings = settings.validate()
    self.params = params
    self.tx = make_optimizer(optim, settings.steps, params)
    self.source = TraceSource(traces, processor, model.config, settings, seed, mesh, rules,
                              train.micro_batches(settings.batch_size))
    objective = CrossEntropyObjective(model=model, logprob_chunk=train.logprob_chunk,
                                      vision_trainable=optim.vision_trainable, vocab_limit=len(processor.tokenizer),
                                      response_widths=bucketed_widths(settings.response_bucket,
                                                                      settings.response_length))
    self.trainer = Trainer(workdir=workdir, mesh=mesh, settings=train, objective=objective, tx=self.tx,
                           source=self.source)

  def run(self):
    """Trains `steps` steps (resuming from the latest checkpoint) and returns the parameters."""
    return self.trainer.run(self.params).params
