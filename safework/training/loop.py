"""The one training loop: RL, SFT and verifier training all step, save, resume and stop through it.

A trainer brings an `Objective` (the loss), an optimizer and a `BatchSource` (the inputs of each optimizer
step); the loop owns the rest:

- the state, born sharded, or restored from the newest readable checkpoint into the same shardings;
- the jitted step (state donated) with gradient accumulation and the update guard (`guard.py`);
- metrics read one step late: step N is dispatched before step N-1's metrics are fetched, so the host never waits
  for the device except where the source itself must (a new rollout);
- checkpoints every `checkpoint_every` steps and at the end, each save watched for failure;
- preemption: on SIGTERM (any host) every host saves at the same step and `Preempted` is raised;
- the work directory's lock, the metrics file (truncated to the checkpoint on resume), the progress bar.

Resumption is exact: a source's batches are a pure function of the step and the position it reports, which the
checkpoint stores (with a host buffer when the position is inside a rollout).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import jax
import numpy as np
import optax
import tqdm

from safework import distributed
from safework.training.checkpoints import Checkpointer
from safework.training.guard import Guard, GuardSettings
from safework.training.metrics import MetricsWriter, truncate_metrics
from safework.training.preemption import Preempted, PreemptionWatch
from safework.training.state import TrainState, abstract_of, abstract_state, new_state
from safework.training.step import Objective, make_train_step
from safework.training.workdir import WorkdirLock

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """How every trainer steps, saves and watches its updates (an experiment's `train` section)."""
  micro_batch_size: int | None = None   # rows per gradient-accumulation step (None: the whole batch at once)
  logprob_chunk: int = 256               # time steps per chunk of the log-prob computation (RL and SFT)
  checkpoint_every: int = 20             # optimizer steps
  keep_checkpoints: int = 3
  async_checkpoints: bool = True
  progress_bar: bool = True
  on_bad_update: str = "skip"            # a rejected update (guard.py): "skip" it, or "stop" the run
  max_update_ratio: float | None = 0.5   # ||update|| / ||params|| above this rejects the update
  max_consecutive_skips: int = 10

  @property
  def guard(self) -> GuardSettings:
    return GuardSettings(self.on_bad_update, self.max_update_ratio, self.max_consecutive_skips)

  def validate(self) -> "TrainSettings":
    self.guard.validate()
    if self.checkpoint_every < 1 or self.keep_checkpoints < 1:
      raise ValueError("checkpoint_every and keep_checkpoints must be at least 1")
    if self.micro_batch_size is not None and self.micro_batch_size < 1:
      raise ValueError(f"micro_batch_size must be positive (or None), got {self.micro_batch_size}")
    return self

  def micro_batches(self, batch_size: int) -> int:
    micro = self.micro_batch_size or batch_size
    if batch_size % micro:
      raise ValueError(f"micro_batch_size {micro} does not divide the batch of {batch_size} rows")
    return batch_size // micro


@dataclasses.dataclass
class StepBatch:
  """The inputs of one optimizer step."""
  rows: Any                      # [B, ...] leaves, placed on the mesh; split into micro-batches by the step
  context: Any = None            # what every micro-batch shares (vision inputs and features, ...)
  tokens: int = 0                # tokens in the rows, for throughput
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)   # host metrics logged with this step


class BatchSource(Protocol):
  """Where a trainer's steps come from; a pure function of the step and of the position it reports."""
  total_steps: int
  batch_size: int

  def batch(self, step: int, params: Any) -> StepBatch:
    """The inputs of optimizer step `step` (from 0), given the parameters before it."""

  def position(self) -> tuple[dict[str, Any], dict[str, np.ndarray] | None]:
    """JSON metadata (and host arrays) to resume right after the last batch served."""

  def restore(self, position: dict[str, Any], buffer: dict[str, np.ndarray] | None) -> None:
    """Continue from a checkpoint's `position()`."""

  def reads_device(self, step: int) -> bool:
    """Whether serving `step` waits on the device (e.g. sampling a new rollout)."""


class StepSource:
  """A source whose batches are a pure function of the step: nothing to store or restore, nothing waited on."""

  def position(self) -> tuple[dict[str, Any], None]:
    return {}, None

  def restore(self, position: dict[str, Any], buffer) -> None:
    pass

  def reads_device(self, step: int) -> bool:
    return False


