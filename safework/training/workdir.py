"""A work directory belongs to one run and one config.

- `WorkdirLock`: an exclusive `flock` on `<workdir>/.lock`, held while a run trains there. The kernel drops it
  when the process dies (also on kill -9), so a crashed run never leaves a stale lock; a second run gets an
  error naming the holder. Re-entrant within a process (the entry point and the training loop both take it).
- `check_config`: the first run records its config in `<workdir>/config.json`; a re-run with another config
  (another seed, data or model) is refused with the keys that differ, unless the user starts fresh
  (`supersede`, which moves the old directory aside: nothing is deleted).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from safework import distributed

CONFIG_FILE = "config.json"
# Settings that change how a run is watched or saved, not what it computes: a re-run may change them.
RUNTIME_KEYS = frozenset({"progress_bar", "async_checkpoints", "keep_checkpoints", "checkpoint_every"})


class WorkdirBusyError(RuntimeError):
  """Another run holds the work directory."""


class ConfigMismatchError(ValueError):
  """The work directory holds a run of another config."""


_held: dict[Path, tuple[int, int]] = {}   # path -> (file descriptor, depth) of the locks this process holds


class WorkdirLock:
  def __init__(self, workdir: str | Path):
    self.path = Path(workdir).absolute() / ".lock"

  def __enter__(self) -> "WorkdirLock":
    if self.path in _held:
      fd, depth = _held[self.path]
      _held[self.path] = (fd, depth + 1)
      return self
    fd, holder = None, ""
    if distributed.is_main():
      self.path.parent.mkdir(parents=True, exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        holder = os.pread(fd, 1000, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        fd = None
      else:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                  .encode(), 0)
    if not distributed.all_agree(fd is not None or not distributed.is_main()):
      raise WorkdirBusyError(f"{self.path.parent} is in use by another run ({holder or 'see process 0'}). "
                             "Wait for it to finish, stop it, or choose another --workdir.")
    _held[self.path] = (fd, 1)
    return self

  def __exit__(self, *exc) -> None:
    fd, depth = _held[self.path]
    if depth > 1:
      _held[self.path] = (fd, depth - 1)
      return
    del _held[self.path]
    if fd is not None:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flat(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def config_differences(recorded: dict, current: dict) -> list[str]:
  """'key: recorded -> current' for every setting that differs (runtime-only settings aside)."""
  old, new = _flat(json.loads(json.dumps(recorded))), _flat(json.loads(json.dumps(current)))
  missing = object()
  return [f"{k}: {old.get(k, 'absent')!r} -> {new.get(k, 'absent')!r}" for k in sorted(set(old) | set(new))
          if k.rsplit(".", 1)[-1] not in RUNTIME_KEYS and old.get(k, missing) != new.get(k, missing)]


def check_config(workdir: str | Path, config: dict) -> None:
  """Records the run's config on the first run; refuses a re-run whose config differs."""
  path = Path(workdir) / CONFIG_FILE
  if path.is_file():
    differences = config_differences(json.loads(path.read_text()), config)
    if differences:
      shown = "\n  ".join(differences[:20]) + (f"\n  ... and {len(differences) - 20} more" if len(differences) > 20
                                               else "")
      raise ConfigMismatchError(
          f"{path.parent} holds a run of another config ({path}); this run differs in:\n  {shown}\n"
          "Its checkpoints, data and results belong to that config. Re-run with the same config to continue it, "
          "choose another --workdir, or pass --fresh to move the old run aside and start over.")
    return
  if distributed.is_main():
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def supersede(workdir: str | Path) -> Path | None:
  """Moves an existing work directory aside (`<workdir>.superseded-<time>`) so a fresh run starts empty."""
  workdir = Path(workdir).absolute()
  target = workdir.parent / f"{workdir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}"
  moved = workdir.is_dir() and any(workdir.iterdir())
  if moved:
    with WorkdirLock(workdir):   # not while another run trains there
      if distributed.is_main():
        workdir.rename(target)
  distributed.wait_for_all()
  return target if moved else None
