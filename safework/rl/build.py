"""An `RLTrainer` from an experiment config: the one place that turns config sections into settings."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from safework import sharding
from safework.experiment import settings
from safework.policy import PolicySettings, load_policy
from safework.rewards.base import RewardFunction
from safework.rl.losses import LossSettings
from safework.rl.optim import OptimSettings
from safework.rl.rollout import RolloutSettings
from safework.rl.trainer import RLTrainer, TrainSettings
from safework.tasks import get_task


def rules_of(config: ml_collections.ConfigDict) -> sharding.Rules:
  return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.sharding_rules)


def rl_trainer_from_config(config: ml_collections.ConfigDict, workdir: str | Path,
                           reward_fn: RewardFunction | None = None) -> RLTrainer:
  task = get_task(config.task)
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = rules_of(config)
  policy = settings(PolicySettings, config.model, seed=config.seed)
  model, params, processor = load_policy(policy, mesh, rules, workdir, corpus=task.corpus())
  return RLTrainer(
      model=model, params=params, processor=processor, source=task.source(config.seed),
      reward_fn=reward_fn or task.reward, rollout=settings(RolloutSettings, config.rollout),
      loss=settings(LossSettings, config.loss), optim=settings(OptimSettings, config.optim),
      train=settings(TrainSettings, config.train, seed=config.seed), workdir=workdir, mesh=mesh, rules=rules)
