"""The jitted update: training log-probs equal the sampler's, sharding and micro-batching change nothing,
frozen parameters stay put, non-finite updates are dropped."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safework import sharding
from safework.models import from_pretrained
from safework.models.checkpoint import abstract_params
from safework.rl import rollout as rollouts
from safework.rl.batch import VisionContext, vision_features
from safework.rl.logprobs import response_logprobs
from safework.rl.losses import LossSettings
from safework.rl.objectives import PolicyGradientObjective
from safework.rl.optim import OptimSettings, make_optimizer
from safework.sampling import Sampler, SamplingSettings, bucket_length
from safework.training import TrainState, make_train_step
from tests import hf_reference as ref

GROUP = 2


def sampled_rows(model, prompts: dict, out):
  """Training rows and vision inputs of 2 prompts x 2 samples the sampler drew, with advantages 1, -1, 0.5, -0.5."""
  rollout = rollouts.Rollout(
      prompts=rollouts.PromptBatch(**prompts), responses=np.asarray(out.tokens), lengths=np.asarray(out.lengths),
      done=np.asarray(out.done), policy_logp=np.asarray(out.logprobs),
      behaviour_logp=np.asarray(out.behaviour_logprobs), rewards=np.zeros(4, np.float32), components={},
      trained=np.ones(4, bool), advantages=np.array([1.0, -1.0, 0.5, -0.5], np.float32))
  return rollouts.training_rows(rollout, model.config, LossSettings())


@pytest.fixture(scope="module")
def rollout(hf_checkpoints):
  """Two prompts (one with an image) x 2 samples from the tiny reference model, laid out as training rows."""
  path, _ = hf_checkpoints(tied=False, kv_heads=2)
  model, params = from_pretrained(path)
  grids = [(1, 4, 6)]
  rows = [ref.image_prompt(grids, [10, 11, 12]), [ref.IM_START, 15, 16, 17, ref.IM_END, ref.IM_START, 9]]
  width = bucket_length(max(map(len, rows)))
  ids = np.full((2, width), ref.PAD, np.int32)
  mask = np.zeros((2, width), np.int32)
  for i, row in enumerate(rows):
    ids[i, -len(row):], mask[i, -len(row):] = row, 1
  prompts = dict(input_ids=ids, attention_mask=mask, pixel_values=ref.pixels(grids, 3 * 2 * 14 * 14),
                 image_grid_thw=np.array(grids))
  settings = SamplingSettings(max_new_tokens=6, temperature=1.0, eos_ids=(ref.IM_END,))
  out = Sampler(model).generate(params, prompts, jax.random.key(0), settings, num_samples=GROUP)
  batch, vision = sampled_rows(model, prompts, out)
  return model, params, batch, vision


def test_training_logprobs_equal_the_samplers(rollout):
  model, params, batch, vision = rollout
  features = vision_features(model, params, vision)
  logp, entropy = jax.jit(lambda p, b, f: response_logprobs(model, p, b, f, chunk=4))(params, batch, features)
  mask = np.asarray(batch.loss_mask).astype(bool)
  np.testing.assert_allclose(np.asarray(logp)[mask], np.asarray(batch.sampler_logp)[mask], atol=2e-5)
  assert np.all(np.asarray(entropy)[mask] > 0)


def _step(model, params, batch, vision, micro_batches=1, loss=LossSettings(policy_loss="ppo", kl_in="none"),
          freeze=None, mesh=None, widths=()):
  """One update; plain SGD with lr 1 (params - grads) unless `freeze` asks for the real optimizer."""
  if freeze is None:
    tx = optax.sgd(1.0)
  else:
    tx = make_optimizer(OptimSettings(learning_rate=1e-2, warmup_fraction=0.0, freeze_prefixes=freeze), 10, params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  objective = PolicyGradientObjective(model=model, logprob_chunk=4, loss=loss, response_widths=widths)
  step = make_train_step(objective, tx, micro_batches)
  context = VisionContext(vision=vision, features=vision_features(model, params, vision))
  if mesh is None:
    return jax.jit(step)(state, batch, context)
  with jax.set_mesh(mesh):
    place = lambda x: jax.device_put(x, sharding.batch_sharding(mesh, sharding.DEFAULT_RULES, x.ndim, x.shape[0]))
    return jax.jit(step)(state, jax.tree.map(place, batch), context)


def test_sharded_update_equals_single_device(rollout, hf_checkpoints):
  model, params, batch, vision = rollout
  expected_state, expected = _step(model, params, batch, vision)
  mesh = sharding.make_mesh({"data": 2, "fsdp": 1, "tensor": 4})
  path, _ = hf_checkpoints(tied=False, kv_heads=2)
  _, sharded = from_pretrained(
      path, shardings=lambda m: sharding.param_shardings(abstract_params(m), mesh, sharding.DEFAULT_RULES))
  state, metrics = _step(model, sharded, batch, vision, mesh=mesh)
  assert state.params["decoder"]["layers"]["q_proj"]["kernel"].sharding.spec[2] == "tensor"   # [layers, D, N, H]
  np.testing.assert_allclose(metrics["loss"], expected["loss"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], expected["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, expected_state.params)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_add_up_to_the_minibatch(rollout, aggregation):
  model, params, batch, vision = rollout
  loss = LossSettings(policy_loss="cpgd", kl_in="none", aggregation=aggregation)
  one_state, one = _step(model, params, batch, vision, micro_batches=1, loss=loss)
  four_state, four = _step(model, params, batch, vision, micro_batches=4, loss=loss)
  np.testing.assert_allclose(four["loss"], one["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(four["grad_norm"], one["grad_norm"], rtol=1e-4)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), four_state.params, one_state.params)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-sum-norm"])
def test_micro_batches_narrowed_to_their_longest_response_change_nothing(rollout, aggregation):
  """One row per micro-batch, each computed over the narrowest of 2, 4 or all 6 response columns that holds it."""
  model, params, batch, vision = rollout
  n, lengths, widths = batch.response_length, np.array([6, 1, 3, 2]), (2, 4)   # every branch runs
  valid = np.arange(n)[None] < lengths[:, None]   # the responses cut short (as if they had ended there)
  mask = np.asarray(batch.attention_mask).copy()
  mask[:, -n:] = valid
  batch = batch.replace(attention_mask=mask, loss_mask=np.asarray(batch.loss_mask) * valid)
  loss = LossSettings(policy_loss="cpgd", kl_in="none", aggregation=aggregation)
  full_state, full = _step(model, params, batch, vision, micro_batches=1, loss=loss)
  narrow_state, narrow = _step(model, params, batch, vision, micro_batches=4, loss=loss, widths=widths)
  np.testing.assert_allclose(narrow["loss"], full["loss"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(narrow["entropy"], full["entropy"], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), narrow_state.params, full_state.params)
  narrowed = batch.narrowed(int(lengths.max()))
  assert narrowed.loss_mask.shape[1] == int(lengths.max()) and narrowed.input_ids.shape[1] == (
      batch.input_ids.shape[1] - batch.response_length + int(lengths.max()))


def test_frozen_prefixes_do_not_move_and_unknown_prefixes_are_rejected(rollout):
  model, params, batch, vision = rollout
  state, _ = _step(model, params, batch, vision, freeze=("visual", "decoder/layers/q_proj"))
  jax.tree.map(np.testing.assert_array_equal, state.params["visual"], params["visual"])
  layers, before = state.params["decoder"]["layers"], params["decoder"]["layers"]
  jax.tree.map(np.testing.assert_array_equal, layers["q_proj"], before["q_proj"])
  assert not np.array_equal(layers["k_proj"]["kernel"], before["k_proj"]["kernel"])
  with pytest.raises(ValueError, match="matches no parameter"):
    make_optimizer(OptimSettings(freeze_prefixes=("vision_tower",)), 10, params)


def test_non_finite_updates_are_dropped(rollout):
  model, params, batch, vision = rollout
  poisoned = batch.replace(advantages=np.where(np.arange(4) == 0, np.nan, batch.advantages).astype(np.float32))
  state, metrics = _step(model, params, poisoned, vision)
  assert not metrics["accepted"] and int(state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, state.params, params)


@pytest.mark.parametrize("prefixes,trainable", [(("visual",), False), (("visual/",), False), ((), True),
                                                (("visual/merger",), True), (("decoder/layers",), True)])
def test_vision_features_leave_the_gradient_only_when_the_whole_tower_is_frozen(prefixes, trainable):
  assert OptimSettings(freeze_prefixes=prefixes).vision_trainable is trainable
