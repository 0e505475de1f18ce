"""The rollout-train loop on the toy task: it learns, it resumes exactly, it survives SIGTERM, it guards updates.

A SIGTERM from outside, through `python -m safework.main`, is tested with two hosts in test_multihost.py.
"""

import dataclasses
import json
import os
import signal

import jax
import numpy as np
import pytest

from experiments import toy_rl
from safework.data import toy_digits
from safework.experiment import section
from safework.rewards.constraint import ConstraintSettings
from safework.rewards.base import Rewards
from safework import stages
from safework.stages import from_config
from safework.tasks import get_task
from safework.tools.calls import ToolSettings
from safework.training import Checkpointer, Preempted, TrainingDiverged, read_metrics


def _config(**changes):
  config = toy_rl.get_config("runlocal")
  config.train.progress_bar = False
  for name, value in changes.items():
    section, key = name.split("__")
    config[section][key] = value
  return config


def _train(config, workdir, reward_fn=None):
  data = dataclasses.replace(get_task(config.task, config.seed), reward=reward_fn) if reward_fn else None
  return from_config(config, workdir, data)()


def _rewards(workdir):
  return [r["reward/total"] for r in read_metrics(workdir) if "reward/total" in r]


def test_toy_rl_raises_the_reward(tmp_path):
  _train(_config(rollout__num_rollouts=6), tmp_path)
  rewards = _rewards(tmp_path)
  assert len(rewards) == 6
  # Measured (seed 0, 8 devices): 0.092 0.120 0.159 0.205 0.259 0.292.
  assert np.mean(rewards[-2:]) - rewards[0] > 0.12, rewards
  assert (tmp_path / "policy" / "model.safetensors").is_file()   # every stage writes its policy


class _Interrupt:
  """Wraps the task reward: on the given call, sends SIGTERM to this process (or raises, as a crash would)."""

  def __init__(self, at_call: int, crash: bool = False):
    self.calls, self.at_call, self.crash = 0, at_call, crash

  def __call__(self, examples, responses, lengths):
    self.calls += 1
    if self.calls == self.at_call:
      if self.crash:
        raise RuntimeError("simulated crash")
      os.kill(os.getpid(), signal.SIGTERM)
    return toy_digits.reward(examples, responses, lengths)


RESUME = dict(rollout__num_rollouts=2, train__checkpoint_every=2)   # 4 optimizer steps per rollout


@pytest.fixture(scope="module")
def uninterrupted_params(tmp_path_factory):
  return jax.device_get(_train(_config(**RESUME), tmp_path_factory.mktemp("straight")).params)


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm_mid_rollout", "crash_after_checkpoint"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(tmp_path, uninterrupted_params, crash):
  config = _config(**RESUME)
  interrupted = tmp_path / "interrupted"
  # SIGTERM arrives while rollout 1 is being scored: its first step (5) still runs, then a checkpoint holding the
  # rest of the rollout is written and the run stops. A crash there leaves the periodic checkpoint of step 4.
  with pytest.raises(RuntimeError if crash else Preempted):
    _train(config, interrupted, reward_fn=_Interrupt(at_call=2, crash=crash))
  assert Checkpointer(interrupted / "checkpoints").latest_step() == (4 if crash else 5)
  resumed = jax.device_get(_train(config, interrupted).params)
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted_params)
  steps = [r["step"] for r in read_metrics(interrupted)]
  assert steps == list(range(1, 9))   # every step logged once, in order, across the resume


