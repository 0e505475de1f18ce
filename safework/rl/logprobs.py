"""Token log-probs of a sequence batch under a policy, computed from hidden states in sequence chunks.

The [B, T, V] logits are never materialised: a scan over chunks of the time axis computes [B, c, V] at a time,
and each chunk is rematerialised in the backward pass, so peak memory holds one chunk's logits.

Axis legend: B sequences, L full length (prompt bucket P + response N), T time, c chunk, D hidden, V vocab,
M vision features.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from safework.models.protocol import CausalLM
from safework.rl.batch import SequenceBatch


def chunked_token_logprobs(hidden: jax.Array, output_embedding: jax.Array, targets: jax.Array,
                           chunk: int, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array]:
  """log p(targets) and the entropy of each position's distribution, from hidden [B, T, D] -> ([B, T], [B, T]).

  With `vocab_limit`, ids from it on (embedding rows beyond the tokenizer, which the sampler never draws) are
  outside the distribution, as in the sampler.
  """
  b, t, d = hidden.shape
  chunk = min(chunk, t)
  pad = -t % chunk
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  n = (t + pad) // chunk
  hidden_chunks = hidden.reshape(b, n, chunk, d).swapaxes(0, 1)
  target_chunks = targets.reshape(b, n, chunk).swapaxes(0, 1)
  weights = output_embedding.astype(hidden.dtype)

  @jax.checkpoint
  def one_chunk(h, y):
    logits = jnp.einsum("bcd,vd->bcv", h, weights).astype(jnp.float32)
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
      logits = jnp.where(jnp.arange(logits.shape[-1]) < vocab_limit, logits, -jnp.inf)
    normalizer = jax.nn.logsumexp(logits, axis=-1)
    logp = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0] - normalizer
    probs = jax.lax.stop_gradient(jnp.exp(logits - normalizer[..., None]))
    entropy = normalizer - jnp.sum(jnp.where(probs > 0, probs * jax.lax.stop_gradient(logits), 0.0), axis=-1)
    return logp, jax.lax.stop_gradient(entropy)

  _, (logp, entropy) = jax.lax.scan(lambda carry, xs: (carry, one_chunk(*xs)), None, (hidden_chunks, target_chunks))
  unchunk = lambda x: x.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]
  return unchunk(logp), unchunk(entropy)


def row_embeddings(model: CausalLM, params, batch: SequenceBatch, features: jax.Array | None) -> jax.Array:
  """The rows' input embeddings [B, L, D], each placeholder's vision feature looked up by `feature_index`."""
  embeds = model.apply({"params": params}, batch.input_ids, method="embed")
  if features is None:
    return embeds
  looked_up = features[jnp.maximum(batch.feature_index, 0)].astype(embeds.dtype)
  return jnp.where((batch.feature_index >= 0)[..., None], looked_up, embeds)


def response_logprobs(model: CausalLM, params, batch: SequenceBatch, features: jax.Array | None,
                      chunk: int, vocab_limit: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Log-probs and entropies [B, N] of each row's response tokens under `params` (over the first `vocab_limit`
  ids when given: the tokenizer's vocabulary, as the sampler draws)."""
  apply = functools.partial(model.apply, {"params": params})
  embeds = row_embeddings(model, params, batch, features)
  length = batch.input_ids.shape[1]
  hidden, _ = apply(embeds, batch.positions.transpose(1, 0, 2), batch.attention_mask, method="decode")
  n = batch.response_length
  # Position P - 1 + j predicts response token j.
  return chunked_token_logprobs(hidden[:, length - n - 1:length - 1], apply(method="output_embedding"),
                                batch.input_ids[:, length - n:], chunk, vocab_limit)


def bucketed_widths(bucket: int, full: int) -> tuple[int, ...]:
  """bucket * 2^k below `full`: the narrower widths micro-batches compute over (none when bucket is 0)."""
  return tuple(bucket << k for k in range(full.bit_length()) if bucket << k < full) if bucket else ()


def narrowed_logprobs(model: CausalLM, params, batch: SequenceBatch, features: jax.Array | None, chunk: int,
                      vocab_limit: int | None, widths: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """`response_logprobs` computed over the narrowest of `widths` (and the full width) that holds the batch's longest
  response, zero beyond it: a micro-batch of short responses costs its own length, not the rollout's longest. All
  widths are compiled into one program (`lax.switch`); one runs."""
  n = batch.response_length
  widths = sorted({w for w in widths if 0 < w < n}) + [n]
  if len(widths) == 1:
    return response_logprobs(model, params, batch, features, chunk, vocab_limit)

  def at(width):
    def run(rows: SequenceBatch):
      logp, entropy = response_logprobs(model, params, rows.narrowed(width), features, chunk, vocab_limit)
      widen = lambda x: jnp.pad(x, ((0, 0), (0, n - width)))
      return widen(logp), widen(entropy)
    return run

  branch = jnp.searchsorted(jnp.asarray(widths), batch.longest_response())   # the first width >= the longest
  return jax.lax.switch(branch, [at(w) for w in widths], batch)
