"""Human edits of the reasoning: replace a step (or any span) of a response and resume generation after it.

A step is the text up to and including the next delimiter (a blank line by default). The edited response prefix
is appended to the cached prompt with `Sampler.extend` (the prompt is never recomputed) and decoding resumes from
there: the tokens equal those of generating from the prompt and the edited prefix as one fresh prompt.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax

from safework.sampling.sampler import Prefix, Sampler, SampleOutput
from safework.sampling.shapes import left_padded_block
from safework.sampling.settings import SamplingSettings

DELIMITERS = ("\n\n",)


def split_steps(text: str, delimiters: Sequence[str] = DELIMITERS) -> list[str]:
  """The steps of `text`, each ending with its delimiter (the last may have none): "".join(steps) == text."""
  if not delimiters:
    return [text] if text else []
  pattern = "|".join(re.escape(d) for d in sorted(delimiters, key=len, reverse=True))
  steps, start = [], 0
  for match in re.finditer(pattern, text):
    steps.append(text[start:match.end()])
    start = match.end()
  return steps + ([text[start:]] if start < len(text) else [])


def edited_prefix(response: str, step: int, replacement: str, delimiters: Sequence[str] = DELIMITERS) -> str:
  """The response's first `step` steps followed by `replacement` (what a person wrote for step `step`); the steps
  after it are dropped, since generation resumes from the edit."""
  steps = split_steps(response, delimiters)
  if not 0 <= step <= len(steps):
    raise ValueError(f"the response has {len(steps)} steps; step {step} cannot be replaced (0 to {len(steps)})")
  return "".join(steps[:step]) + replacement


def resume_after_edit(sampler: Sampler, params, prompt: Prefix, tokenizer, edits: Sequence[str],
                      settings: SamplingSettings, rng: jax.Array) -> SampleOutput:
  """Continues every row of the cached `prompt` after its edited response prefix `edits[row]`; `prompt` is kept
  (other edits can resume from it). The prefill must have reserved room for the edit (`extra_slots`)."""
  block = left_padded_block([tokenizer.encode(text, add_special_tokens=False) for text in edits])
  prefix = sampler.extend(params, prompt, *block)
  return sampler.decode(params, prefix, rng, settings)