@dataclasses.dataclass
class _Pending:
  step: int
  metrics: Any                   # device metrics of the step, fetched one step late
  batch: StepBatch
  dispatched: float


class Trainer:
  def __init__(self, *, workdir: str | Path, mesh: jax.sharding.Mesh, settings: TrainSettings, objective: Objective,
               tx: optax.GradientTransformation, source: BatchSource, shown: Sequence[str] = ("loss",),
               name: str | None = None):
    self.workdir, self.mesh, self.settings = Path(workdir), mesh, settings.validate()
    self.name = name or self.workdir.name   # of the progress bar and log lines
    self.source, self.shown, self.tx = source, tuple(shown), tx
    self.step_fn = make_train_step(objective, tx, settings.micro_batches(source.batch_size),
                                   settings.max_update_ratio)
    self._shown_values: dict[str, float] = {}
    self._last_report = 0.0

  def run(self, params: Any) -> TrainState:
    """Trains `params` (sharded on the mesh; their buffers are taken over) to `source.total_steps`, resuming from
    the latest checkpoint; raises `Preempted` after saving on SIGTERM. The optimizer state for `params` is created
    only when there is no checkpoint to restore."""
    settings, total = self.settings, self.source.total_steps
    abstract = abstract_state(self.tx, abstract_of(params), self.mesh)
    with WorkdirLock(self.workdir), jax.set_mesh(self.mesh), PreemptionWatch() as watch:
      checkpointer = Checkpointer(self.workdir / "checkpoints", keep=settings.keep_checkpoints,
                                  async_save=settings.async_checkpoints)
      writer, progress = MetricsWriter(self.workdir), None
      try:
        state = self._start(checkpointer, lambda: new_state(self.tx, params, self.mesh), abstract)
        shardings = jax.tree.map(lambda x: x.sharding, abstract)
        step_fn = jax.jit(self.step_fn, donate_argnums=0, out_shardings=(shardings, None))
        step, pending, guard = int(state.step), None, Guard(settings.guard)
        progress = tqdm.tqdm(total=total, initial=step, desc=self.name, dynamic_ncols=True, leave=False,
                             disable=not settings.progress_bar or not distributed.is_main())
        report = lambda p: self._report(p, writer, guard, progress)
        while step < total:
          if pending is not None and self.source.reads_device(step):
            report(pending)
            pending = None
          batch = self.source.batch(step, state.params)
          state, metrics = step_fn(state, batch.rows, batch.context)
          if pending is not None:
            report(pending)
          step += 1
          pending = _Pending(step, metrics, batch, time.perf_counter())
          stop = watch.should_stop(step)
          if step % settings.checkpoint_every == 0 or step == total or stop:
            checkpointer.save(step, state, *self.source.position(), wait=stop)
          checkpointer.raise_if_failed()
          if stop:
            report(pending)
            raise Preempted(f"preempted at step {step}; the checkpoint in {checkpointer.directory} resumes the run")
        if pending is not None:
          report(pending)
      finally:
        checkpointer.close()
        writer.close()
        if progress is not None:
          progress.close()
    return state

  def _start(self, checkpointer: Checkpointer, init_state: Callable[[], TrainState], abstract: TrainState
             ) -> TrainState:
    restored = checkpointer.restore_latest(abstract)
    if restored is None:
      truncate_metrics(self.workdir, 0)
      return init_state()
    step, state, position, buffer = restored
    self.source.restore(position, buffer)
    truncate_metrics(self.workdir, step)
    log.info("%s: resumed from the checkpoint of step %d", self.name, step)
    return state

  def _report(self, pending: _Pending, writer: MetricsWriter, guard: Guard, progress) -> None:
    """Fetches a step's metrics (its successor is already dispatched), logs them and applies the guard."""
    metrics = {k: float(distributed.host_array(v)) for k, v in pending.metrics.items()}
    elapsed = time.perf_counter() - max(pending.dispatched, self._last_report)
    self._last_report = time.perf_counter()
    record = {**metrics, "step_s": elapsed, "tokens_per_s": pending.batch.tokens / max(elapsed, 1e-9),
              **pending.batch.metrics}
    writer.write(pending.step, record)
    progress.update(1)
    self._shown_values.update({k: record[k] for k in self.shown if k in record})
    progress.set_postfix({k.replace("/total", ""): f"{v:.4g}" for k, v in self._shown_values.items()})
    guard.check(pending.step, metrics)
