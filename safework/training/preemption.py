"""Preemption: on SIGTERM (a TPU VM being reclaimed) every host saves at the same step and stops.

One process: SIGTERM sets a flag the loop polls between steps. Several processes: JAX's preemption notifier
(installed by `jax.distributed.initialize`) catches SIGTERM on any host and the coordination service picks a
step that all hosts reach (`reached_preemption_sync_point`); no device work is waited on to agree. Either way
the loop finishes the step in flight, saves, and raises `Preempted`; re-running the same command resumes.
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint; the same command resumes it."""


class PreemptionWatch:
  """`should_stop(step)` is polled once per optimizer step, with increasing steps, on every process."""

  def __init__(self):
    self.received = False
    self._previous = None

  def _handle(self, signum, frame):
    log.warning("SIGTERM: finishing the current step, saving a checkpoint, then stopping")
    self.received = True

  def __enter__(self) -> "PreemptionWatch":
    self.received = False
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.received
    from jax.experimental import multihost_utils
    return multihost_utils.reached_preemption_sync_point(step)
