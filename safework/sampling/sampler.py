"""On-device generation: jitted prefill, extension by a token block, and a `lax.while_loop` decode.

The caller owns the state. A `Prefix` holds the KV cache (keys already rotated, indexed by slot), which slots
hold valid keys, the next slot to write, each row's next M-RoPE position, and the logits that predict each row's
next token. `prefill` builds one from a prompt (the vision tower runs once); `extend` appends tokens (a partial or
human-edited response) without recomputing the prompt; `decode` samples from it, G samples per row sharing one
prefill (the cache is broadcast, not recomputed), and stops rows on EOS ids or stop sequences, leaving the loop
when every row is done. The decode loop donates the prefix's buffers unless asked to keep it.

Axis legend: B rows, T prompt (bucket) length, S cache slots, N new tokens, V vocab, K kv heads, H head dim.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safework import sharding
from safework.models.inputs import PreparedInputs, prepare_inputs
from safework.models.protocol import CausalLM
from safework.models.qwen2_5_vl import encode_vision
from safework.models.vision_shards import shard_axes
from safework.models.text import KVCache
from safework.sampling import tokens as token_ops
from safework.sampling.settings import SamplingSettings
from safework.sampling.shapes import attention_spans, bucket_length, filled_floor, pad_left

CACHE_AXES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")


@flax.struct.dataclass
class Prefix:
  """Everything needed to continue generating: the cache [Y, B, S, K, H] of every layer, per-row bookkeeping."""
  cache: KVCache
  key_valid: jax.Array       # [B, S] bool: slots holding a real token
  write_index: jax.Array     # [] int32: next slot to write (shared by all rows)
  next_position: jax.Array   # [B] int32: M-RoPE position of each row's next token
  last_logits: jax.Array     # [B, V] fp32: logits predicting each row's next token

  @property
  def capacity(self) -> int:
    return self.key_valid.shape[1]

  def take(self, rows: jax.Array) -> "Prefix":
    """The prefix of the given rows (e.g. to keep the best of several candidates, or to repeat rows)."""
    pick = lambda x: jnp.take(x, rows, axis=0)
    cache = jax.tree.map(lambda x: jnp.take(x, rows, axis=1), self.cache)   # [Y, B, ...]
    return self.replace(cache=cache, key_valid=pick(self.key_valid),
                        next_position=pick(self.next_position), last_logits=pick(self.last_logits))

  def put(self, rows: jax.Array, other: "Prefix") -> "Prefix":
    """This prefix with its `rows` replaced by `other`'s (continued from the same state, e.g. a step resampled).

    The write index becomes the further of the two: the slots a row never wrote stay invalid, so every row still
    attends exactly its own tokens."""
    put = lambda x, y: x.at[rows].set(y)
    cache = jax.tree.map(lambda x, y: x.at[:, rows].set(y), self.cache, other.cache)   # [Y, B, ...]
    return self.replace(cache=cache, key_valid=put(self.key_valid, other.key_valid),
                        write_index=jnp.maximum(self.write_index, other.write_index),
                        next_position=put(self.next_position, other.next_position),
                        last_logits=put(self.last_logits, other.last_logits))


@flax.struct.dataclass
class SampleOutput:
  tokens: jax.Array               # [B, N] int32, pad after a row is done
  logprobs: jax.Array             # [B, N] fp32, policy log-probs of the tokens (temperature 1, full vocabulary)
  behaviour_logprobs: jax.Array   # [B, N] fp32, log-probs under the distribution drawn from (0 when greedy)
  lengths: jax.Array              # [B] int32, tokens generated per row (stop token included)
  done: jax.Array                 # [B] bool, the row hit an EOS id or a stop sequence
  prefix: Prefix | None           # the state after the last token, to continue from (None after compaction)


@flax.struct.dataclass
class DecodeState:
  """The decode loop's carry. Entries after a row is done are pad / 0 and never change again."""
  step: jax.Array                 # [] int32: tokens drawn so far (by every live row)
  prefix: Prefix                  # the cache, up to the last drawn token
  history: jax.Array              # [B, W - 1 + N] int32: W - 1 fillers (the stop window), then the drawn tokens
  logprobs: jax.Array             # [B, N] fp32: policy log-probs of the drawn tokens
  behaviour_logprobs: jax.Array   # [B, N] fp32: their log-probs under the distribution drawn from
  done: jax.Array                 # [B] bool
  keys: jax.Array                 # [B] each row's own key; step s draws with fold_in(key, s)



