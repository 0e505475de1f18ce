"""Verifier heads on a judge's last hidden state. Pure functions over [B, D] hidden states.

The verdict head is the judge's own LM head restricted to its K verdict tokens: the full-vocabulary log-softmax at
the verdict position, read at those tokens, is exactly the probability of each verdict as the first decoded
token. The classifier head is a [D, K] linear map; initialised from the LM-head rows of the verdict tokens, it
starts out computing the same restricted logits and can then be trained on its own.

Axis legend: B rows, D hidden, V vocab, K verdicts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

HEAD_KINDS = ("verdict", "classifier")


def verdict_logprobs(hidden: jax.Array, output_embedding: jax.Array, verdict_ids: jax.Array) -> jax.Array:
  """log p(verdict token) under the full next-token distribution: [B, D] -> [B, K] (fp32)."""
  logits = jnp.einsum("bd,vd->bv", hidden, output_embedding.astype(hidden.dtype)).astype(jnp.float32)
  return logits[:, verdict_ids] - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def classifier_logits(hidden: jax.Array, head: dict[str, jax.Array]) -> jax.Array:
  """[B, D] -> [B, K] logits of a linear head (fp32)."""
  return (jnp.einsum("bd,dk->bk", hidden, head["kernel"].astype(hidden.dtype)) + head["bias"]).astype(jnp.float32)


def classifier_from_lm_head(output_embedding, verdict_ids) -> dict[str, np.ndarray]:
  """A classifier head that starts as the LM head restricted to the verdict tokens."""
  rows = np.asarray(output_embedding)[np.asarray(verdict_ids)]
  return {"kernel": rows.T.astype(np.float32), "bias": np.zeros(len(verdict_ids), np.float32)}


def scores_from_logprobs(logprobs: np.ndarray, scores: np.ndarray, scoring: str) -> np.ndarray:
  """Per-row score from verdict log-probs [n, K]: argmax verdict, expectation, or the soft TRUE/FALSE score."""
  if scoring == "argmax":
    return scores[np.argmax(logprobs, axis=1)]
  if scoring == "expected":
    normalised = np.exp(logprobs - logprobs.max(axis=1, keepdims=True))
    normalised /= normalised.sum(axis=1, keepdims=True)
    return normalised @ scores
  if scoring == "true_false":
    probs = np.exp(logprobs)
    return (probs[:, 0] + 1.0 - probs[:, 1]) / 2
  raise ValueError(f"unknown scoring {scoring!r}")
