"""The one place an experiment config becomes a stage: parsed, checked, loaded, trained, saved.

A stage section (the top level of `experiments/{sft,m3rl_kg,...}.py`, or one of the ladder's `config.stages`) has
a `kind` and its sections: rl: rollout, loss, optim, train, reward; sft: sft, optim, train. `parse_stage` turns
it into settings and checks them; `run_stage` then checks the data against the policy's processor, loads the
policy, trains it through the core loop, and writes the result as a Hugging Face checkpoint
(`<workdir>/policy`): the next stage's start and KL reference. Everything that can be checked is checked before
any weights are read.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence

import jax

from safework import distributed, sharding
from safework.data.example import Example, PromptSource, Rows
from safework.data.jsonl import DataError
from safework.data.user_builders import UserPrompts, check_prompts, prepare, prompts_config, user_example
from safework.experiment import close_matches, settings
from safework.models import CausalLM, family_of, save_pretrained
from safework.models.checkpoint import abstract_params
from safework.policy import PolicySettings, load_processor, policy_model, policy_params
from safework.processing import Processor
from safework.rewards.base import RewardFunction
from safework.rl.losses import LossSettings
from safework.rl.optim import OptimSettings, check_prefixes
from safework.rewards.constraint import ConstraintSettings
from safework.rl.rollout import RolloutSettings
from safework.tools.calls import ToolSettings
from safework.tools.generate import ToolUse, example_documents, response_width
from safework.rl.trainer import RLTrainer
from safework.sft import SFTSettings, SFTTrainer, Trace
from safework.training import TrainSettings
from safework.verifiers.build import RewardSpec, build_reward, reward_spec
from safework.verifiers.recipes import PAPER_RECIPES, Scorer

log = logging.getLogger(__name__)
SECTIONS = {"rl": ("rollout", "loss", "optim", "train", "reward", "tools", "constraint"),
            "sft": ("sft", "optim", "train")}


@dataclasses.dataclass(frozen=True)
class RLStage:
  rollout: RolloutSettings
  loss: LossSettings
  optim: OptimSettings
  train: TrainSettings
  reward: RewardSpec | None   # None: the task brings its own reward
  tools: ToolSettings | None = None              # deliberative search: the search tool inside the rollouts
  constraint: ConstraintSettings | None = None   # and the false-certain constraint on the reward

  @property
  def total_steps(self) -> int:
    return self.rollout.num_rollouts * self.rollout.steps

  @property
  def response_length(self) -> int:
    """Columns of a response: the policy's tokens, and with tools the results it may read."""
    r = self.rollout
    return response_width(r.max_new_tokens, self.tools) if self.tools else r.max_new_tokens


@dataclasses.dataclass(frozen=True)
class SFTStage:
  sft: SFTSettings
  optim: OptimSettings
  train: TrainSettings

  @property
  def total_steps(self) -> int:
    return self.sft.steps


Stage = RLStage | SFTStage


class StageData(Protocol):
  """Where a stage's rows come from: the user's files, a built-in task, or the tiny suite."""
  reward: RewardFunction | None   # a task's own reward, used when the stage configures none
  search_corpus: str | None       # documents it brings for the search tool, used when tools.corpus is empty
                                  # (None: its questions bring their own, meta.documents)

  def corpus(self) -> Sequence[str]:
    """Text to train a tokenizer on, for a preset from scratch (empty: the policy must bring its tokenizer)."""

  def prompts(self, labels: Sequence[str], processor: Processor, max_length: int) -> PromptSource:
    """The RL prompts with these labels (all when empty), checked against the processor."""

  def traces(self, processor: Processor, max_length: int) -> Sequence[Trace]:
    """The SFT (example, trace) pairs, checked against the processor."""


