"""The update guard: a bad update never reaches the parameters, and the host decides to go on or stop.

In the step: an update is rejected when the loss, the gradient norm or the update norm is not finite, or when
the update is large against the parameters (||update|| / max(||params||, 1) above `max_update_ratio`: a finite
blow-up, e.g. a learning rate of 1e6; the floor of 1 lets parameters that start at zero move). A rejected step
keeps the parameters and optimizer state as they were.

On the host, one step late: `skip` logs the rejection and goes on, stopping after `max_consecutive_skips`
rejections in a row (a run that can no longer learn must not exit 0); `stop` ends the run at the first one.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

POLICIES = ("skip", "stop")


class TrainingDiverged(FloatingPointError):
  """Updates were rejected and the policy says stop; the last checkpoint holds only accepted updates."""


@dataclasses.dataclass(frozen=True)
class GuardSettings:
  on_bad_update: str = "skip"
  max_update_ratio: float | None = 0.5     # ||update|| / ||params||; None: only non-finite updates are rejected
  max_consecutive_skips: int = 10

  def validate(self) -> "GuardSettings":
    if self.on_bad_update not in POLICIES:
      raise ValueError(f"on_bad_update={self.on_bad_update!r}: choose one of {POLICIES}")
    if self.max_update_ratio is not None and not self.max_update_ratio > 0:
      raise ValueError(f"max_update_ratio must be positive (or None), got {self.max_update_ratio}")
    if self.max_consecutive_skips < 1:
      raise ValueError(f"max_consecutive_skips must be at least 1, got {self.max_consecutive_skips}")
    return self


def accept(loss: jax.Array, grad_norm: jax.Array, update_norm: jax.Array, param_norm: jax.Array,
           max_update_ratio: float | None) -> jax.Array:
  """Whether an update may be applied (traced, inside the step)."""
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(update_norm)
  if max_update_ratio is not None:
    ok &= update_norm <= max_update_ratio * jnp.maximum(param_norm, 1.0)
  return ok


class Guard:
  """The host's side: reads each step's verdict (one step late) and applies the policy."""

  def __init__(self, settings: GuardSettings):
    self.settings = settings.validate()
    self.consecutive = 0

  def check(self, step: int, metrics: dict[str, float]) -> None:
    if metrics["accepted"]:
      self.consecutive = 0
      return
    self.consecutive += 1
    finite = all(math.isfinite(metrics[k]) for k in ("loss", "grad_norm", "update_norm"))
    why = (f"update norm {metrics['update_norm']:.3g} is {metrics['update_ratio']:.3g} x the parameter norm "
           f"(max_update_ratio={self.settings.max_update_ratio})" if finite else
           f"non-finite loss ({metrics['loss']}), gradient norm ({metrics['grad_norm']}) or update norm "
           f"({metrics['update_norm']})")
    message = f"step {step}: {why}; the update was rejected"
    if self.settings.on_bad_update == "stop":
      raise TrainingDiverged(f"{message}; on_bad_update='stop' ends the run (the last checkpoint is intact). "
                             "Lower the learning rate, or look at the data of this step.")
    if self.consecutive >= self.settings.max_consecutive_skips:
      raise TrainingDiverged(f"{message}; {self.consecutive} updates in a row were rejected "
                             f"(max_consecutive_skips={self.settings.max_consecutive_skips}): the run cannot learn. "
                             "Lower the learning rate, or raise max_update_ratio if these updates are intended.")
    log.warning("%s (on_bad_update='skip')", message)
