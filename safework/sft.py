"""CoT-SFT: supervised fine-tuning on `<think> ... </think> answer` traces (SafeLadder stage 1).

The same jitted update as RL (`make_train_step`) with a cross-entropy objective on the response tokens, the vision
tower trainable. Batch k is a pure function of (seed, k), so a run resumes exactly from its latest checkpoint; on
SIGTERM the step in flight finishes, a checkpoint is saved and `Preempted` is raised.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from safework import sharding
from safework.checkpointing import Checkpointer, abstract_like
from safework.data.example import Example
from safework.metrics_writer import MetricsWriter, truncate_metrics
from safework.models.inputs import prepare_inputs
from safework.models.qwen2_5_vl import Qwen25VL
from safework.preemption import Preempted, SigtermFlag
from safework.processing import Processor
from safework.rl.batch import SequenceBatch, VisionInputs, build_sequences, prompt_feature_index
from safework.rl.optim import OptimSettings, make_optimizer
from safework.rl.train_step import StepSettings, TrainState, cross_entropy_objective, make_train_step


@dataclasses.dataclass(frozen=True)
class SFTSettings:
  steps: int = 1000
  batch_size: int = 32
  micro_batch_size: int | None = None
  prompt_length: int = 2048       # every prompt is left-padded to exactly this (fixed shapes: one compile)
  response_length: int = 2048     # every trace is cut or right-padded to exactly this
  logprob_chunk: int = 256
  image_multiple: int = 8
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  seed: int = 0
  progress_bar: bool = True

  def validate(self) -> "SFTSettings":
    micro = self.micro_batch_size or self.batch_size
    if self.batch_size % micro:
      raise ValueError(f"micro_batch_size {micro} does not divide batch_size {self.batch_size}")
    return self


def sft_rows(examples: Sequence[Example], traces: Sequence[str], processor: Processor, model_config,
             settings: SFTSettings) -> tuple[SequenceBatch, VisionInputs]:
  """Training rows (prompt + trace + end-of-turn) for a batch of traces."""
  texts = [processor.render(e.messages()) for e in examples]
  images = [im for e in examples for im in e.images]
  prompts = processor(texts, images=images, max_length=settings.prompt_length,
                      image_multiple=settings.image_multiple)
  pad = settings.prompt_length - prompts["input_ids"].shape[1]
  tokenizer = processor.tokenizer
  ids = np.pad(prompts["input_ids"], ((0, 0), (pad, 0)), constant_values=tokenizer.pad_token_id)
  mask = np.pad(prompts["attention_mask"], ((0, 0), (pad, 0)))
  end = tokenizer.eos_token or "<|im_end|>"
  responses = [tokenizer.encode(t + end, add_special_tokens=False)[:settings.response_length] for t in traces]
  tokens = np.full((len(responses), settings.response_length), tokenizer.pad_token_id, np.int32)
  for i, r in enumerate(responses):
    tokens[i, :len(r)] = r
  lengths = np.array([len(r) for r in responses], np.int32)
  prepared = prepare_inputs(model_config, ids, mask, prompts.get("image_grid_thw"),
                            pixel_values=prompts.get("pixel_values"),
                            padding_images=int(prompts.get("padding_images", 0)))
  index = prompt_feature_index(ids, model_config.image_token_id, model_config.video_token_id)
  zeros = np.zeros(tokens.shape, np.float32)
  batch = build_sequences(ids, mask, prepared, index, tokens, lengths, zeros, np.zeros(len(tokens), np.float32))
  return batch, VisionInputs(pixel_values=prompts.get("pixel_values"), image_layout=prepared.image_layout)


class SFTTrainer:
  """Trains `params` (whose buffers it takes over: the first step donates them) on (example, trace) pairs."""

  def __init__(self, *, model: Qwen25VL, params, processor: Processor, traces: Sequence[tuple[Example, str]],
               settings: SFTSettings, optim: OptimSettings, workdir: str | Path, mesh: jax.sharding.Mesh,
               rules: sharding.Rules = sharding.DEFAULT_RULES):
    if not traces:
      raise ValueError("SFT needs at least one trace")
    self.model, self.processor, self.traces = model, processor, list(traces)
    self.settings, self.workdir, self.mesh, self.rules = settings.validate(), Path(workdir), mesh, rules
    self.tx = make_optimizer(optim, settings.steps, params)
    self.params = params
    micro = settings.micro_batch_size or settings.batch_size
    step_settings = StepSettings(micro_batches=settings.batch_size // micro, logprob_chunk=settings.logprob_chunk,
                                 vision_trainable=optim.vision_trainable)
    self._step_fn = make_train_step(model, self.tx, cross_entropy_objective, step_settings)

  def batch(self, step: int) -> tuple[SequenceBatch, VisionInputs]:
    rng = np.random.default_rng([self.settings.seed, step])
    picked = [self.traces[i] for i in rng.choice(len(self.traces), self.settings.batch_size)]
    return sft_rows([e for e, _ in picked], [t for _, t in picked], self.processor, self.model.config, self.settings)

  def run(self) -> dict:
    """Trains `steps` steps (resuming from the latest checkpoint) and returns the parameters."""
    settings = self.settings
    with jax.set_mesh(self.mesh):
      opt_state = jax.jit(self.tx.init)(self.params)
      state = TrainState(step=jnp.zeros((), jnp.int32), params=self.params, opt_state=opt_state)
      replicated = sharding.replicated(self.mesh)
      state = jax.tree.map(lambda x: x if isinstance(x.sharding, jax.sharding.NamedSharding) else
                           jax.device_put(x, replicated), state)
      checkpointer = Checkpointer(self.workdir / "checkpoints", keep=settings.keep_checkpoints)
      latest = checkpointer.latest_step()
      if latest is not None:
        state, _, _ = checkpointer.restore(latest, abstract_like(state))
        truncate_metrics(self.workdir, latest)
      shardings = jax.tree.map(lambda x: x.sharding, state)
      step_fn = jax.jit(self._step_fn, donate_argnums=0, out_shardings=(shardings, None))
      writer = MetricsWriter(self.workdir, is_writer=jax.process_index() == 0)
      progress = tqdm.tqdm(total=settings.steps, initial=int(state.step), desc=self.workdir.name,
                           dynamic_ncols=True, disable=not settings.progress_bar or jax.process_index() != 0)
      place = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim, x.shape[0]))
      try:
        with SigtermFlag() as sigterm:
          while int(state.step) < settings.steps:
            start = time.perf_counter()
            batch, vision = self.batch(int(state.step))
            state, metrics = step_fn(state, jax.tree.map(place, batch), jax.device_put(vision, replicated), None)
            metrics, step = jax.device_get(metrics), int(state.step)
            if not metrics["finite"]:
              raise FloatingPointError(f"SFT step {step}: non-finite loss or gradients; update dropped")
            writer.write(step, {"sft_loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                                "step_s": time.perf_counter() - start})
            progress.update(1)
            progress.set_postfix(loss=f"{float(metrics['loss']):.3f}")
            if step % settings.checkpoint_every == 0 or step == settings.steps or sigterm.received:
              checkpointer.save(step, state, {"step": step}, wait=sigterm.received)
            if sigterm.received:
              raise Preempted(f"SFT preempted at step {step}; the checkpoint in {checkpointer.directory} resumes it")
      finally:
        checkpointer.close()
        writer.close()
        progress.close()
    return state.params