def parse_stage(section: Mapping[str, Any], extra_scorers: Sequence[str] = (), top_level: bool = False) -> Stage:
  """Settings of a stage section; every error a config can hold is raised here, before anything loads.

  `top_level`: the section is a whole single-stage experiment config, so keys of other sections are expected.
  """
  kind = section.get("kind")
  if kind not in SECTIONS:
    raise ValueError(f"stage kind {kind!r} is not one of {sorted(SECTIONS)}")
  if not top_level:
    unknown = sorted(set(section) - set(SECTIONS[kind]) - {"kind"})
    if unknown:
      raise ValueError(f"unknown keys {unknown} in a {kind} stage{close_matches(unknown[0], SECTIONS[kind])}; "
                       f"known: {list(SECTIONS[kind])}")
  get = lambda name: section[name] if name in section else {}
  if kind == "sft":
    return SFTStage(sft=settings(SFTSettings, get("sft")), optim=settings(OptimSettings, get("optim")),
                    train=settings(TrainSettings, get("train")))
  reward = reward_spec(section["reward"], tuple(extra_scorers)) if "reward" in section else None
  tools = settings(ToolSettings, section["tools"]) if "tools" in section else None
  constraint = settings(ConstraintSettings, section["constraint"]) if "constraint" in section else None
  if constraint is not None and reward is not None and constraint.correctness not in reward.components:
    raise ValueError(f"the constraint reads correctness from reward component {constraint.correctness!r}, which "
                     f"the reward's recipes do not compute ({sorted(reward.components)})")
  return RLStage(rollout=settings(RolloutSettings, get("rollout")), loss=settings(LossSettings, get("loss")),
                 optim=settings(OptimSettings, get("optim")), train=settings(TrainSettings, get("train")),
                 reward=reward, tools=tools, constraint=constraint)


@dataclasses.dataclass(frozen=True)
class TrainedPolicy:
  model: CausalLM
  params: Any
  processor: Processor
  path: Path          # the Hugging Face checkpoint written from it


def run_stage(stage: Stage, *, policy: PolicySettings, data: StageData, seed: int, workdir: str | Path,
              mesh: jax.sharding.Mesh, rules: sharding.Rules, processor: Processor | None = None,
              extra_scorers: Mapping[str, Scorer] | None = None) -> TrainedPolicy:
  """Trains the stage (resuming from `workdir`'s checkpoints) and writes its policy to `<workdir>/policy`."""
  with sharding.rules_in_effect(rules):   # kernels under shard_map split their work as the rules split the model
    workdir = Path(workdir)
    processor = processor or load_processor(policy, workdir, data.corpus())
    model = policy_model(policy)
    check_prefixes(abstract_params(model), stage.optim.freeze_prefixes)
    if isinstance(stage, RLStage):
      needed = stage.rollout.max_prompt_length + stage.response_length
      if needed > model.config.text.max_position_embeddings:
        raise ValueError(f"max_prompt_length + the response's {stage.response_length} columns (max_new_tokens, and "
                         f"with tools the results) = {needed} exceed the policy's "
                         f"{model.config.text.max_position_embeddings} positions; lower them")
      if stage.reward is None and data.reward is None:
        raise ValueError("this RL stage has no reward section and its data brings no reward of its own")
      prompts = data.prompts(stage.reward.labels if stage.reward else (), processor, stage.rollout.max_prompt_length)
      check_readable((prompts[i] for i in range(len(prompts))), model.config)
      tools = None
      if stage.tools is not None:
        corpus = stage.tools.corpus or data.search_corpus or ""
        if not corpus:
          check_own_documents(prompts)
        tools = ToolUse.build(dataclasses.replace(stage.tools, corpus=str(corpus)), workdir / "search_index")
      reward = build_reward(stage.reward, mesh, rules, extra_scorers) if stage.reward else data.reward
      params = policy_params(policy, model, mesh, rules, seed)
      params = RLTrainer(model=model, params=params, processor=processor, prompts=prompts, reward_fn=reward,
                         rollout=stage.rollout, loss=stage.loss, optim=stage.optim, train=stage.train, seed=seed,
                         workdir=workdir, mesh=mesh, rules=rules, tools=tools,
                         constraint=stage.constraint).run().params
    else:
      traces = data.traces(processor, stage.sft.prompt_length)
      check_readable((example for example, _ in traces), model.config)
      params = policy_params(policy, model, mesh, rules, seed)
      params = SFTTrainer(model=model, params=params, processor=processor, traces=traces, settings=stage.sft,
                          optim=stage.optim, train=stage.train, seed=seed, workdir=workdir, mesh=mesh,
                          rules=rules).run()
    out = workdir / "policy"
    save_pretrained(out, model, params)   # every process gathers its shards; process 0 writes
    if distributed.is_main():
      processor.save_pretrained(out)
    distributed.wait_for_all()   # the next stage reads this checkpoint on every host
  return TrainedPolicy(model, params, processor, out)


