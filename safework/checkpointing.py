"""Orbax checkpoints of a training run: state (sharded arrays), JSON metadata, and an optional host buffer.

Always saved as a Composite of three items (`state`, `meta`, `buffer`), so every checkpoint in a directory has the
same structure. `buffer` holds host arrays a run needs to resume exactly mid-way (e.g. the rollout whose
minibatches are not all trained on yet); it holds a single `empty` flag otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

_EMPTY = {"empty": np.ones((), bool)}


class Checkpointer:
  def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
    self.directory = Path(directory).absolute()
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict, buffer: dict[str, np.ndarray] | None = None,
           wait: bool = False) -> None:
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
                              buffer=ocp.args.StandardSave(buffer or _EMPTY))
    self.manager.save(step, args=args, force=True)
    if wait:
      self.manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict, dict[str, np.ndarray] | None]:
    """Restores into the shardings of `abstract_state` (a tree of jax.ShapeDtypeStruct with shardings)."""
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore(),
                              buffer=ocp.args.StandardRestore())
    restored = self.manager.restore(step, args=args)
    buffer = dict(restored["buffer"])
    return restored["state"], dict(restored["meta"]), None if "empty" in buffer else buffer

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target of a checkpoint of it."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
