r"""The entry point: one experiment file, one work directory.

  python -m safework.main --config experiments/toy_rl.py --workdir /tmp/toy_rl
  python -m safework.main --config experiments/toy_rl.py:runlocal --workdir /tmp/toy --config.rollout.num_rollouts=3

Re-running the same command resumes from the work directory's latest checkpoint. A work directory belongs to one
run (a lock) and one config (recorded in `config.json`; a re-run with another config is refused, `--fresh` moves
the old run aside). On TPU pods, `launch/tpu.sh` sets SAFEWORK_DISTRIBUTED=1 so that every host joins
`jax.distributed` first; off TPU, set JAX_COORDINATOR_ADDRESS, SAFEWORK_NUM_PROCESSES and SAFEWORK_PROCESS_ID too.
Errors in the config, the data or the work directory end the run with one line naming the problem and its fix
(`--verbose` adds the traceback and the libraries' INFO logs).
"""

from __future__ import annotations

import importlib.util
import logging as std_logging
import os
import re
import sys
from typing import Callable

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (and :arguments).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory: checkpoints, metrics, reports.", required=True)
_FRESH = flags.DEFINE_bool("fresh", False, "Move an existing run in --workdir aside and start over.")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the libraries' INFO logs (orbax, tfds, ...) and tracebacks.")


def train_job(config, workdir: str) -> Callable[[], None]:
  """A single stage (experiments/{sft,m3rl_kg,m3rl_svkg,efficient_rl,toy_rl}.py): parsed now, run by the call."""
  from safework.stages import from_config
  train = from_config(config, workdir)
  return lambda: logging.info("policy written to %s", train().path)


def safeladder_job(config, workdir: str) -> Callable[[], None]:
  from safework.ladder import Ladder
  ladder = Ladder.from_config(config)
  return lambda: logging.info("report written to %s", ladder.run(workdir))


JOBS = {"train": train_job, "safeladder": safeladder_job}


class _LibraryFilter(std_logging.Filter):
  """Keeps the libraries' INFO chatter (orbax logs every save in detail) out of the console, and their warnings
  and errors to one line each (the errors that matter reach the user as this project's own, with their cause)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    if "/safework/" in record.pathname.replace(os.sep, "/"):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    record.msg, record.args = record.getMessage().split("\n", 1)[0], None
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def _quiet_libraries() -> None:
  logging.get_absl_handler().addFilter(_LibraryFilter())
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  for name in ("_log_download_bytes", "_log_download_done"):   # tfds prints these to stdout, not to a logger
    if hasattr(tfds.core.DatasetBuilder, name):
      setattr(tfds.core.DatasetBuilder, name, lambda self: None)


def _experiment(argv: list[str]):
  """The experiment's config, loaded again after flag parsing failed (None when that fails too)."""
  values = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
  values += [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config"]
  if not values:
    return None
  path, _, arg = values[-1].partition(":")
  try:
    spec = importlib.util.spec_from_file_location("_experiment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg or None)
  except Exception:  # noqa: BLE001 - the original error is reported instead
    return None


def _override_error(argv: list[str], error: BaseException) -> str:
  """One line for a bad --config.x override or experiment argument, with the close matches of a misspelt key."""
  from safework.experiment import close_matches
  config = _experiment(argv)
  for arg in argv if config is not None else ():
    match = re.match(r"--config\.([\w.]+)", arg)
    if not match:
      continue
    node, path = config, match.group(1).split(".")
    for depth, key in enumerate(path):
      if not hasattr(node, "keys") or key not in node:
        where = "config" + "".join(f".{k}" for k in path[:depth])
        known = sorted(node.keys()) if hasattr(node, "keys") else []
        return f"{arg.split('=')[0]}: {where} has no key {key!r}{close_matches(key, known)}; its keys: {known}"
      node = node[key]
  message = str(error).strip().strip("'\"").replace("\\n", " ").replace("\n", " ")
  return f"{type(error).__name__}: {message}"


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # noqa: BLE001 - the config file or an override is wrong: one line, not a traceback
    sys.stderr.write(f"error: {_override_error(argv, e)}\n")
  sys.exit(2)


def main(argv) -> None:
  del argv
  from safework import distributed
  distributed.initialize_from_env()   # before anything touches the devices
  if not _VERBOSE.value:
    _quiet_libraries()
  from safework.training import CheckpointSaveError
  try:
    _run(_CONFIG.value, _WORKDIR.value)
  except CheckpointSaveError as e:
    _report(e)
    # The failed save's orbax threads wait for signals that never come (300 s each): `sys.exit` would wait with
    # them, and a scheduler would see a run that neither trains nor ends.
    logging.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  except Exception as e:  # noqa: BLE001
    _report(e)
    sys.exit(1)


def _report(error: Exception) -> None:
  if _VERBOSE.value:
    logging.exception("%s: %s", type(error).__name__, error)
  else:
    logging.error("%s: %s\n(re-run with --verbose for the traceback)", type(error).__name__, error)


def _run(config, workdir: str) -> None:
  import jax
  from safework.training.preemption import Preempted
  from safework.training.workdir import WorkdirLock, check_config, supersede
  # Compilations are cached on disk: a re-run (or a resumed run) does not compile again.
  jax.config.update("jax_compilation_cache_dir",
                    os.environ.get("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/safework/jax")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  if config.job not in JOBS:
    raise ValueError(f"config.job={config.job!r}; choose one of {sorted(JOBS)}")
  run = JOBS[config.job](config, workdir)   # every setting is checked before the work directory is touched
  if _FRESH.value:
    moved = supersede(workdir)
    if moved:
      logging.warning("the previous run in %s was moved to %s", workdir, moved)
  with WorkdirLock(workdir):
    check_config(workdir, config.to_dict())
    try:
      run()
    except Preempted as e:   # a checkpoint was saved: exit cleanly so the scheduler re-runs the same command
      logging.warning("%s", e)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
