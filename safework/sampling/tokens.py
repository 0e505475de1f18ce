"""Pure functions of one decode step: drawing tokens from logits, and detecting stop sequences.

Axis legend: B rows, V vocab, C candidates (top-k), N generated tokens, S stop sequences, L their max length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from safework.sampling.settings import SamplingSettings

NO_TOKEN = -1   # wildcard in the stop table, and the filler before the first generated token


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per row from logits [B, C] with the row's own key (keys [B]): the Gumbel-max trick, row by row, so
  a row's draw does not depend on which other rows share its batch (chunked and continuous batching sample
  exactly what one batch would)."""
  gumbel = jax.vmap(lambda key: jax.random.gumbel(key, logits.shape[1:], jnp.float32))(keys)
  return jnp.argmax(logits + gumbel, axis=-1)


def sample_tokens(keys: jax.Array, logits: jax.Array, settings: SamplingSettings) -> tuple[jax.Array, jax.Array]:
  """Draws one token per row from logits [B, V] (fp32), with one key per row (keys [B]): greedy, or
  temperature -> top-k -> top-p.

  Returns the tokens [B] and their log-probs [B] under the distribution they were drawn from (after
  temperature and truncation; 0 for greedy, a point mass): the behaviour policy an RL trainer corrects for.
  """
  if settings.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32), jnp.zeros(logits.shape[0], jnp.float32)
  logits = logits / settings.temperature
  k = settings.top_k or (settings.nucleus_candidates if settings.top_p < 1 else None)
  if k is None or k >= logits.shape[-1]:
    if settings.top_p >= 1:
      token = categorical(keys, logits).astype(jnp.int32)
      return token, token_logprobs(logits, token)
    k = logits.shape[-1]
  values, indices = jax.lax.top_k(logits, k)   # [B, C], sorted, most likely first
  if settings.top_p < 1:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where(mass_before < settings.top_p, values, -jnp.inf)   # the first candidate always stays
  choice = categorical(keys, values)
  token = jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  return token, token_logprobs(values, choice)


def token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """log p(token) under logits [B, V] (fp32) -> [B]."""
  logits = logits.astype(jnp.float32)
  picked = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
  return picked - jax.nn.logsumexp(logits, axis=-1)


def stop_table(sequences: tuple[tuple[int, ...], ...]) -> np.ndarray:
  """Stop sequences right-aligned in a [S, L] table, wildcards (NO_TOKEN) on the left."""
  if not sequences:
    return np.zeros((0, 1), np.int32)
  width = max(len(s) for s in sequences)
  table = np.full((len(sequences), width), NO_TOKEN, np.int32)
  for i, seq in enumerate(sequences):
    table[i, width - len(seq):] = seq
  return table


def ends_with_stop(history: jax.Array, table: np.ndarray) -> jax.Array:
  """Whether each row's recent tokens history [B, L] (oldest first) end with a stop sequence -> [B] bool."""
  if table.shape[0] == 0:
    return jnp.zeros(history.shape[0], bool)
  table = jnp.asarray(table)
  hits = (table[None] == NO_TOKEN) | (history[:, None, :] == table[None])
  return jnp.any(jnp.all(hits, axis=-1), axis=-1)
