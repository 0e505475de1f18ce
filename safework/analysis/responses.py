"""Per-token MI of generated responses: generate, recompute the hidden states, score each token against a reference.

The hidden states are the generation's own: one teacher-forced pass of the same model and parameters over prompt +
response (the decode loop keeps keys and values, not the residual stream), laid out exactly as the RL loss lays
out its rows (`rl.batch.prompt_sequences`: the sampler's positions, the prompt's vision features). The reference
representation is the mean state, at the same layer, of the reference answer's tokens read after the same prompt.

Memory, beside the parameters: generating `batch_size` rows of L tokens holds their KV cache, rows * L * Y * 2KH
values; a teacher-forced pass over `pass_rows` rows holds every layer's states, rows * L * Y * D (then keeps the asked
layers), so with pass_rows <= batch_size * 2KH / D the analysis needs no more than the generation (Qwen2.5-VL-7B:
2KH / D = 1024 / 3584, 16 rows per pass for 64 generated). Both grow linearly with layers and length. The estimator
holds `chunk` + 1 Gram matrices [D, D] (7B: 8 + 1 of 51 MB), whatever the length.

Axis legend: Y layers, B rows, L prompt + response, N response tokens, D hidden.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safework.analysis.mutual_information import token_mutual_information
from safework.analysis.peaks import PeakRule, find_peaks
from safework.data.example import Example
from safework.models.protocol import CausalLM
from safework.processing import Processor
from safework.rl.batch import SequenceBatch, prompt_sequences, vision_features
from safework.rl.logprobs import row_embeddings
from safework.sampling import Sampler, SamplingSettings
from safework.sampling.prompts import PromptBatch


@dataclasses.dataclass(frozen=True)
class AnalysisSettings:
  layers: tuple[int, ...] = (-1,)   # decoder layers whose states are scored (negative: from the last)
  max_new_tokens: int = 256
  max_prompt_length: int = 1024
  batch_size: int = 64              # prompts generated at once
  pass_rows: int = 16               # rows per teacher-forced pass (see the memory note above)
  chunk: int = 8                    # tokens per batch of Gram matrices
  threshold: float = 2.0            # a peak's MI exceeds its response's mean by this many stds (`PeakRule`)

  def validate(self) -> "AnalysisSettings":
    for name in ("max_new_tokens", "max_prompt_length", "batch_size", "pass_rows", "chunk"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name}={getattr(self, name)} must be at least 1")
    if not self.layers:
      raise ValueError("layers is empty: name at least one decoder layer (-1: the last)")
    return self

  def layer_indices(self, num_layers: int) -> tuple[int, ...]:
    """The analysed layers counted from 0, checked against the decoder's depth."""
    bad = [layer for layer in self.layers if not -num_layers <= layer < num_layers]
    if bad:
      raise ValueError(f"layers {list(self.layers)}: the decoder has {num_layers} layers (0..{num_layers - 1}, or "
                       "negative from the last)")
    return tuple(layer % num_layers for layer in self.layers)


@dataclasses.dataclass(frozen=True)
class ResponseMI:
  """One response: its tokens' texts, and per analysed layer their MI and the peak positions (into `tokens`)."""
  question: str
  response: str
  tokens: tuple[str, ...]
  mi: dict[int, tuple[float, ...]]
  peaks: dict[int, tuple[int, ...]]

  def peak_tokens(self, layer: int) -> list[str]:
    return [self.tokens[i] for i in self.peaks[layer]]


@functools.partial(jax.jit, static_argnums=(0, 4))
def _layer_states(model: CausalLM, params, batch: SequenceBatch, features, layers: tuple[int, ...]) -> jax.Array:
  """The states [len(layers), B, L, D] of the rows at `layers` (teacher-forced, the loss's layout)."""
  embeds = row_embeddings(model, params, batch, features)
  every = model.apply({"params": params}, embeds, batch.positions.transpose(1, 0, 2), batch.attention_mask,
                      method="decode_layers")
  return every[np.asarray(layers)]


