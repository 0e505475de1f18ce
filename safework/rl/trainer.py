"""GRPO / CPGD training of a Qwen2.5-VL policy: the rollout source and the policy-gradient objective, run by the
core loop (`safework.training.Trainer`), which checkpoints, resumes, guards and survives preemption."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from safework import sharding
from safework.data.example import PromptSource
from safework.models.protocol import CausalLM
from safework.processing import Processor
from safework.rewards.base import RewardFunction
from safework.rl import losses
from safework.rl.objectives import PolicyGradientObjective
from safework.rl.optim import OptimSettings, make_optimizer
from safework.rewards.constraint import ConstraintSettings
from safework.rl.rollout import RolloutSettings
from safework.tools.generate import ToolUse
from safework.rl.source import RolloutSource
from safework.training import Trainer, TrainSettings, TrainState


class RLTrainer:
  """Takes over `params` (the first step donates their buffers); `run()` returns the final train state."""

  def __init__(self, *, model: CausalLM, params, processor: Processor, prompts: PromptSource,
               reward_fn: RewardFunction, rollout: RolloutSettings, loss: losses.LossSettings, optim: OptimSettings,
               train: TrainSettings, seed: int, workdir: str | Path, mesh: jax.sharding.Mesh,
               rules: sharding.Rules = sharding.DEFAULT_RULES, tools: ToolUse | None = None,
               constraint: ConstraintSettings | None = None):
    rollout, loss, train = rollout.validate(), loss.validate(), train.validate()
    self.params = params
    self.total_steps = rollout.num_rollouts * rollout.steps
    self.tx = make_optimizer(optim, self.total_steps, params)
    # The step donates the policy's buffers, so the reference keeps its own copy (in the sampling dtype: it only
    # infers).
    dtype = jnp.dtype(rollout.sampling_dtype) if rollout.sampling_dtype else None
    own_copy = lambda x: x.astype(dtype) if dtype is not None and dtype != x.dtype else jnp.copy(x)
    ref_params = jax.tree.map(own_copy, params) if loss.uses_reference else None
    eos = model.config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, tuple) else [eos] if eos is not None else []
    sampling = rollout.sampling(processor.tokenizer, eos_ids + [processor.tokenizer.eos_token_id])
    micro = train.micro_batch_size or rollout.minibatch_size
    self.source = RolloutSource(model=model, processor=processor, prompts=prompts, reward_fn=reward_fn,
                                settings=rollout, loss=loss, sampling=sampling, seed=seed, mesh=mesh, rules=rules,
                                micro_batch_size=micro, logprob_chunk=train.logprob_chunk,
                                vision_trainable=optim.vision_trainable, ref_params=ref_params, tools=tools,
                                constraint=constraint.validate() if constraint else None)
    objective = PolicyGradientObjective(model=model, logprob_chunk=train.logprob_chunk,
                                        vision_trainable=optim.vision_trainable, vocab_limit=sampling.vocab_limit,
                                        loss=loss, response_widths=rollout.widths(self.source.response_length))
    self.trainer = Trainer(workdir=workdir, mesh=mesh, settings=train, objective=objective, tx=self.tx,
                           source=self.source, shown=("reward/total", "loss"))

  def run(self) -> TrainState:
    return self.trainer.run(self.params)