def test_non_finite_rewards_and_bad_updates_are_reported(tmp_path):
  nan_reward = lambda examples, responses, lengths: Rewards(total=np.full(len(responses), np.nan, np.float32),
                                                            components={})
  with pytest.raises(FloatingPointError, match="reward 'total' is not finite"):
    _train(_config(rollout__num_rollouts=1), tmp_path / "nan_reward", reward_fn=nan_reward)
  # A finite blow-up: the learning rate makes every update as large as the parameters or larger.
  config = _config(rollout__num_rollouts=1, optim__learning_rate=1e6, optim__warmup_fraction=0.0,
                   train__on_bad_update="stop")
  with pytest.raises(TrainingDiverged, match=r"step 1: update norm .* x the parameter norm .*on_bad_update='stop'"):
    _train(config, tmp_path / "exploding")
  config.train.on_bad_update, config.train.max_consecutive_skips = "skip", 3
  with pytest.raises(TrainingDiverged, match="3 updates in a row were rejected"):
    _train(config, tmp_path / "skipping")
  rows = read_metrics(tmp_path / "skipping")
  assert [r["accepted"] for r in rows] == [0.0, 0.0, 0.0]   # logged before the run stopped
  config.optim.learning_rate = 1e30   # overflows: the update norm is not finite
  config.train.max_consecutive_skips = 10
  params = _train(config, tmp_path / "overflow").params   # 4 rejected updates, then the run ends
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  assert [r["accepted"] for r in read_metrics(tmp_path / "overflow")] == [0.0] * 4


def test_recomputed_old_logprobs_match_the_sampler_and_kl_can_go_in_the_reward(tmp_path):
  config = _config(rollout__num_rollouts=1, rollout__old_logprobs="recompute", loss__kl_in="reward",
                   loss__kl_beta=0.1)
  _train(config, tmp_path)
  first = read_metrics(tmp_path)[0]
  # Before any update the trainer's recomputed log-probs are the sampler's own (fp32): mismatch ~ 0.
  assert first["sampler_mismatch_abs"] < 1e-4
  assert first["reward/with_kl_penalty"] == pytest.approx(first["reward/total"], abs=1e-4)   # ref == policy at start


def test_a_tool_stage_without_a_corpus_is_named_before_any_weights_load(tmp_path, monkeypatch):
  """The toy task brings no search corpus and its questions no documents of their own, so tools.corpus must name
  one; the error comes before any parameters."""
  config = _config()
  config.tools = section(ToolSettings, corpus="")
  monkeypatch.setattr(stages, "policy_params", lambda *a, **k: pytest.fail("weights loaded before the check"))
  with pytest.raises(ValueError, match=r"prompt 0 .* brings no documents .*has no corpus: give tools.corpus"):
    _train(config, tmp_path)


def test_deliberative_rl_with_the_tool_and_the_constraint_resumes_with_its_multiplier(tmp_path):
  """Rollouts generated in chunks with the search tool at hand, the false-certain constraint on the reward (the
  toy's `requested` share is the correctness; no answer states a confidence, so a wrong one is false-certain). The
  run is stopped while scoring rollout 0; resumed, rollout 1 is penalised with the multiplier of one dual-ascent
  step on rollout 0's false-certain rate (a resume that lost it would start again from 0)."""
  corpus = tmp_path / "corpus.jsonl"
  corpus.write_text(json.dumps({"id": "d", "title": "Digits", "text": "seven is written 7"}) + "\n")
  config = _config(rollout__num_rollouts=2, rollout__prompts_per_rollout=8, rollout__samples_per_prompt=4,
                   rollout__minibatch_size=16, rollout__max_new_tokens=8, train__checkpoint_every=1)
  config.tools = section(ToolSettings, corpus=str(corpus), max_calls=1, result_tokens=40, chunk_tokens=4)
  config.constraint = section(ConstraintSettings, labels=("toy_digits",), correctness="requested", target=0.2,
                              threshold=0.5, step_size=1.5)
  with pytest.raises(Preempted):
    _train(config, tmp_path, reward_fn=_Interrupt(at_call=1))
  _train(config, tmp_path)
  rollouts = [r for r in read_metrics(tmp_path) if "constraint/multiplier" in r]
  assert len(rollouts) == 2 and rollouts[0]["constraint/multiplier"] == 0.0
  rate = rollouts[0]["constraint/false_certain_rate"]
  assert rate > 0.2 and rollouts[1]["constraint/multiplier"] == pytest.approx(1.5 * (rate - 0.2))
  assert rollouts[0]["tools/calls_per_answer"] == 0.0 and 0 <= rollouts[0]["calibration/ece"] <= 1