def _response_states(model, params, prompts: PromptBatch, tokens: np.ndarray, lengths: np.ndarray,
                     layers: tuple[int, ...], pass_rows: int) -> np.ndarray:
  """States [len(layers), B, N, D] of each row's response tokens (rows left-aligned, `lengths` valid), `pass_rows`
  rows per teacher-forced pass."""
  zeros = np.zeros(tokens.shape, np.float32)
  batch, vision = prompt_sequences(prompts, model.config, tokens, lengths, zeros, zeros[:, 0])
  features = vision_features(model, params, vision)
  parts = []
  for start in range(0, tokens.shape[0], pass_rows):
    rows = batch.rows(np.arange(start, min(start + pass_rows, tokens.shape[0])))
    states = _layer_states(model, params, rows, features, layers)
    parts.append(np.asarray(states[:, :, -tokens.shape[1]:], np.float32))
  return np.concatenate(parts, axis=1)


def _tokenize(processor: Processor, texts: Sequence[str], width: int) -> tuple[np.ndarray, np.ndarray]:
  rows = [processor.tokenizer(t, add_special_tokens=False)["input_ids"][:width] or [processor.tokenizer.pad_token_id]
          for t in texts]
  tokens = np.full((len(rows), max(map(len, rows))), processor.tokenizer.pad_token_id, np.int32)
  for i, row in enumerate(rows):
    tokens[i, :len(row)] = row
  return tokens, np.array([len(r) for r in rows], np.int32)


def analyze(model: CausalLM, params, processor: Processor, examples: Sequence[Example], references: Sequence[str],
            settings: AnalysisSettings, sampler: Sampler | None = None) -> list[ResponseMI]:
  """Greedy responses to `examples`, each token's MI against its reference (one per example), and the peaks."""
  layers = settings.validate().layer_indices(model.config.text.num_hidden_layers)
  sampler = sampler or Sampler(model)
  eos = model.config.eos_token_id
  sampling = SamplingSettings(max_new_tokens=settings.max_new_tokens, temperature=0.0,
                              eos_ids=tuple(int(e) for e in np.atleast_1d(() if eos is None else eos)))
  out: list[ResponseMI] = []
  for start in range(0, len(examples), settings.batch_size):
    part, refs = examples[start:start + settings.batch_size], references[start:start + settings.batch_size]
    prompts = PromptBatch.of(part, processor, settings.max_prompt_length, bucket_images=0)
    generated = sampler.generate(params, prompts.arrays(), jax.random.key(0), sampling)
    tokens, lengths = np.asarray(generated.tokens), np.asarray(generated.lengths)
    states = _response_states(model, params, prompts, tokens, lengths, layers, settings.pass_rows)
    ref_tokens, ref_lengths = _tokenize(processor, refs, settings.max_new_tokens)
    ref_states = _response_states(model, params, prompts, ref_tokens, ref_lengths, layers, settings.pass_rows)
    for row, example in enumerate(part):
      n = int(lengths[row])
      ids = tokens[row, :n].tolist()
      mi, peaks = {}, {}
      for k, layer in enumerate(layers):
        reference = ref_states[k, row, :int(ref_lengths[row])].mean(axis=0)
        # Scored over the row's whole width (one compiled shape), kept for its n tokens.
        scores = np.asarray(token_mutual_information(jnp.asarray(states[k, row]), jnp.asarray(reference),
                                                     chunk=settings.chunk))[:n]
        mi[layer] = tuple(float(v) for v in scores)
        peaks[layer] = tuple(int(i) for i in find_peaks(scores, PeakRule(threshold=settings.threshold)))
      out.append(ResponseMI(question=example.question, response=processor.decode(ids),
                            tokens=tuple(processor.tokenizer.convert_ids_to_tokens(ids)), mi=mi, peaks=peaks))
  return out
