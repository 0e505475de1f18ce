"""The sampler against transformers' generate, and its own invariants (log-probs, groups, stops, prefixes, mesh)."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from safework import sharding
from safework.models import forward, from_pretrained
from safework.models.checkpoint import abstract_params
from safework.sampling import Sampler, SamplingSettings, bucket_length
from safework.sampling.shapes import attention_spans
from safework.sampling.tokens import sample_tokens
from tests import hf_reference as ref

PATCH_DIM = 3 * 2 * 14 * 14
GREEDY = SamplingSettings(max_new_tokens=10, temperature=0.0)


@pytest.fixture(scope="module")
def setup(hf_checkpoints):
  path, hf = hf_checkpoints(tied=False, kv_heads=2)
  model, params = from_pretrained(path)
  return hf, model, params, Sampler(model)


def _image_batch(grids, text=(10, 11, 12)):
  ids = np.array([ref.image_prompt(grids, list(text))])
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values=ref.pixels(grids, PATCH_DIM),
              image_grid_thw=np.array(grids))


def _padded_batch():
  grids = [(1, 4, 6)]
  long_row = ref.image_prompt(grids, [10, 11, 12, 13])
  short_row = [ref.IM_START, 15, 16, 17, ref.IM_END, ref.IM_START, 9]
  ids = np.full((2, len(long_row)), ref.PAD)
  mask = np.zeros_like(ids)
  ids[0], mask[0] = long_row, 1
  ids[1, -len(short_row):], mask[1, -len(short_row):] = short_row, 1
  return dict(input_ids=ids, attention_mask=mask, pixel_values=ref.pixels(grids, PATCH_DIM), image_grid_thw=np.array(grids))


def _hf_greedy(hf, batch, steps):
  tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
  tensors["mm_token_type_ids"] = torch.from_numpy(ref.token_types(batch["input_ids"]))
  out = hf.generate(**tensors, max_new_tokens=steps, do_sample=False, repetition_penalty=1.0, eos_token_id=None,
                    pad_token_id=ref.PAD)
  return out[:, batch["input_ids"].shape[1]:].numpy()


def _video_batch():
  grids = [(2, 4, 6)]
  ids = np.array([ref.image_prompt(grids, [10, 11], token=ref.VIDEO)])
  return dict(input_ids=ids, attention_mask=np.ones_like(ids), pixel_values_videos=ref.pixels(grids, PATCH_DIM),
              video_grid_thw=np.array(grids), second_per_grid_ts=np.array([0.5], np.float32))


@pytest.mark.parametrize("make_batch,attention", [(lambda: _image_batch([(1, 4, 6), (1, 10, 14)]), "einsum"),
                                                  (_video_batch, "einsum"), (_padded_batch, "einsum"),
                                                  (_padded_batch, "blockwise")],
                         ids=["two_images", "video", "left_padded", "left_padded_blockwise"])
def test_greedy_tokens_equal_transformers_generate(setup, make_batch, attention):
  hf, model, params, sampler = setup
  if attention != model.attention:   # the same weights through the flash-attention kernel
    sampler = Sampler(model.clone(attention=attention))
  batch = make_batch()
  out = sampler.generate(params, batch, jax.random.key(0), GREEDY)
  np.testing.assert_array_equal(np.asarray(out.tokens), _hf_greedy(hf, batch, GREEDY.max_new_tokens))
  assert np.all(np.asarray(out.lengths) == GREEDY.max_new_tokens)


def test_logprobs_equal_teacher_forced_forward(setup):
  _, model, params, sampler = setup
  batch = _padded_batch()
  out = sampler.generate(params, batch, jax.random.key(1), SamplingSettings(max_new_tokens=8, temperature=1.0))
  tokens = np.asarray(out.tokens)
  full = dict(batch, input_ids=np.concatenate([batch["input_ids"], tokens], 1),
              attention_mask=np.concatenate([batch["attention_mask"], np.ones_like(tokens)], 1))
  logits = np.asarray(forward(model, params, **full), np.float64)
  prompt_len = batch["input_ids"].shape[1]
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - \
      logits.max(-1, keepdims=True)
  expected = np.take_along_axis(logp[:, prompt_len - 1:-1], tokens[..., None], -1)[..., 0]
  np.testing.assert_allclose(np.asarray(out.logprobs), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("settings", [
    SamplingSettings(temperature=0.7),
    SamplingSettings(temperature=1.0, top_k=4),
    SamplingSettings(temperature=1.3, top_p=0.8),
    SamplingSettings(temperature=0.9, top_k=5, top_p=0.6),
])
def test_sampling_distribution_matches_the_truncated_softmax(settings):
  logits = jnp.asarray([[2.0, 1.5, 1.2, 0.3, 0.0, -0.4, -1.0, -2.5]])
  draws = 40_000
  keys = jax.random.split(jax.random.key(7), draws)
  rows = jnp.broadcast_to(logits, (draws, logits.shape[1]))   # one row per draw, each with its own key
  tokens, behaviour = jax.jit(lambda k: sample_tokens(k, rows, settings))(keys)
  tokens, behaviour = np.asarray(tokens), np.asarray(behaviour)
  empirical = np.bincount(tokens, minlength=8) / draws
  # The reference distribution, computed independently in numpy: temperature, then top-k, then nucleus.
  scaled = np.asarray(logits[0], np.float64) / settings.temperature
  order = np.argsort(-scaled)
  keep = np.zeros(8, bool)
  keep[order[:settings.top_k or 8]] = True
  p = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
  p /= p.sum()
  mass = 0.0
  for i in order:
    if mass >= settings.top_p:
      p[i] = 0.0
    mass += p[i]
  p /= p.sum()
  # Total variation: with 40k draws over 8 tokens the sampling error is below 0.01 (about 5 sigma); the margin
  # is 0.015. Tokens outside the truncation are never drawn.
  assert 0.5 * np.abs(empirical - p).sum() < 0.015
  assert np.all(empirical[p == 0] == 0)
  # The returned behaviour log-prob of every draw is that of the distribution it was drawn from.
  np.testing.assert_allclose(behaviour, np.log(p[tokens]), atol=1e-5)


def test_group_samples_share_one_prefill_and_rows_sample_alike_alone(setup):
  _, _, params, sampler = setup
  batch, groups = _padded_batch(), 3
  settings = SamplingSettings(max_new_tokens=6, temperature=1.0)
  grouped = sampler.generate(params, batch, jax.random.key(3), settings, num_samples=groups)
  assert len(set(map(tuple, np.asarray(grouped.tokens)[:groups]))) > 1   # the samples of one prompt differ
  # Each row draws with its own key: generated alone (a chunk of one row, first_row = its index), a prompt gets
  # exactly the samples it got beside the others.
  alone = [dict(input_ids=batch["input_ids"][:1], attention_mask=batch["attention_mask"][:1],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"]),
           dict(input_ids=batch["input_ids"][1:], attention_mask=batch["attention_mask"][1:])]
  for row, one in enumerate(alone):
    out = sampler.generate(params, one, jax.random.key(3), settings, num_samples=groups, first_row=row)
    rows = slice(row * groups, (row + 1) * groups)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(grouped.tokens)[rows])
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(grouped.logprobs)[rows], atol=1e-5)


def test_eos_stop_sequences_and_early_exit(setup):
  _, _, params, sampler = setup
  batch = _padded_batch()
  free = np.asarray(sampler.generate(params, batch, jax.random.key(0), GREEDY).tokens)
  stop = tuple(int(t) for t in free[0, 2:4])   # row 0 stops after its 4th token
  eos = int(free[1, 1])                        # row 1 stops at its 2nd token
  settings = GREEDY.replace(stop_sequences=(stop,), eos_ids=(eos,))
  out = sampler.generate(params, batch, jax.random.key(0), settings)
  lengths = np.asarray(out.lengths)
  first_stop = min(i for i in range(3, 10) if tuple(free[0, i - 1:i + 1]) == stop or free[0, i] == eos)
  assert lengths[1] == 2 and lengths[0] == first_stop + 1 and np.all(np.asarray(out.done))
  np.testing.assert_array_equal(np.asarray(out.tokens)[0, :lengths[0]], free[0, :lengths[0]])
  assert np.all(np.asarray(out.tokens)[1, 2:] == GREEDY.pad_id) and np.all(np.asarray(out.logprobs)[1, 2:] == 0)
  # The loop left early: it ran as many steps as the longest row needed, not max_new_tokens.
  steps = int(out.prefix.write_index) - bucket_length(batch["input_ids"].shape[1])
  assert steps == lengths.max() < GREEDY.max_new_tokens


def test_continuing_from_a_prefix_equals_generating_in_one_go(setup):
  _, _, params, sampler = setup
  batch = _padded_batch()
  whole = np.asarray(sampler.generate(params, batch, jax.random.key(0), GREEDY).tokens)
  prefix = sampler.prefill(params, batch, max_new_tokens=GREEDY.max_new_tokens, extra_slots=4)
  # Row 0 continues after 4 tokens; row 1 after 2 (left-padded block).
  block, valid = whole[:, :4].copy(), np.ones((2, 4), bool)
  block[1, :2], block[1, 2:], valid[1, :2] = 0, whole[1, :2], False
  resumed = sampler.decode(params, sampler.extend(params, prefix, block, valid), jax.random.key(0),
                           GREEDY.replace(max_new_tokens=6))
  np.testing.assert_array_equal(np.asarray(resumed.tokens)[0], whole[0, 4:10])
  np.testing.assert_array_equal(np.asarray(resumed.tokens)[1], whole[1, 2:8])
  # An edited prefix changes what follows, and decoding the edit matches a fresh prompt that contains it.
  edited = np.array([[20, 21], [22, 23]])
  via_extend = sampler.decode(params, sampler.extend(params, prefix, edited), jax.random.key(0),
                              GREEDY.replace(max_new_tokens=5))
  fresh = dict(batch, input_ids=np.concatenate([batch["input_ids"], edited], 1),
               attention_mask=np.concatenate([batch["attention_mask"], np.ones_like(edited)], 1))
  via_prompt = sampler.generate(params, fresh, jax.random.key(0), GREEDY.replace(max_new_tokens=5))
  np.testing.assert_array_equal(np.asarray(via_extend.tokens), np.asarray(via_prompt.tokens))


def test_same_outputs_on_a_mesh(setup, hf_checkpoints):
  _, _, params, sampler = setup
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  path, _ = hf_checkpoints(tied=False, kv_heads=2)
  model, sharded = from_pretrained(
      path, shardings=lambda m: sharding.param_shardings(abstract_params(m), mesh, sharding.DEFAULT_RULES))
  batch = _padded_batch()
  settings = SamplingSettings(max_new_tokens=6, temperature=1.0)
  expected = sampler.generate(params, batch, jax.random.key(5), settings, num_samples=2)
  with jax.set_mesh(mesh):
    out = Sampler(model, mesh=mesh).generate(sharded, batch, jax.random.key(5), settings, num_samples=2)
  assert out.prefix.cache.k.sharding.spec[1] == "data"   # [layers, batch, ...]
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
  np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5)


def test_bad_requests(setup):
  _, _, params, sampler = setup
  batch = _padded_batch()
  with pytest.raises(ValueError, match="more than max_prompt_length"):
    sampler.prefill(params, batch, max_new_tokens=4, max_prompt_length=8)
  prefix = sampler.prefill(params, batch, max_new_tokens=4)
  with pytest.raises(ValueError, match="room for 4 new tokens"):
    sampler.decode(params, prefix, jax.random.key(0), GREEDY)
  with pytest.raises(ValueError, match="extra_slots"):
    sampler.extend(params, prefix, np.ones((2, 8), np.int32))
  right_padded = dict(batch, input_ids=batch["input_ids"][:, ::-1].copy(), attention_mask=batch["attention_mask"][:, ::-1])
  with pytest.raises(ValueError, match="left-padded"):
    sampler.prefill(params, right_padded, max_new_tokens=4)
  with pytest.raises(ValueError, match="top_p"):
    GREEDY.replace(top_p=0.0)


def _ban_and_force(banned, forced, logits, history, step):
  """Bans one token everywhere and forces another at step 2."""
  logits = logits.at[:, banned].set(-jnp.inf)
  return jnp.where(step == 2, jnp.full_like(logits, -jnp.inf).at[:, forced].set(0.0), logits)


def test_logits_processor_hook_masks_tokens(setup):
  _, _, params, sampler = setup
  batch = _image_batch([(1, 4, 6)])
  free = np.asarray(sampler.generate(params, batch, jax.random.key(0), GREEDY).tokens)
  banned, forced = int(free[0, 0]), int(free[0, 2]) + 1   # the unconstrained output starts with the banned token
  hook = functools.partial(_ban_and_force, banned, forced)
  out = sampler.generate(params, batch, jax.random.key(0), GREEDY.replace(logits_processor=hook))
  tokens = np.asarray(out.tokens)
  assert banned not in tokens and tokens[0, 2] == forced
  # Log-probs stay those of the policy, not of the processed distribution.
  assert np.all(np.asarray(out.logprobs) < 0)


def test_decoding_in_spans_of_the_cache_equals_attending_all_of_it(setup):
  _, model, params, sampler = setup
  settings = SamplingSettings(max_new_tokens=40, temperature=1.0)
  prefix = sampler.prefill(params, _padded_batch(), 40, extra_slots=200)   # capacity 256
  assert attention_spans(256, 32) == [32, 64, 128, 256] and attention_spans(100, 128) == [100]
  assert attention_spans(176, 128) == [176] and attention_spans(2100, 128) == [128, 256, 512, 1024, 2100]
  assert attention_spans(2100, 128, filled=256) == [512, 1024, 2100]   # the prompt fills the short spans
  spans = Sampler(model, min_span=32).decode(params, prefix, jax.random.key(2), settings, keep_prefix=True)
  whole = Sampler(model, min_span=256).decode(params, prefix, jax.random.key(2), settings, keep_prefix=True)
  np.testing.assert_array_equal(np.asarray(spans.tokens), np.asarray(whole.tokens))
  np.testing.assert_allclose(np.asarray(spans.logprobs), np.asarray(whole.logprobs), atol=1e-5)
  assert int(spans.prefix.write_index) > 32   # the steps crossed from one span into the next


def _stop_after_multiples_of_five(eos):
  def process(logits, history, step):   # a rule of each row's own tokens: rows end unevenly
    last = jnp.take_along_axis(history, jnp.maximum(step - 1, 0)[None, None].repeat(len(history), 0), axis=1)[:, 0]
    end = (step > 0) & (last % 5 == 0)
    return jnp.where(end[:, None], jnp.where(jnp.arange(logits.shape[1]) == eos, 0.0, -jnp.inf), logits)
  return process


def _eight_prompts():
  batch = {k: np.repeat(v, 4, axis=0) if k in ("input_ids", "attention_mask") else v for k, v in _padded_batch().items()}
  batch["pixel_values"] = np.concatenate([batch["pixel_values"]] * 4)
  batch["image_grid_thw"] = np.repeat(batch["image_grid_thw"], 4, axis=0)
  return batch


def _assert_same_samples(got, expected):
  for name in ("tokens", "lengths", "done"):
    np.testing.assert_array_equal(np.asarray(getattr(got, name)), np.asarray(getattr(expected, name)), err_msg=name)
  np.testing.assert_allclose(np.asarray(got.logprobs), np.asarray(expected.logprobs), atol=1e-5)
  np.testing.assert_allclose(np.asarray(got.behaviour_logprobs), np.asarray(expected.behaviour_logprobs), atol=1e-5)


def test_compacting_finished_rows_samples_exactly_the_same(setup):
  _, model, params, _ = setup
  batch, eos = _eight_prompts(), 7
  settings = SamplingSettings(max_new_tokens=24, temperature=1.0, eos_ids=(eos,),
                              logits_processor=_stop_after_multiples_of_five(eos))
  sampler = Sampler(model, compaction_levels=2)
  assert sampler._compaction_sizes(8) == ([8, 4, 2], 1)
  plain = sampler.generate(params, batch, jax.random.key(4), settings)
  compact = sampler.generate(params, batch, jax.random.key(4), settings, compact=True)
  lengths = np.asarray(plain.lengths)
  assert len(set(lengths.tolist())) > 2 and (lengths < 24).sum() >= 6   # rows end at different steps
  _assert_same_samples(compact, plain)
  assert compact.prefix is None


def test_compacting_on_a_mesh_keeps_rows_on_their_devices(setup):
  """32 rows over 8 batch shards compact to 16 and 8 shard by shard: the same samples, and the cache is never
  gathered (a take with global row indices made XLA copy the whole cache to every device: ~11x its share)."""
  _, model, params, _ = setup
  batch, eos = _eight_prompts(), 7
  settings = SamplingSettings(max_new_tokens=24, temperature=1.0, eos_ids=(eos,),
                              logits_processor=_stop_after_multiples_of_five(eos))
  plain = Sampler(model).generate(params, batch, jax.random.key(4), settings, num_samples=4)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  sampler = Sampler(model, mesh=mesh, compaction_levels=2)
  assert sampler._compaction_sizes(32) == ([32, 16, 8], 8)
  with jax.set_mesh(mesh):
    prefix = sampler.prefill(params, batch, settings.max_new_tokens)
    compact = sampler.decode(params, prefix, jax.random.key(4), settings, num_samples=4, compact=True)
    compiled = sampler.jitted_decode(4).lower(params, prefix, jax.random.key(4), jnp.int32(0), settings=settings,
                                              num_samples=4, compact=True).compile()
  lengths = np.asarray(plain.lengths)
  assert len(set(lengths.tolist())) > 2 and (lengths < 24).sum() >= 24   # most rows finish early: both levels run
  _assert_same_samples(compact, plain)
  cache_share = 2 * prefix.cache.k.size * prefix.cache.k.dtype.itemsize * 4 // 8   # k and v, 4 samples, 8 shards
  assert compiled.memory_analysis().temp_size_in_bytes < 4 * cache_share
