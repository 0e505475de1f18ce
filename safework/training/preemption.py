"""Preemption: SIGTERM (a TPU VM being reclaimed) becomes a flag the training loops poll between steps.

A loop that sees the flag finishes the step in flight, saves a checkpoint and raises `Preempted`; re-running the
same command resumes from that checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class Preempted(Exception):
  """Training stopped on SIGTERM after saving a checkpoint; the same command resumes it."""


class SigtermFlag:
  """While active, SIGTERM sets `received` instead of killing the process (signals reach the main thread only)."""

  def __init__(self):
    self.received = False
    self._previous = None

  def _handle(self, signum, frame):
    log.warning("SIGTERM: finishing the current step, saving a checkpoint, then stopping")
    self.received = True

  def __enter__(self) -> "SigtermFlag":
    self.received = False
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
