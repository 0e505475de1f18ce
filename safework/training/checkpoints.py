"""Orbax checkpoints that never lose work: a failed save stops the run, a damaged one is set aside.

Each checkpoint is a Composite of `state` (sharded arrays), `meta` (JSON: where the data stream stood) and
`buffer` (host arrays a run needs to resume exactly mid-way, e.g. a rollout not yet fully trained on; a single
`empty` flag otherwise), so every checkpoint of a directory has the same structure.

- The directory is checked for writing before the first step, and every save is watched: a save that fails,
  synchronously or in orbax's background thread, raises `CheckpointSaveError` naming the path at the next check
  (the loop checks after every step) instead of training on with nothing saved.
- `restore_latest` restores the newest checkpoint; one that cannot be read (truncated or missing files) is
  reported, moved to `<directory>.damaged/`, and the next newest is tried. A checkpoint of a different state
  (other shapes: another model or config) is not damage and stops the run with `CheckpointMismatchError`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from safework import distributed

log = logging.getLogger(__name__)
_EMPTY = {"empty": np.ones((), bool)}


class CheckpointSaveError(OSError):
  """A checkpoint could not be written; the run stops rather than train on unsaved."""


class CheckpointMismatchError(ValueError):
  """The directory's checkpoints hold another state than this run's (another model, optimizer or config)."""


class Checkpointer:
  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    self._check_writable()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "buffer": ocp.StandardCheckpointHandler()}   # known up front, so metadata reads before any save
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self._failure: BaseException | None = None
    self._failed_step: int | None = None
    self._saving: int | None = None   # the step of the last save started
    self._watcher: threading.Thread | None = None

  def _check_writable(self) -> None:
    ok = True
    if distributed.is_main():
      probe = self.directory / f".write-probe-{os.getpid()}"
      try:
        self.directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
      except OSError as e:
        ok, reason = False, e
    if not distributed.all_agree(ok):
      detail = f": {reason}" if not ok else " on process 0"
      raise CheckpointSaveError(f"cannot write checkpoints to {self.directory}{detail}. Make the directory "
                                "writable (and check the disk has room), or choose another --workdir.")

  # -- saving ----------------------------------------------------------------------------------------------------

  def save(self, step: int, state: Any, meta: dict, buffer: dict[str, np.ndarray] | None = None,
           wait: bool = False) -> None:
    self.raise_if_failed()
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                              buffer=ocp.args.StandardSave(buffer or _EMPTY))
    try:
      self.manager.save(step, args=args, force=True)
    except Exception as e:   # orbax reports the previous save's background failure here too
      self._record(step, e)
      raise self._error(step, e) from e
    self._saving = step
    if wait:
      self.wait()
    else:
      self._watch(step)

  def _watch(self, step: int) -> None:
    """A thread that waits for the background save to finish and records its failure for `raise_if_failed`."""
    def wait():
      try:
        self.manager.wait_until_finished()
      except BaseException as e:  # noqa: BLE001 - reported on the main thread
        self._record(step, e)
    self._watcher = threading.Thread(target=wait, name=f"checkpoint-{step}-watcher", daemon=True)
    self._watcher.start()

  def _record(self, step: int, cause: BaseException) -> None:
    if self._failure is None:
      self._failure, self._failed_step = cause, step

  def _error(self, step: int, cause: BaseException) -> CheckpointSaveError:
    return CheckpointSaveError(f"saving the checkpoint of step {step} to {self.directory} failed: "
                               f"{type(cause).__name__}: {cause}. The run stops so that no work goes unsaved; "
                               "fix the directory (permissions, disk space) and re-run the same command: it "
                               "resumes from the last checkpoint that was written.")

  def raise_if_failed(self) -> None:
    """Raises `CheckpointSaveError` if a background save has failed (does not block)."""
    if self._failure is not None:
      raise self._error(self._failed_step, self._failure) from self._failure

  def wait(self) -> None:
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      self._record(self._saving, e)
      raise self._error(self._saving, e) from e
    if self._watcher is not None:
      self._watcher.join()
    self.raise_if_failed()

  def close(self) -> None:
    """Waits for the last save and releases orbax. After a failed save (already raised) nothing more is waited
    for or raised: orbax's threads report the same failure again while they shut down."""
    if self._failure is None:
      self.wait()
      self.manager.close()
      return
    try:
      self.manager.close()
    except Exception as e:  # noqa: BLE001 - the failure this repeats has been raised to the caller
      log.debug("closing the checkpoint manager after a failed save: %s", e)

  # -- restoring -------------------------------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict[str, np.ndarray] | None]:
    """Restores step `step` into the shardings of `abstract_state` (ShapeDtypeStructs with shardings)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
                              buffer=ocp.args.StandardRestore())
    restored = self.manager.restore(step, args=args)
    buffer = {k: np.asarray(v) for k, v in dict(restored["buffer"]).items()}
    return restored["state"], dict(restored["meta"]), None if "empty" in buffer else buffer

  def meta(self, step: int) -> dict:
    """The JSON metadata of a checkpoint (where the data stream stood), without reading its arrays."""
    return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict, dict | None] | None:
    """The newest readable checkpoint as (step, state, meta, buffer), or None when there is none."""
    while (step := self.latest_step()) is not None:
      try:
        self._check_structure(step, abstract_state)
        restored, failure = self.restore(step, abstract_state), None
      except CheckpointMismatchError:
        raise
      except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be read is set aside, whatever the cause
        restored, failure = None, e
      if distributed.all_agree(failure is None):
        return (step, *restored)
      self._set_aside(step, failure)
    return None

  def _check_structure(self, step: int, abstract_state: Any) -> None:
    """Shapes and dtypes of the saved state against this run's; unreadable metadata counts as damage."""
    metadata = self.manager.item_metadata(step)["state"]
    if metadata is None:
      raise FileNotFoundError(f"{self.directory / str(step) / 'state'} has no readable metadata")
    saved = {m.name: _described(m) for m in jax.tree.leaves(metadata.tree, is_leaf=lambda x: hasattr(x, "shape"))}
    wanted = {_dotted(path): _described(x) for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    differ = [f"{k}: saved {saved.get(k, 'nothing')}, this run {wanted.get(k, 'nothing')}"
              for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    if differ:
      raise CheckpointMismatchError(
          f"the checkpoint of step {step} in {self.directory} holds another state than this run's "
          f"({len(differ)} differences, e.g. {differ[:3]}): this work directory belongs to another model or "
          "config. Use another --workdir, or start fresh.")

  def _set_aside(self, step: int, failure: BaseException | None) -> None:
    reason = f"{type(failure).__name__}: {str(failure)[:300]}" if failure else "another process could not read it"
    target = self.directory.parent / f"{self.directory.name}.damaged" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    log.error("the checkpoint of step %d in %s cannot be read (%s); it is moved to %s and the previous one is "
              "restored", step, self.directory, reason, target)
    if distributed.is_main():
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(self.directory / str(step)), str(target))
    distributed.wait_for_all()   # for the move
    self.manager.reload()


def _described(x: Any) -> tuple[tuple[int, ...], str]:
  return tuple(x.shape), np.dtype(x.dtype).name


def _dotted(path: tuple) -> str:
  """A pytree key path as orbax names the saved array: `opt_state.inner_states.train.inner_state.1.0.count`."""
  names = []
  for key in path:
    for attribute in ("name", "key", "idx"):
      if hasattr(key, attribute):
        names.append(str(getattr(key, attribute)))
        break
  return ".".join(names)