def _take_rows(state: DecodeState, rows: jax.Array) -> DecodeState:
  pick = lambda x: jnp.take(x, rows, axis=0)
  return state.replace(prefix=state.prefix.take(rows), history=pick(state.history), logprobs=pick(state.logprobs),
                       behaviour_logprobs=pick(state.behaviour_logprobs), done=pick(state.done), keys=pick(state.keys))


def _live_first(done: jax.Array, shards: int, keep: int) -> jax.Array:
  """[shards, keep / shards]: each batch shard's rows (local indices) with its live rows first. Rows are split
  over the shards in contiguous blocks, so shard s holds rows s * B / shards, ...."""
  return jnp.argsort(done.reshape(shards, -1), axis=1, stable=True)[:, :keep // shards]


def _most_live_per_shard(done: jax.Array, shards: int) -> jax.Array:
  return (~done).reshape(shards, -1).sum(axis=1).max()


def _write_rows(full: DecodeState, rows: jax.Array, state: DecodeState) -> DecodeState:
  """The output rows `rows` of `full` replaced by the (compacted) batch's."""
  put = lambda whole, part: whole.at[rows].set(part)
  return full.replace(history=put(full.history, state.history), logprobs=put(full.logprobs, state.logprobs),
                      behaviour_logprobs=put(full.behaviour_logprobs, state.behaviour_logprobs),
                      done=put(full.done, state.done))


class Sampler:
  """Generation for one model; jitted functions are compiled per shape and settings, and reused."""

  def __init__(self, model: CausalLM, mesh: jax.sharding.Mesh | None = None,
               rules: sharding.Rules = sharding.DEFAULT_RULES, cache_dtype=None, min_span: int = 128,
               compaction_levels: int = 3):
    self.model = model
    self.compaction_levels = compaction_levels   # how often a compacting decode may halve its batch
    self.min_span = min_span   # the smallest span of the cache a decode step attends (see attention_spans)
    self.mesh = mesh
    self.rules = rules
    self.cache_dtype = cache_dtype or model.dtype
    # The jitted programs (also what `safework.plan` compiles for a slice).
    self.jitted_prefill = jax.jit(self._prefill_fn, static_argnames=("capacity",))
    self.jitted_extend = jax.jit(self._extend_fn)
    static = ("settings", "num_samples", "compact", "filled")
    self._decode = jax.jit(self._decode_fn, static_argnames=static, donate_argnames=("prefix",))
    self._decode_keep = jax.jit(self._decode_fn, static_argnames=static)

  # -- sharding -------------------------------------------------------------------------------------------------

  def _constrain(self, x: jax.Array, names: tuple[str | None, ...]) -> jax.Array:
    if self.mesh is None:
      return x
    return jax.lax.with_sharding_constraint(x, sharding.logical_sharding(x.shape, names, self.mesh, self.rules))

  def prefix_shardings(self, prefix: Prefix) -> Prefix:
    """Where a prefix (of arrays or shapes) lives on the mesh: rows over the batch axes, the cache's kv heads over
    the tensor axis."""
    named = lambda x, names: sharding.logical_sharding(x.shape, names, self.mesh, self.rules)
    return Prefix(cache=jax.tree.map(lambda x: named(x, CACHE_AXES), prefix.cache),
                  key_valid=named(prefix.key_valid, ("batch", None)), write_index=sharding.replicated(self.mesh),
                  next_position=named(prefix.next_position, ("batch",)),
                  last_logits=named(prefix.last_logits, ("batch", "vocab")))

  def _constrain_prefix(self, prefix: Prefix) -> Prefix:
    if self.mesh is None:
      return prefix
    return jax.tree.map(jax.lax.with_sharding_constraint, prefix, self.prefix_shardings(prefix))

  # -- the model, one block of tokens at a time ----------------------------------------------------------------

  def _advance(self, params, prefix: Prefix, embeds: jax.Array, positions: jax.Array, valid: jax.Array,
               empty: bool = False, window: int | None = None) -> Prefix:
    """Writes a block of n tokens (embeds [B, n, D], positions [3, B, n], valid [B, n]) at the write index.

    The block attends the cache's first `window` slots (default: all; the caller guarantees the block lies
    within them), or, when the prefix is `empty` (a prefill), only itself: what the prompt costs, not what the
    cache reserves.
    """
    n = embeds.shape[1]
    key_valid = jax.lax.dynamic_update_slice(prefix.key_valid, valid, (0, prefix.write_index))
    window = window or prefix.capacity
    attended, slots = (valid, None) if empty else (key_valid[:, :window], window)
    hidden, cache = self.model.apply({"params": params}, embeds, positions, attended, prefix.cache, prefix.write_index,
                                     slots, method="decode")
    logits = self.model.apply({"params": params}, hidden[:, -1:], method="logits")[:, 0].astype(jnp.float32)
    wrote = jnp.any(valid, axis=1)
    return self._constrain_prefix(Prefix(
        cache=cache, key_valid=key_valid, write_index=prefix.write_index + n,
        next_position=prefix.next_position + valid.sum(axis=1).astype(jnp.int32),
        last_logits=jnp.where(wrote[:, None], logits, prefix.last_logits)))

  def _empty_prefix(self, batch: int, capacity: int) -> Prefix:
    cfg = self.model.config.text
    shape = (cfg.num_hidden_layers, batch, capacity, cfg.num_key_value_heads, cfg.head_dim)
    zeros = lambda: self._constrain(jnp.zeros(shape, self.cache_dtype), CACHE_AXES)
    return Prefix(cache=KVCache(zeros(), zeros()),
                  key_valid=jnp.zeros((batch, capacity), bool), write_index=jnp.zeros((), jnp.int32),
                  next_position=jnp.zeros(batch, jnp.int32), last_logits=jnp.zeros((batch, cfg.vocab_size), jnp.float32))

  def _prefill_fn(self, params, input_ids, attention_mask, pixel_values, pixel_values_videos, prepared: PreparedInputs,
                  capacity: int) -> Prefix:
    apply = functools.partial(self.model.apply, {"params": params})
    image_features = video_features = None
    if pixel_values is not None:
      image_features = encode_vision(self.model, params, pixel_values, prepared.image_layout)
    if pixel_values_videos is not None:
      video_features = encode_vision(self.model, params, pixel_values_videos, prepared.video_layout)
    embeds = apply(input_ids, image_features, video_features, method="embed")
    valid = attention_mask.astype(bool)
    prefix = self._advance(params, self._empty_prefix(input_ids.shape[0], capacity), embeds, prepared.positions, valid,
                           empty=True)
    # The next token follows the prompt's largest position (the prompt ends in text: its last position).
    return prefix.replace(next_position=jnp.max(prepared.positions, axis=(0, 2)) + 1)

  def _extend_fn(self, params, prefix: Prefix, tokens: jax.Array, valid: jax.Array, window: int | None = None
                 ) -> Prefix:
    embeds = self.model.apply({"params": params}, tokens, method="embed")
    offsets = jnp.cumsum(valid, axis=1) - 1
    positions = jnp.where(valid, prefix.next_position[:, None] + offsets, 0)
    return self._advance(params, prefix, embeds, jnp.broadcast_to(positions, (3,) + tokens.shape), valid,
                         window=window)

  # -- the decode loop -----------------------------------------------------------------------------------------

  def _decode_fn(self, params, prefix: Prefix, rng: jax.Array, first_row: jax.Array, settings: SamplingSettings,
                 num_samples: int, compact: bool = False, filled: int = 0) -> SampleOutput:
    # Sample g of prefix row i draws from fold_in(fold_in(rng, first_row + i), g): its tokens do not depend on the
    # rows beside it, so generating a batch in chunks (first_row = the chunk's first row) samples the same.
    rows = prefix.key_valid.shape[0]
    row_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(first_row + jnp.arange(rows))
    keys = jax.vmap(jax.random.fold_in)(jnp.repeat(row_keys, num_samples), jnp.tile(jnp.arange(num_samples), rows))
    if num_samples > 1:   # G samples per row share its prefill: repeat the cache rows, do not recompute them
      prefix = self._constrain_prefix(prefix.take(jnp.repeat(jnp.arange(rows), num_samples)))
    batch, steps = prefix.key_valid.shape[0], settings.max_new_tokens
    table = token_ops.stop_table(settings.stop_sequences)
    window = table.shape[1]   # of the stop sequences
    eos = jnp.asarray(settings.eos_ids or (-2,), jnp.int32)

    def body(state: DecodeState, span: int) -> DecodeState:
      policy = state.prefix.last_logits
      if settings.vocab_limit is not None:
        policy = jnp.where(jnp.arange(policy.shape[-1]) < settings.vocab_limit, policy, -jnp.inf)
      logits = policy
      if settings.logits_processor is not None:
        logits = settings.logits_processor(logits, state.history[:, window - 1:], state.step)
      step_keys = jax.vmap(lambda key: jax.random.fold_in(key, state.step))(state.keys)
      token, behaviour = token_ops.sample_tokens(step_keys, logits, settings)
      logprob = token_ops.token_logprobs(policy, token)
      done, step = state.done, state.step
      token = jnp.where(done, settings.pad_id, token)
      history = state.history.at[:, window - 1 + step].set(jnp.where(done, token_ops.NO_TOKEN, token))
      recent = jax.lax.dynamic_slice_in_dim(history, step, window, axis=1)
      return DecodeState(
          step=step + 1, prefix=self._extend_fn(params, state.prefix, token[:, None], ~done[:, None], span),
          history=history, logprobs=state.logprobs.at[:, step].set(jnp.where(done, 0.0, logprob)),
          behaviour_logprobs=state.behaviour_logprobs.at[:, step].set(jnp.where(done, 0.0, behaviour)),
          done=done | jnp.isin(token, eos) | token_ops.ends_with_stop(recent, table), keys=state.keys)

    def cond(state: DecodeState) -> jax.Array:
      return (state.step < steps) & ~jnp.all(state.done)

    history = jnp.full((batch, window - 1 + steps), token_ops.NO_TOKEN, jnp.int32)
    zeros = jnp.zeros((batch, steps), jnp.float32)
    state = DecodeState(step=jnp.zeros((), jnp.int32), prefix=prefix, history=self._constrain(history, ("batch", None)),
                        logprobs=zeros, behaviour_logprobs=zeros, done=jnp.zeros(batch, bool), keys=keys)
    # A step attends the smallest span of the cache that holds its slot: the loop runs in stages of doubling spans,
    # so a step costs what the filled part of the cache costs (within 2x, from min_span on), not its capacity.
    # With compaction, once every batch shard has no more than half its rows live, each shard keeps its live rows
    # in a batch half the size (finished rows stop costing; no row leaves its device, so the cache is never
    # gathered); `rows` maps the batch's rows to the output's.
    full, rows = state, jnp.arange(batch)
    sizes, shards = self._compaction_sizes(batch) if compact else ([batch], 1)
    for level, size in enumerate(sizes):
      smaller = sizes[level + 1] if level + 1 < len(sizes) else 0
      busy = lambda st, smaller=smaller: _most_live_per_shard(st.done, shards) > smaller // shards
      for span in attention_spans(prefix.capacity, self.min_span, filled):
        state = jax.lax.while_loop(
            lambda st, span=span, busy=busy: cond(st) & (st.prefix.write_index < span) & busy(st),
            functools.partial(body, span=span), state)
      full = _write_rows(full, rows, state)
      if smaller:
        local = _live_first(state.done, shards, smaller)
        rows = rows[(jnp.arange(shards)[:, None] * (size // shards) + local).reshape(-1)]
        state = self._take_local(state, local)
    generated = full.history[:, window - 1:]
    lengths = jnp.sum(generated != token_ops.NO_TOKEN, axis=1).astype(jnp.int32)
    tokens = jnp.where(generated == token_ops.NO_TOKEN, settings.pad_id, generated)
    return SampleOutput(tokens=tokens, logprobs=full.logprobs, behaviour_logprobs=full.behaviour_logprobs,
                        lengths=lengths, done=full.done, prefix=None if compact else state.prefix)

  def _batch_axes(self, batch: int) -> tuple[str, ...]:
    """The mesh axes a batch of `batch` rows is split over (by the rules, where they divide)."""
    if self.mesh is None:
      return ()
    spec = sharding.partition_spec((batch,), ("batch",), self.mesh, self.rules)[0]
    return (spec,) if isinstance(spec, str) else tuple(spec or ())

  def _compaction_sizes(self, batch: int) -> tuple[list[int], int]:
    """Batch sizes the decode loop compacts to (halvings of `batch` that still split over the batch shards), and
    the number of shards."""
    shards = math.prod(self.mesh.shape[a] for a in self._batch_axes(batch)) if self.mesh is not None else 1
    sizes = [batch]
    while len(sizes) <= self.compaction_levels and sizes[-1] % 2 == 0 and (sizes[-1] // 2) % shards == 0:
      sizes.append(sizes[-1] // 2)
    return sizes, shards

  def _take_local(self, state: DecodeState, local: jax.Array) -> DecodeState:
    """Each batch shard keeps its rows `local` [shards, k] (indices within the shard), on its own devices: a take
    with global indices would make XLA gather the whole cache onto every device (8x the cache on 8 shards)."""
    axes = self._batch_axes(state.done.shape[0])
    if not axes:
      return _take_rows(state, local.reshape(-1))
    rows, cache_rows = jax.sharding.PartitionSpec(axes), jax.sharding.PartitionSpec(None, axes)
    prefix = Prefix(cache=KVCache(cache_rows, cache_rows), key_valid=rows, write_index=jax.sharding.PartitionSpec(),
                    next_position=rows, last_logits=rows)
    specs = DecodeState(step=jax.sharding.PartitionSpec(), prefix=prefix, history=rows, logprobs=rows,
                        behaviour_logprobs=rows, done=rows, keys=rows)
    take = jax.shard_map(lambda st, idx: _take_rows(st, idx[0]), mesh=self.mesh, in_specs=(specs, rows),
                         out_specs=specs, axis_names=frozenset(axes), check_vma=False)
    taken = take(state, local)
    return taken.replace(prefix=self._constrain_prefix(taken.prefix))

  # -- public API ----------------------------------------------------------------------------------------------

  def prefill(self, params, batch: dict[str, Any], max_new_tokens: int, extra_slots: int = 0,
              max_prompt_length: int | None = None) -> Prefix:
    """Runs the prompt (left-padded to a bucket length) and reserves cache room for generation.

    `batch` holds the processor's arrays (input_ids, attention_mask, pixel values and grids). `extra_slots`
    reserves room for later `extend` calls.
    """
    ids = np.asarray(batch["input_ids"])
    mask = np.asarray(batch.get("attention_mask", np.ones_like(ids)))
    lengths = mask.sum(axis=1)
    if max_prompt_length is not None and lengths.max() > max_prompt_length:
      row = int(lengths.argmax())
      raise ValueError(f"prompt {row} has {int(lengths[row])} tokens, more than max_prompt_length="
                       f"{max_prompt_length}; shorten it or raise the limit")
    if mask[:, -1].min() == 0 and (mask.sum(axis=1) > 0).all():
      raise ValueError("prompts must be left-padded (the last column holds every row's last token)")
    length = bucket_length(ids.shape[1])
    ids, mask = pad_left(ids, mask, length, self.model.config.pad_token_id or 0)
    prepared = prepare_inputs(self.model.config, ids, mask, batch.get("image_grid_thw"), batch.get("video_grid_thw"),
                              batch.get("second_per_grid_ts"), batch.get("pixel_values"),
                              batch.get("pixel_values_videos"), int(batch.get("padding_images", 0)),
                              vision_shards=shard_axes(self.mesh, self.rules))
    return self.jitted_prefill(params, ids, mask, batch.get("pixel_values"), batch.get("pixel_values_videos"), prepared,
                         capacity=length + max_new_tokens + extra_slots)

  def extend(self, params, prefix: Prefix, tokens, valid=None) -> Prefix:
    """Appends token blocks [B, n] (left-padded per row by `valid`) to a prefix; the prompt is not recomputed."""
    tokens = np.asarray(tokens, np.int32)
    valid = np.ones(tokens.shape, bool) if valid is None else np.asarray(valid, bool)
    width = bucket_length(tokens.shape[1], minimum=1)
    tokens, valid = pad_left(tokens, valid, width)
    if int(prefix.write_index) + width > prefix.capacity:
      raise ValueError(f"the prefix has room for {prefix.capacity - int(prefix.write_index)} more slots, "
                       f"{width} are needed; prefill with more extra_slots")
    return self.jitted_extend(params, prefix, tokens, valid)

  def decode(self, params, prefix: Prefix, rng: jax.Array, settings: SamplingSettings, num_samples: int = 1,
             keep_prefix: bool = False, first_row: int = 0, compact: bool = False) -> SampleOutput:
    """Samples up to `settings.max_new_tokens` per row (x `num_samples`). Rows are ordered prompt-major.

    Row i samples with its own key, fold_in(rng, first_row + i): a batch generated in chunks (each with its
    first row's index) gives exactly the samples of the whole batch at once. With `compact`, finished rows stop
    costing (the live ones move into a batch half the size, up to `compaction_levels` times); the samples are the
    same, and no prefix is returned to continue from.
    """
    settings.validate()
    room = prefix.capacity - int(prefix.write_index)
    if settings.max_new_tokens > room:
      raise ValueError(f"the prefix has room for {room} new tokens, max_new_tokens={settings.max_new_tokens}")
    decode = self.jitted_decode(num_samples, keep_prefix)
    return decode(params, prefix, rng, jnp.asarray(first_row, jnp.int32), settings=settings, num_samples=num_samples,
                  compact=compact, filled=filled_floor(int(prefix.write_index)))

  def jitted_decode(self, num_samples: int, keep_prefix: bool = False):
    """The decode program `decode` runs: it donates the prefix unless it is kept (with several samples per row the
    cache grows, so the prefix's buffers cannot be reused anyway)."""
    return self._decode_keep if keep_prefix or num_samples > 1 else self._decode

  def generate(self, params, batch: dict[str, Any], rng: jax.Array, settings: SamplingSettings,
               num_samples: int = 1, first_row: int = 0, compact: bool = False) -> SampleOutput:
    """prefill + decode."""
    prefix = self.prefill(params, batch, settings.max_new_tokens)
    return self.decode(params, prefix, rng, settings, num_samples, first_row=first_row, compact=compact)
