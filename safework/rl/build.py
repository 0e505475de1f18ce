"""An `RLTrainer` from an experiment config: the one place that turns config sections into settings."""

from __future__ import annotations

from pathlib import Path

import ml_collections

from safework import sharding
from safework.experiment import settings
from safework.policy import PolicySettings, load_policy
from safework.data.example import PromptSource
from safework.data.user_builders import PromptSourceView, UserPrompts, prepare
from safework.rewards.base import RewardFunction
from safework.rl.losses import LossSettings
from safework.rl.optim import OptimSettings
from safework.rl.rollout import RolloutSettings
from safework.rl.trainer import RLTrainer, TrainSettings
from safework.tasks import get_task
from safework.verifiers.build import reward_from_config


def rules_of(config: ml_collections.ConfigDict) -> sharding.Rules:
  return tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in config.sharding_rules)


def user_rows(config: ml_collections.ConfigDict, workdir: str | Path):
  """The split of the user's files named by `config.data` (built once into workdir/data as array_record)."""
  if not config.data.manual_dir:
    raise ValueError("this experiment reads your data: pass data=/path/to/dir (with train.jsonl, ...) in the config "
                     "argument, or set --config.data.manual_dir")
  sources = prepare(UserPrompts, Path(workdir) / "data", config.data.manual_dir).as_data_source()
  if config.data.split not in sources:
    raise ValueError(f"{config.data.manual_dir} has no {config.data.split} split; it has {sorted(sources)}")
  return sources[config.data.split]


class _LabelFilter:
  def __init__(self, source: PromptSource, labels):
    self.source, self.index = source, [i for i in range(len(source)) if not labels or source[i].label in labels]
    if not self.index:
      raise ValueError(f"no prompts with labels {list(labels)}")

  def __len__(self):
    return len(self.index)

  def __getitem__(self, i):
    return self.source[self.index[i]]


def rl_trainer_from_config(config: ml_collections.ConfigDict, workdir: str | Path,
                           reward_fn: RewardFunction | None = None) -> RLTrainer:
  mesh = sharding.make_mesh(dict(config.mesh))
  rules = rules_of(config)
  policy = settings(PolicySettings, config.model, seed=config.seed)
  if config.task == "user":
    source = _LabelFilter(PromptSourceView(user_rows(config, workdir)), tuple(config.data.labels))
    model, params, processor = load_policy(policy, mesh, rules, workdir)
    reward_fn = reward_fn or reward_from_config(config.reward, mesh, rules)
  else:
    task = get_task(config.task)
    source = task.source(config.seed)
    model, params, processor = load_policy(policy, mesh, rules, workdir, corpus=task.corpus())
    reward_fn = reward_fn or task.reward
  return RLTrainer(
      model=model, params=params, processor=processor, source=source,
      reward_fn=reward_fn, rollout=settings(RolloutSettings, config.rollout),
      loss=settings(LossSettings, config.loss), optim=settings(OptimSettings, config.optim),
      train=settings(TrainSettings, config.train, seed=config.seed), workdir=workdir, mesh=mesh, rules=rules)
