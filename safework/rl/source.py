"""The RL trainer's batch source: rollouts, cut into minibatches, as the core loop steps through them.

Optimizer step s trains minibatch s % S of rollout s // S (S = epochs * rows / minibatch_size). A rollout is
sampled with the parameters of the step that first needs it. All randomness derives from (seed, rollout index):
the prompts (through the stream position), the sampling keys and the minibatch order, so a checkpoint needs only
the position (and, between the minibatches of a rollout, the rollout itself) to resume exactly.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np

from safework import sharding
from safework.distributed import host_array
from safework.data.example import PromptSource, ShuffledStream
from safework.models.protocol import CausalLM
from safework.models.vision_shards import shard_axes
from safework.processing import Processor
from safework.rewards.base import RewardFunction
from safework.rewards.constraint import FALSE_CERTAIN, ConstraintSettings, dual_ascent, lagrangian
from safework.rl import losses, rollout as rollouts
from safework.rl.batch import SequenceBatch, VisionContext, micro_batch_layout, vision_features
from safework.rl.objectives import make_logprob_fn
from safework.rl.rollout import Rollout, RolloutSettings
from safework.sampling import Sampler, SamplingSettings
from safework.tools.generate import ToolUse
from safework.training.loop import StepBatch
from safework.verifiers.calibration import calibration_metrics


class RolloutSource:
  def __init__(self, *, model: CausalLM, processor: Processor, prompts: PromptSource, reward_fn: RewardFunction,
               settings: RolloutSettings, loss: losses.LossSettings, sampling: SamplingSettings, seed: int,
               mesh: jax.sharding.Mesh, rules: sharding.Rules, micro_batch_size: int, logprob_chunk: int,
               vision_trainable: bool, ref_params=None, tools: ToolUse | None = None,
               constraint: ConstraintSettings | None = None):
    self.model, self.processor, self.reward_fn = model, processor, reward_fn
    self.tools, self.constraint = tools, constraint
    self.multiplier = constraint.initial if constraint is not None else 0.0   # the constraint's, by dual ascent
    self.settings, self.loss, self.sampling, self.seed = settings, loss, sampling, seed
    self.mesh, self.rules, self.vision_trainable, self.ref_params = mesh, rules, vision_trainable, ref_params
    self._vision_shards = shard_axes(mesh, rules)   # the tower encodes the rollout's images data-parallel
    self.stream = ShuffledStream(prompts, seed)
    self.sampler = Sampler(model, mesh=mesh, rules=rules, compaction_levels=settings.compaction_levels)
    self._sampling_copy = settings.sampling_copy(model, mesh, rules)
    self.total_steps, self.batch_size = settings.num_rollouts * settings.steps, settings.minibatch_size
    self._micro_batches = (settings.minibatch_size // micro_batch_size, settings.rows // micro_batch_size)
    self.response_length = tools.response_length(settings.max_new_tokens) if tools else settings.max_new_tokens
    self._logprobs = jax.jit(make_logprob_fn(model, self._micro_batches[1], logprob_chunk, sampling.vocab_limit,
                                             settings.widths(self.response_length)))
    self._features = jax.jit(lambda params, vision: vision_features(model, params, vision))
    self._index: int | None = None       # the rollout held
    self._rollout: Rollout | None = None
    self._rows: tuple[SequenceBatch, VisionContext] | None = None
    self._served = (0, -1)               # (rollout, minibatch) of the last batch served
    self._data_position = 0              # stream position of the next rollout's first prompt
    self._fresh_metrics: dict[str, float] = {}

  # -- BatchSource -------------------------------------------------------------------------------------------------

  def reads_device(self, step: int) -> bool:
    return step // self.settings.steps != self._index

  def batch(self, step: int, params) -> StepBatch:
    index, minibatch = divmod(step, self.settings.steps)
    if index != self._index:
      self._collect(index, params)
    elif self._rows is None:   # restored from a checkpoint's buffer
      self._lay_out(params)
    rows, context = self._rows
    order = rollouts.minibatch_order(self.seed, index, self.settings)[minibatch]
    picked = rows.rows(micro_batch_layout(order, self._rollout.lengths, self._micro_batches[0]))
    metrics, self._fresh_metrics = {**self._fresh_metrics, "rollout": float(index)}, {}
    self._served = (index, minibatch)
    return StepBatch(rows=jax.tree.map(self._place, picked), context=context,
                     tokens=int(np.asarray(picked.attention_mask).sum()), metrics=metrics)

  def position(self) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    index, minibatch = self._served
    position = {"data_position": self._data_position, "multiplier": self.multiplier}
    if minibatch + 1 == self.settings.steps:
      return {"rollout": index + 1, **position}, None
    return {"rollout": index, **position}, self._rollout.to_buffer()

  def restore(self, position: dict[str, Any], buffer: dict[str, np.ndarray] | None) -> None:
    self._data_position = int(position["data_position"])
    self.multiplier = float(position.get("multiplier", self.multiplier))
    if buffer is not None:
      self._index, self._rollout, self._rows = int(position["rollout"]), Rollout.from_buffer(buffer), None

  # -- collecting ----------------------------------------------------------------------------------------------------

  def _collect(self, index: int, params) -> None:
    settings = self.settings
    base = jax.random.fold_in(jax.random.key(self.seed), index)
    rounds, start = [], time.perf_counter()
    sampled = params if self._sampling_copy is None else self._sampling_copy(params)   # refreshed per rollout
    for k in range(settings.max_sampling_rounds if settings.dynamic_sampling else 1):
      examples = self.stream.take(self._data_position, settings.prompts_per_rollout)
      self._data_position += settings.prompts_per_rollout
      rounds.append(rollouts.sample_round(examples, sampled, jax.random.fold_in(base, k), sampler=self.sampler,
                                          processor=self.processor, reward_fn=self.reward_fn, settings=settings,
                                          sampling=self.sampling, tools=self.tools, constraint=self.constraint))
      informative = sum(int((~rollouts.equal_groups(r.shaped, settings.samples_per_prompt)).sum()) for r in rounds)
      if informative >= settings.prompts_per_rollout:
        break
    del sampled
    generated = sum(int(r.outputs["lengths"].sum()) for r in rounds)
    metrics = {"generation_s": time.perf_counter() - start}
    metrics["generated_tokens_per_s"] = generated / max(metrics["generation_s"], 1e-9)
    rollout, assembled = rollouts.assemble(rounds, settings, self.processor)
    metrics.update(assembled)
    if self.constraint is not None:
      metrics.update(self._constrain(rollout))
    start = time.perf_counter()
    if self.ref_params is not None or settings.old_logprobs == "recompute":
      rows, vision = rollouts.training_rows(rollout, self.model.config, self.loss, self._vision_shards)
      # Rows by length, so each micro-batch of the pass computes over its own longest response; then back.
      layout = micro_batch_layout(np.arange(settings.rows), rollout.lengths, self._micro_batches[1])
      batch = jax.tree.map(self._place, rows.rows(layout))
      restore = np.argsort(layout)
      logprobs = lambda params, features: host_array(self._logprobs(params, batch, features))[restore]
      if self.ref_params is not None:
        ref_features = None if vision.empty else self._features(self.ref_params, vision)
        rollout.ref_logp = logprobs(self.ref_params, ref_features)
        if self.loss.kl_in == "reward":   # a k1 penalty on each sequence's reward
          k1 = ((rollout.policy_logp - rollout.ref_logp) * rows.loss_mask).sum(1)
          rollout.rewards = rollout.rewards - self.loss.kl_beta * k1
          metrics["reward/with_kl_penalty"] = float(rollout.rewards.mean())
      if settings.old_logprobs == "recompute":
        features = None if vision.empty else self._features(params, vision)
        rollout.old_logp = logprobs(params, features)
    metrics["logprob_pass_s"] = time.perf_counter() - start
    rollout.advantages = settings.advantages(rollout.rewards, rollout.lengths)
    metrics.update(rollouts.summarize_advantages(rollout.advantages), **rollouts.behaviour_ratio_stats(rollout))
    self._index, self._rollout, self._fresh_metrics = index, rollout, metrics
    self._lay_out(params)

  def _constrain(self, rollout: Rollout) -> dict[str, float]:
    """The rollout's rewards with the multiplier's penalty on its false-certain rows; then the multiplier's
    dual-ascent step on the rollout's false-certain rate."""
    rows, settings = rollout.constrained, self.constraint
    metrics = {"constraint/multiplier": self.multiplier}
    if not rows.any():
      return metrics
    flags = rollout.components[FALSE_CERTAIN]
    rate = float(flags[rows].mean())
    rollout.rewards = lagrangian(rollout.rewards, flags, rows, self.multiplier)
    self.multiplier = dual_ascent(self.multiplier, rate, settings)
    calibration = calibration_metrics(rollout.components[settings.correctness][rows],
                                      rollout.components["confidence"][rows], settings.threshold)
    return {**metrics, "constraint/false_certain_rate": rate, "constraint/slack": settings.target - rate,
            **{f"calibration/{k}": v for k, v in calibration.items()}}

  def _place(self, x: np.ndarray) -> jax.Array:
    return jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim, x.shape[0]))

  def _lay_out(self, params) -> None:
    """The rollout's training rows and the minibatches' shared context (frozen-tower features, once)."""
    batch, vision = rollouts.training_rows(self._rollout, self.model.config, self.loss, self._vision_shards)
    vision = jax.device_put(vision, sharding.replicated(self.mesh))
    features = None if vision.empty or self.vision_trainable else self._features(params, vision)
    self._rows = (batch, VisionContext(vision=vision, features=features))