def from_config(config: Mapping[str, Any], workdir: str | Path, data: StageData | None = None
                ) -> Callable[[], TrainedPolicy]:
  """A single-stage experiment config (experiments/{sft,m3rl_kg,...,toy_rl}.py), parsed and checked now; the
  returned call trains it. `data` replaces the config's own (`task`, or the user's files in `data`)."""
  from safework.tasks import get_task
  stage = parse_stage(config, top_level=True)
  policy = settings(PolicySettings, config["model"])
  if data is None:
    data = (get_task(config["task"], config["seed"]) if config["task"] != "user" else
            UserData(config["data"]["manual_dir"], config["data"]["split"], workdir))
  mesh, rules = sharding.make_mesh(dict(config["mesh"])), sharding.rules_of(config["sharding_rules"])
  return lambda: run_stage(stage, policy=policy, data=data, seed=config["seed"], workdir=workdir, mesh=mesh,
                           rules=rules)


def check_readable(examples: Iterable[Example], model_config) -> None:
  """A text-only policy reads no images or videos: the first example that has some is named before any weights
  load."""
  if family_of(model_config).reads_images:
    return
  for i, example in enumerate(examples):
    if example.images or example.videos:
      raise DataError(f"example {i} ({example.question[:60]!r}) has images or videos, but the policy is a text-only "
                      f"{model_config.model_type} model: leave them out of its data, or start from a vision-language "
                      "checkpoint")


def check_own_documents(prompts: PromptSource) -> None:
  """Without a corpus, every question must bring the documents its searches read."""
  for i in range(len(prompts)):
    if example_documents(prompts[i]) is None:
      raise ValueError(f"prompt {i} ({prompts[i].question[:60]!r}) brings no documents (meta.documents) and the tools "
                       "section has no corpus: give tools.corpus (a JSONL of {\"id\", \"title\", \"text\"} "
                       "documents; corpus=PATH in the experiment argument), or documents with every question")


def check_labels_present(labels: Sequence[str], counts: Mapping[str, int], where: str) -> None:
  """A recipe label of the reward that is not one of the paper's and labels no row is an error: misspelt, it would
  leave the rows it meant out of training without a word. The paper's labels may be absent from a dataset."""
  for label in labels:
    if label in counts:
      continue
    if label not in PAPER_RECIPES:
      raise DataError(f"the reward has a recipe for label {label!r}{close_matches(label, counts)}, but no row of "
                      f"{where} has it (its labels: {dict(sorted(counts.items()))}); fix the recipe's label or the "
                      "rows'")
    log.info("no row of %s is labelled %r: its recipe is unused", where, label)


class UserData:
  """The user's files (`data=DIR`: train/validation/test .jsonl or .csv), built once into `<workdir>/data`."""
  reward = None
  search_corpus = None

  def __init__(self, manual_dir: str | None, split: str, workdir: str | Path):
    if not manual_dir:
      raise ValueError("this experiment reads your data: pass data=/path/to/dir (with train.jsonl, ...) in the "
                       "config argument, or set --config.data.manual_dir")
    self.manual_dir, self.split, self.workdir = Path(manual_dir), split, Path(workdir)

  def corpus(self) -> Sequence[str]:
    return ()

  def _rows(self, labels: Sequence[str]):
    sources = prepare(UserPrompts, self.workdir / "data", self.manual_dir, prompts_config(labels)).as_data_source()
    if self.split not in sources or not len(sources[self.split]):
      raise DataError(f"{self.manual_dir}: the {self.split} split has no rows with labels {sorted(labels)}")
    return sources[self.split]

  def prompts(self, labels: Sequence[str], processor: Processor, max_length: int) -> PromptSource:
    counts = check_prompts(self.manual_dir, self.split, processor, max_length,
                           known_labels=sorted(set(PAPER_RECIPES) | set(labels)))
    check_labels_present(labels, counts, f"{self.manual_dir}'s {self.split} split")
    skipped = {k: n for k, n in counts.items() if labels and k not in labels}
    if skipped:
      log.info("this stage trains on labels %s; %d rows with other labels are left out: %s", sorted(labels),
               sum(skipped.values()), skipped)
    return Rows(self._rows(labels), user_example)

  def traces(self, processor: Processor, max_length: int) -> Sequence[Trace]:
    check_prompts(self.manual_dir, self.split, processor, max_length, need_response=True)
    return Rows(self._rows(()), user_example, traces=True)

