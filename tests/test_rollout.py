"""DAPO's data filters (dynamic sampling, overlong shaping in tokens), the typed rollout and its checkpoint buffer,
and the behaviour-policy correction of the importance ratio."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np
import pytest

from experiments import toy_rl
from safework.data.example import Example
from safework.models import Qwen25VL, get_preset, init_params
from safework.processing import Processor
from safework.rewards.base import Rewards
from safework.rl.batch import micro_batch_layout
from safework.rl import losses
from safework.rl.rollout import (Rollout, RolloutSettings, _Round, assemble, behaviour_ratio_stats,
                                 overlong_shaping, sample_round)
from safework.sampling import PromptBatch, Sampler, SamplingSettings
from safework.stages import from_config
from safework.tasks import get_task
from safework.training import Checkpointer, read_metrics

G, N = 2, 5
SETTINGS = RolloutSettings(prompts_per_rollout=4, samples_per_prompt=G, max_new_tokens=N, minibatch_size=8,
                           max_prompt_length=64, bucket_images=0)


def _round(processor, offset: int, group_rewards: list[float], equal: list[bool]) -> _Round:
  examples = [Example(f"question {offset + p}") for p in range(len(group_rewards))]
  rows = len(examples) * G
  rewards = np.array([r if eq else r + 0.5 * g for r, eq in zip(group_rewards, equal) for g in range(G)], np.float32)
  outputs = {"responses": np.arange(rows * N).reshape(rows, N).astype(np.int32) + 1000 * offset,
             "lengths": np.full(rows, N, np.int32), "done": np.ones(rows, bool),
             "policy_logp": np.full((rows, N), -1.0, np.float32),
             "behaviour_logp": np.full((rows, N), -1.0, np.float32)}
  scored = Rewards(total=rewards, components={"format": np.ones(rows, np.float32)})
  return _Round(examples, PromptBatch.of(examples, processor, 64, 0), outputs, scored, rewards, np.ones(rows, bool))


@pytest.fixture(scope="module")
def processor(tiny_tokenizer):
  return Processor(tiny_tokenizer)


def test_dynamic_sampling_keeps_groups_with_a_preference_first_in_sampling_order(processor):
  first = _round(processor, 0, [0.1, 1.0, 0.1, 1.0], equal=[True, False, True, False])
  second = _round(processor, 10, [1.0, 0.0, 1.1, 1.0], equal=[False, False, True, False])
  rollout, metrics = assemble([first, second], dataclasses.replace(SETTINGS, dynamic_sampling=True), processor)
  # Informative groups: round 0's prompts 1 and 3, then round 1's prompts 0 and 1 (the batch is full).
  questions = [processor.decode(ids[mask > 0]) for ids, mask in zip(rollout.prompts.input_ids,
                                                                    rollout.prompts.attention_mask)]
  assert [q.split("question ")[1].split()[0] for q in questions] == ["1", "3", "10", "11"]
  expected_rows = np.concatenate([first.outputs["responses"][2:4], first.outputs["responses"][6:8],
                                  second.outputs["responses"][0:4]])
  np.testing.assert_array_equal(rollout.responses, expected_rows)
  assert metrics["groups/all_equal_fraction"] == 0.5 and metrics["groups/all_equal_in_batch"] == 0.0
  assert metrics["groups/sampling_rounds"] == 2.0
  plain, plain_metrics = assemble([first], SETTINGS, processor)   # off: the first round as it is
  np.testing.assert_array_equal(plain.responses, first.outputs["responses"])
  assert plain.prompts is first.prompts and plain_metrics["groups/all_equal_in_batch"] == 0.5


def test_dynamic_sampling_fills_with_equal_groups_when_the_rounds_run_out(processor):
  only = _round(processor, 0, [0.1, 1.0, 0.1, 0.1], equal=[True, False, True, True])
  rollout, metrics = assemble([only], dataclasses.replace(SETTINGS, dynamic_sampling=True), processor)
  assert len(rollout.responses) == 8 and metrics["groups/all_equal_in_batch"] == 0.75


def test_micro_batches_group_rows_of_similar_length_and_widths_follow_the_bucket():
  lengths = np.array([5, 1, 9, 3, 7, 2, 8, 4])
  layout = micro_batch_layout(np.arange(8), lengths, micro_batches=2)
  assert sorted(layout.tolist()) == list(range(8))
  # Micro-batch j takes positions j, j + 2, ...: the four longest rows, then the four shortest.
  assert sorted(layout[0::2].tolist()) == [0, 2, 4, 6] and sorted(layout[1::2].tolist()) == [1, 3, 5, 7]
  assert micro_batch_layout(np.array([6, 1, 3, 0]), lengths, 2)[0::2].tolist() == [6, 0]   # a minibatch's own rows
  assert RolloutSettings(max_new_tokens=8192, response_bucket=1024).response_widths == (1024, 2048, 4096)
  assert RolloutSettings(max_new_tokens=10, response_bucket=16).response_widths == ()
  assert RolloutSettings(max_new_tokens=8192).response_widths == ()


def test_overlong_responses_are_masked_or_penalised_in_tokens():
  lengths, done = np.array([4, 7, 9, 10, 10]), np.array([True, True, True, True, False])
  change, trained = overlong_shaping(lengths, done, RolloutSettings(max_new_tokens=10, overlong="mask"))
  np.testing.assert_array_equal(trained, [True, True, True, True, False]) and np.testing.assert_array_equal(change, 0)
  soft = RolloutSettings(max_new_tokens=10, overlong="soft", overlong_buffer=4, overlong_penalty=0.5)
  change, trained = overlong_shaping(lengths, done, soft)
  # Linear from 0 at 10 - 4 = 6 tokens to -0.5 at 10; a response cut at the limit gets the whole penalty.
  np.testing.assert_allclose(change, [0.0, -0.125, -0.375, -0.5, -0.5]) and np.testing.assert_array_equal(trained, 1)
  with pytest.raises(ValueError, match="overlong='soft' needs 0 < overlong_buffer"):
    RolloutSettings(max_new_tokens=10, overlong="soft").validate()


def test_a_rollout_round_trips_through_its_checkpoint_buffer(processor, tmp_path):
  rollout, _ = assemble([_round(processor, 0, [0.0, 1.0, 0.0, 1.0], equal=[False] * 4)], SETTINGS, processor)
  rollout.advantages = np.linspace(-1, 1, 8).astype(np.float32)
  rollout.ref_logp = np.full((8, N), -2.0, np.float32)
  checkpointer = Checkpointer(tmp_path, async_save=False)
  checkpointer.save(1, {"x": np.zeros(1)}, {}, rollout.to_buffer())
  _, _, buffer = checkpointer.restore(1, {"x": np.zeros(1)})
  back = Rollout.from_buffer(buffer)
  checkpointer.close()
  for field in dataclasses.fields(Rollout):
    mine, theirs = getattr(back, field.name), getattr(rollout, field.name)
    if field.name == "prompts":
      for key, value in dataclasses.asdict(theirs).items():
        np.testing.assert_array_equal(dataclasses.asdict(mine)[key], value)
    elif field.name == "components":
      assert mine.keys() == theirs.keys() and all(np.array_equal(mine[k], theirs[k]) for k in theirs)
    elif theirs is None:
      assert mine is None
    else:
      np.testing.assert_array_equal(mine, theirs)


def test_the_importance_ratio_is_corrected_for_the_distribution_sampled_from():
  old = np.log(np.array([[0.5, 0.1, 0.02]], np.float32))
  behaviour = np.log(np.array([[0.5, 0.4, 0.005]], np.float32))   # top-k / temperature moved mass around
  weights = np.asarray(losses.behaviour_weights(old, behaviour, losses.LossSettings(behaviour_cap=2.0)))
  np.testing.assert_allclose(weights, [[1.0, 0.25, 2.0]], rtol=1e-6)   # pi_old / mu, truncated at the cap
  off = losses.LossSettings(behaviour_correction="none")
  np.testing.assert_array_equal(np.asarray(losses.behaviour_weights(old, behaviour, off)), 1.0)
  rollout = Rollout(prompts=None, responses=np.zeros((1, 3), np.int32), lengths=np.array([2]), done=np.ones(1, bool),
                    policy_logp=old, behaviour_logp=behaviour, rewards=np.zeros(1), components={},
                    trained=np.ones(1, bool))
  stats = behaviour_ratio_stats(rollout)   # over the response's tokens only (2 of 3), before truncation
  assert stats == pytest.approx({"behaviour_ratio/min": 0.25, "behaviour_ratio/mean": 0.625,
                                 "behaviour_ratio/max": 1.0})


def test_dynamic_sampling_on_a_binary_reward_refills_and_resumes_from_its_stream_position(tmp_path):
  def binary(examples, responses, lengths):   # most groups start all-zero: nothing to learn from them
    hit = np.array([float(e.answer in r) for e, r in zip(examples, responses)], np.float32)
    return Rewards(total=hit, components={"hit": hit})
  config = toy_rl.get_config("runlocal")
  config.rollout.update(num_rollouts=2, dynamic_sampling=True, max_sampling_rounds=3, top_k=20)
  config.train.progress_bar = False
  data = dataclasses.replace(get_task(config.task, config.seed), reward=binary)
  from_config(config, tmp_path, data)()
  rows = [r for r in read_metrics(tmp_path) if "groups/sampling_rounds" in r]
  assert len(rows) == 2 and rows[0]["groups/sampling_rounds"] > 1
  assert all(r["groups/all_equal_in_batch"] <= r["groups/all_equal_fraction"] for r in rows)
  # The sampler drew from a top-k distribution: the trainer saw ratios below 1 and weighted them.
  assert rows[0]["behaviour_ratio/min"] < 1.0
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  rounds = sum(int(r["groups/sampling_rounds"]) for r in rows)
  assert checkpointer.meta(checkpointer.latest_step())["data_position"] == 16 * rounds   # prompts consumed
  checkpointer.close()


def test_generating_in_chunks_samples_exactly_what_one_batch_does(processor):
  model = Qwen25VL(get_preset("tiny"))
  params = nn.meta.unbox(init_params(model, jax.random.key(0)))
  examples = [Example("question " + "x " * (3 * i)) for i in range(7)]   # prompts of different lengths
  no_reward = lambda rows, texts, lengths: Rewards(total=np.zeros(len(texts), np.float32), components={})
  sampling = SamplingSettings(max_new_tokens=6, temperature=1.0, vocab_limit=len(processor.tokenizer))
  settings = dataclasses.replace(SETTINGS, prompts_per_rollout=7, max_prompt_length=256)
  sample = lambda s: sample_round(examples, params, jax.random.key(5), sampler=Sampler(model), processor=processor,
                                  reward_fn=no_reward, settings=s, sampling=sampling)
  whole = sample(settings)
  chunked = sample(dataclasses.replace(settings, generation_prompts=3, compaction_levels=2))   # 3 + 3 + 1 prompts
  for name, value in whole.outputs.items():
    np.testing.assert_allclose(chunked.outputs[name], value, atol=1e-5, err_msg=name)
  assert len(set(map(tuple, whole.outputs["responses"]))) > 7   # the samples differ


def test_the_sampling_copy_is_cast_once_and_laid_out_for_decoding():
  from jax.sharding import PartitionSpec as P
  from safework import sharding
  mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  model = Qwen25VL(get_preset("tiny"))
  params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(0), mesh, sharding.DEFAULT_RULES)
  assert RolloutSettings().sampling_copy(model, mesh, sharding.DEFAULT_RULES) is None   # decode from the masters
  copy = RolloutSettings(sampling_dtype="bfloat16", sampling_replicated=True).sampling_copy(
      model, mesh, sharding.DEFAULT_RULES)(params)
  master, sampled = params["decoder"]["layers"]["q_proj"]["kernel"], copy["decoder"]["layers"]["q_proj"]["kernel"]
  assert master.sharding.spec == P(None, "fsdp", None, None)   # [layers, D, N, H]: D over fsdp for training
  assert sampled.dtype == jax.numpy.dtype("bfloat16") and sampled.sharding.is_fully_replicated   # no gathers
  np.testing.assert_array_equal(np.asarray(sampled), np.asarray(master).astype(jax.numpy.bfloat16))
  assert sharding.without_axis((("batch", ("data", "fsdp")), ("embed", "fsdp")), "fsdp") == (("batch", "data"),
                                                                                            ("embed", None))
  with pytest.raises(ValueError, match="sampling_dtype"):
    RolloutSettings(sampling_dtype="bf16").validate()
