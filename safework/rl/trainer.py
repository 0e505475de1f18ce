"""The rollout-train loop: sample, score, update; checkpoint, log, survive preemption, resume exactly.

All randomness derives from (seed, rollout index): the prompts of a rollout, its sampling key and its minibatch
order. A checkpoint therefore needs only the train state, the rollout index, the minibatch index, and, when it is
taken between the minibatches of a rollout, that rollout's host arrays; resuming reproduces the uninterrupted run.
On SIGTERM (TPU preemption) the loop finishes the optimizer step in flight, saves, and returns.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from safework import sharding
from safework.checkpointing import Checkpointer, abstract_like
from safework.data.example import PromptSource, ShuffledStream
from safework.metrics_writer import MetricsWriter, truncate_metrics
from safework.models.qwen2_5_vl import Qwen25VL
from safework.preemption import Preempted, SigtermFlag
from safework.processing import Processor
from safework.rewards.base import RewardFunction
from safework.rl import losses, rollout as rollouts
from safework.rl.batch import SequenceBatch, vision_features
from safework.rl.optim import OptimSettings, make_optimizer
from safework.rl.train_step import (StepSettings, TrainState, make_logprob_fn, make_train_step,
                                     policy_gradient_objective)
from safework.sampling import Sampler

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  rollouts: int = 10
  seed: int = 0
  micro_batch_size: int | None = None   # rows per gradient-accumulation step (None: the whole minibatch)
  logprob_chunk: int = 256               # time steps per chunk of the log-prob computation
  nan_policy: str = "skip"               # non-finite loss/gradients: "skip" the update, or "stop" the run
  checkpoint_every: int = 20             # optimizer steps
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  progress_bar: bool = True

  def validate(self) -> "TrainSettings":
    if self.nan_policy not in ("skip", "stop"):
      raise ValueError(f"nan_policy={self.nan_policy!r}: choose 'skip' or 'stop'")
    return self


class RLTrainer:
  """GRPO / CPGD training of a Qwen2.5-VL policy on a prompt source with a reward function."""

  def __init__(self, *, model: Qwen25VL, params, processor: Processor, source: PromptSource,
               reward_fn: RewardFunction, rollout: rollouts.RolloutSettings, loss: losses.LossSettings,
               optim: OptimSettings, train: TrainSettings, workdir: str | Path, mesh: jax.sharding.Mesh,
               rules: sharding.Rules = sharding.DEFAULT_RULES, ref_params=None):
    self.model, self.processor, self.reward_fn = model, processor, reward_fn
    self.rollout_settings, self.loss_settings = rollout.validate(), loss.validate()
    self.train_settings, self.optim_settings = train.validate(), optim
    self.workdir, self.mesh, self.rules = Path(workdir), mesh, rules
    self.stream = ShuffledStream(source, train.seed)
    self.total_steps = train.rollouts * rollout.steps
    micro = train.micro_batch_size or rollout.minibatch_size
    if rollout.minibatch_size % micro:
      raise ValueError(f"micro_batch_size {micro} does not divide minibatch_size {rollout.minibatch_size}")
    self.step_settings = StepSettings(micro_batches=rollout.minibatch_size // micro, logprob_chunk=train.logprob_chunk,
                                      vision_trainable=optim.vision_trainable)
    self.rollout_step_settings = dataclasses.replace(self.step_settings, micro_batches=rollout.rows // micro)
    self.tx = make_optimizer(optim, self.total_steps, params)
    self.initial_params = params
    # The train step donates the policy's buffers, so a reference taken from them needs its own copy.
    self.ref_params = None
    if loss.uses_reference:
      self.ref_params = jax.tree.map(jnp.copy, params) if ref_params is None else ref_params
    self.sampler = Sampler(model, mesh=mesh, rules=rules)
    eos = model.config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, tuple) else [eos] if eos is not None else []
    self.sampling = rollout.sampling(processor.tokenizer, eos_ids + [processor.tokenizer.eos_token_id])
    self._train_step = None
    self._logprobs = jax.jit(make_logprob_fn(model, self.rollout_step_settings))
    self._features = jax.jit(lambda params, vision: vision_features(model, params, vision))
    self._sigterm = SigtermFlag()

  # -- state ---------------------------------------------------------------------------------------------------

  def init_state(self) -> TrainState:
    """The initial state, every leaf on the mesh (optimizer moments like their parameters, scalars replicated)."""
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init)(self.initial_params)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=self.initial_params, opt_state=opt_state)
    replicated = sharding.replicated(self.mesh)
    on_mesh = lambda x: isinstance(x.sharding, jax.sharding.NamedSharding) and x.sharding.mesh == self.mesh
    return jax.tree.map(lambda x: x if on_mesh(x) else jax.device_put(x, replicated), state)

  def _jitted_step(self, state: TrainState):
    if self._train_step is None:
      shardings = jax.tree.map(lambda x: x.sharding, state)
      step = make_train_step(self.model, self.tx, policy_gradient_objective(self.loss_settings), self.step_settings)
      self._train_step = jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))
    return self._train_step

  def _on_device(self, batch: SequenceBatch) -> SequenceBatch:
    return jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim, x.shape[0])),
                        batch)

  # -- one rollout ---------------------------------------------------------------------------------------------

  def collect(self, rollout_index: int, params) -> tuple[rollouts.Rollout, dict[str, float]]:
    settings = self.rollout_settings
    examples = self.stream.take(rollout_index * settings.prompts_per_rollout, settings.prompts_per_rollout)
    rng = jax.random.fold_in(jax.random.key(self.train_settings.seed), rollout_index)
    data, _, metrics = rollouts.collect(examples, params, rng, sampler=self.sampler, processor=self.processor,
                                        reward_fn=self.reward_fn, settings=settings, sampling=self.sampling)
    rewards = data["rewards"]
    data["advantages"] = np.zeros_like(rewards)
    start = time.perf_counter()
    if self.ref_params is not None or settings.old_logprobs == "recompute":
      batch, vision = rollouts.training_rows(data, self.model.config)
      batch = self._on_device(batch)
      if self.ref_params is not None:
        ref_features = None if vision.empty else self._features(self.ref_params, vision)
        data["ref_logp"] = np.asarray(self._logprobs(self.ref_params, batch, ref_features))
        if self.loss_settings.kl_in == "reward":   # a k1 penalty on each sequence's reward
          mask = np.asarray(batch.loss_mask)
          rewards = rewards - self.loss_settings.kl_beta * ((data["sampler_logp"] - data["ref_logp"]) * mask).sum(1)
          metrics["reward/with_kl_penalty"] = float(rewards.mean())
      if settings.old_logprobs == "recompute":
        features = None if vision.empty else self._features(params, vision)
        data["old_logp"] = np.asarray(self._logprobs(params, batch, features))
    metrics["logprob_pass_s"] = time.perf_counter() - start
    data["advantages"] = rollouts.advantages_of(settings, rewards, data["lengths"]).astype(np.float32)
    metrics.update(rollouts.summarize_advantages(data["advantages"]))
    return data, metrics

  # -- the loop ------------------------------------------------------------------------------------------------

  def run(self) -> TrainState:
    """Trains to the end (or to SIGTERM, raising `Preempted` after saving). Resumes from the latest checkpoint."""
    settings, train = self.rollout_settings, self.train_settings
    checkpointer = Checkpointer(self.workdir / "checkpoints", keep=train.keep_checkpoints,
                                async_save=train.async_checkpoints)
    writer = MetricsWriter(self.workdir, is_writer=jax.process_index() == 0)
    state = self.init_state()
    rollout_index, minibatch_index, data = 0, 0, None
    latest = checkpointer.latest_step()
    if latest is not None:
      state, meta, data = checkpointer.restore(latest, abstract_like(state))
      rollout_index, minibatch_index = meta["rollout_index"], meta["minibatch_index"]
      truncate_metrics(self.workdir, latest)
      log.info("resumed from step %d (rollout %d, minibatch %d)", latest, rollout_index, minibatch_index)
    progress = tqdm.tqdm(total=self.total_steps, initial=int(state.step), desc=self.workdir.name, dynamic_ncols=True,
                         disable=not train.progress_bar or jax.process_index() != 0)
    try:
      with jax.set_mesh(self.mesh), self._sigterm:
        while rollout_index < train.rollouts:
          rollout_metrics = {}
          if data is None:
            data, rollout_metrics = self.collect(rollout_index, state.params)
            minibatch_index = 0
          state = self._train_on(state, data, rollout_index, minibatch_index, rollout_metrics, checkpointer, writer,
                                 progress)
          rollout_index, minibatch_index, data = rollout_index + 1, 0, None
        if checkpointer.latest_step() != int(state.step):
          checkpointer.save(int(state.step), state, self._meta(rollout_index, 0))
    finally:
      checkpointer.close()
      writer.close()
      progress.close()
    return state

  def _meta(self, rollout_index: int, minibatch_index: int) -> dict[str, Any]:
    key = np.asarray(jax.random.key_data(jax.random.key(self.train_settings.seed))).tolist()
    return {"rollout_index": rollout_index, "minibatch_index": minibatch_index, "seed": self.train_settings.seed,
            "rng_key": key, "data_position": rollout_index * self.rollout_settings.prompts_per_rollout}

  def _train_on(self, state: TrainState, data: rollouts.Rollout, rollout_index: int, first_minibatch: int,
                rollout_metrics: dict, checkpointer: Checkpointer, writer: MetricsWriter, progress) -> TrainState:
    settings, train = self.rollout_settings, self.train_settings
    batch, vision = rollouts.training_rows(data, self.model.config)
    vision = jax.device_put(vision, sharding.replicated(self.mesh))
    features = None if vision.empty or self.step_settings.vision_trainable else self._features(state.params, vision)
    order = rollouts.minibatch_order(train.seed, rollout_index, settings)
    step_fn = self._jitted_step(state)
    for index in range(first_minibatch, len(order)):
      start = time.perf_counter()
      state, metrics = step_fn(state, self._on_device(batch.rows(order[index])), vision, features)
      metrics = jax.device_get(metrics)
      elapsed = time.perf_counter() - start
      step = int(state.step)
      if not metrics["finite"]:
        message = (f"step {step}: non-finite loss ({metrics['loss']}), gradient norm ({metrics['grad_norm']}) or "
                   f"update norm ({metrics['update_norm']}); the update was dropped")
        if train.nan_policy == "stop":
          raise FloatingPointError(message + "; nan_policy='stop' ends the run (the last checkpoint is intact)")
        log.warning(message + " (nan_policy='skip')")
      rows = batch.rows(order[index])
      tokens = float(np.asarray(rows.attention_mask).sum())
      record = {k: float(v) for k, v in metrics.items()}
      record.update(step_s=elapsed, train_tokens_per_s=tokens / elapsed, rollout=rollout_index,
                    **(rollout_metrics if index == first_minibatch else {}))
      if index == first_minibatch and "generation_s" in rollout_metrics:
        total = rollout_metrics["generation_s"] + rollout_metrics.get("logprob_pass_s", 0) + elapsed * len(order)
        record["generation_time_fraction"] = rollout_metrics["generation_s"] / total
      writer.write(step, record)
      progress.update(1)
      self._last_reward = rollout_metrics.get("reward/total", getattr(self, "_last_reward", np.nan))
      progress.set_postfix(reward=f"{self._last_reward:.3f}", loss=f"{record['loss']:.4f}")
      last_of_rollout = index + 1 == len(order)
      preempted = self._sigterm.received
      if step % train.checkpoint_every == 0 or preempted:
        position = (rollout_index + 1, 0) if last_of_rollout else (rollout_index, index + 1)
        checkpointer.save(step, state, self._meta(*position), None if last_of_rollout else data, wait=preempted)
      if preempted:
        raise Preempted(f"preempted at step {step}; the checkpoint in {checkpointer.directory} resumes the run")
    return state
