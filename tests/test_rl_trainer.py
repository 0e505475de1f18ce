"""The rollout-train loop on the toy task: it learns, it resumes exactly, it survives SIGTERM, it guards NaNs."""

import os
import signal
import subprocess
import sys
import time
import jax
import numpy as np
import pytest

from experiments import toy_rl
from safework.data import toy_digits
from safework.checkpointing import Checkpointer
from safework.metrics_writer import read_metrics
from safework.preemption import Preempted
from safework.rewards.base import Rewards
from safework.rl.build import rl_trainer_from_config


def _config(**train):
  config = toy_rl.get_config("runlocal")
  config.train.progress_bar = False
  config.train.update(train)
  return config


def _rewards(workdir):
  return [r["reward/total"] for r in read_metrics(workdir) if "reward/total" in r]


def test_toy_rl_raises_the_reward(tmp_path):
  rl_trainer_from_config(_config(rollouts=6), tmp_path).run()
  rewards = _rewards(tmp_path)
  assert len(rewards) == 6
  # Measured (seed 0, 8 devices): 0.093 0.106 0.154 0.205 0.257 0.309, rising to 0.39 by rollout ten.
  assert np.mean(rewards[-2:]) - rewards[0] > 0.12, rewards


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


def _final_params(workdir, config):
  trainer = rl_trainer_from_config(config, workdir)
  state = trainer.run()
  return jax.device_get(state.params)


RESUME_CONFIG = dict(rollouts=2, checkpoint_every=2)   # 4 optimizer steps per rollout


@pytest.fixture(scope="module")
def uninterrupted_params(tmp_path_factory):
  return _final_params(tmp_path_factory.mktemp("straight"), _config(**RESUME_CONFIG))


@pytest.mark.parametrize("crash", [False, True], ids=["sigterm_mid_rollout", "crash_after_checkpoint"])
def test_interrupted_and_resumed_run_equals_the_uninterrupted_run(tmp_path, uninterrupted_params, crash):
  config = _config(**RESUME_CONFIG)
  interrupted = tmp_path / "interrupted"
  # SIGTERM arrives while rollout 1 is being scored: its first step (5) still runs, then a checkpoint holding the
  # rest of the rollout is written and the run stops. A crash there leaves the periodic checkpoint of step 4.
  with pytest.raises(RuntimeError if crash else Preempted):
    rl_trainer_from_config(config, interrupted, reward_fn=_Interrupt(at_call=2, crash=crash)).run()
  assert Checkpointer(interrupted / "checkpoints").latest_step() == (4 if crash else 5)
  resumed = _final_params(interrupted, config)
  jax.tree.map(np.testing.assert_array_equal, resumed, uninterrupted_params)
  steps = [r["step"] for r in read_metrics(interrupted)]
  assert steps == sorted(set(steps)) and steps[-1] == 8   # no step logged twice after the resume


def test_non_finite_rewards_and_updates_are_reported(tmp_path):
  nan_reward = lambda examples, responses, lengths: Rewards(total=np.full(len(responses), np.nan, np.float32),
                                                            components={})
  with pytest.raises(FloatingPointError, match="reward 'total' is not finite"):
    rl_trainer_from_config(_config(rollouts=1), tmp_path / "nan_reward", reward_fn=nan_reward).run()
  config = _config(rollouts=1, nan_policy="stop")
  config.optim.learning_rate = 1e30   # the first real update overflows
  with pytest.raises(FloatingPointError, match="update norm .* nan_policy='stop'"):
    rl_trainer_from_config(config, tmp_path / "overflow").run()
  config.train.nan_policy = "skip"
  state = rl_trainer_from_config(config, tmp_path / "skipped").run()
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_sigterm_from_outside_saves_and_the_same_command_resumes(tmp_path):
  command = [sys.executable, "-m", "safework.main", "--config=experiments/toy_rl.py:runlocal",
             f"--workdir={tmp_path}", "--config.train.rollouts=3", "--config.train.progress_bar=False"]
  process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and len(read_metrics(tmp_path)) < 2 and process.poll() is None:
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  _, stderr = process.communicate(timeout=240)
  assert process.returncode == 0, stderr[-2000:]
  assert "preempted at step" in stderr
  saved = Checkpointer(tmp_path / "checkpoints").latest_step()
  assert saved is not None and 2 <= saved < 12
  subprocess.run(command, check=True, capture_output=True, timeout=300)
  assert read_metrics(tmp_path)[-1]["step"] == 12


def test_recomputed_old_logprobs_match_the_sampler_and_kl_can_go_in_the_reward(tmp_path):
  config = _config(rollouts=1)
  config.rollout.old_logprobs = "recompute"
  config.loss.kl_in = "reward"
  config.loss.kl_beta = 0.1
  rl_trainer_from_config(config, tmp_path).run()
  first = read_metrics(tmp_path)[0]
  # Before any update the trainer's recomputed log-probs are the sampler's own (fp32): mismatch ~ 0.
  assert first["sampler_mismatch_abs"] < 1e-4
  assert first["reward/with_kl_penalty"] == pytest.approx(first["reward/total"], abs=1e-4)   # ref == policy at start
