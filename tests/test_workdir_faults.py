"""Faults that used to lose work: failed saves, damaged checkpoints, two runs or two configs in one work directory,
a metrics file cut mid-line."""

import dataclasses
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import toy_rl
from safework import sharding
from safework.data import toy_digits
from safework.stages import from_config
from safework.tasks import get_task
from safework.training import CheckpointMismatchError, CheckpointSaveError, Checkpointer, read_metrics
from safework.training.metrics import truncate_metrics
from safework.training.workdir import ConfigMismatchError, WorkdirBusyError, WorkdirLock, check_config, supersede

ROOT = Path(__file__).resolve().parents[1]


def _state(value: float = 1.0):
  mesh = sharding.make_mesh({"data": -1})
  w = jax.device_put(jnp.full((8, 4), float(value)), sharding.logical_sharding((8, 4), ("batch", None), mesh,
                                                                          sharding.DEFAULT_RULES))
  return {"w": w, "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_a_damaged_latest_checkpoint_is_set_aside_and_the_newest_intact_one_restored(tmp_path):
  checkpointer = Checkpointer(tmp_path / "checkpoints", keep=5, async_save=False)
  for step in (1, 2, 3):
    checkpointer.save(step, _state(step), {"position": step}, {"rows": np.arange(step)})
  checkpointer.close()
  for path in (tmp_path / "checkpoints" / "3" / "state").rglob("*"):   # truncate every data file of step 3
    if path.is_file() and "/d/" in str(path):
      path.write_bytes(path.read_bytes()[:7])
  shutil.rmtree(tmp_path / "checkpoints" / "2" / "meta")                 # and lose a whole item of step 2
  checkpointer = Checkpointer(tmp_path / "checkpoints")
  step, state, meta, buffer = checkpointer.restore_latest(_abstract(_state()))
  assert step == 1 and meta == {"position": 1} and float(state["w"][0, 0]) == 1.0
  np.testing.assert_array_equal(buffer["rows"], [0])
  damaged = sorted(p.name.split("-")[0] for p in (tmp_path / "checkpoints.damaged").iterdir())
  assert damaged == ["2", "3"] and checkpointer.latest_step() == 1
  checkpointer.save(2, _state(2), {"position": 2})   # training goes on and saves over the set-aside steps
  checkpointer.close()
  assert Checkpointer(tmp_path / "checkpoints").latest_step() == 2


def test_a_checkpoint_of_another_state_is_not_mistaken_for_damage(tmp_path):
  checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=False)
  checkpointer.save(1, _state(), {})
  other = {"w": jax.ShapeDtypeStruct((8, 5), jnp.float32, sharding=_state()["w"].sharding),
           "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=_state()["step"].sharding)}
  with pytest.raises(CheckpointMismatchError, match=r"w: saved \(\(8, 4\), 'float32'\), this run \(\(8, 5\)"):
    checkpointer.restore_latest(other)
  assert checkpointer.latest_step() == 1 and not (tmp_path / "checkpoints.damaged").exists()
  checkpointer.close()


def test_an_unwritable_checkpoint_directory_fails_before_training_and_a_failed_save_at_once(tmp_path):
  (tmp_path / "checkpoints").write_text("a file where the directory should be")
  with pytest.raises(CheckpointSaveError, match=f"cannot write checkpoints to {tmp_path / 'checkpoints'}"):
    Checkpointer(tmp_path / "checkpoints")
  checkpointer = Checkpointer(tmp_path / "ok", async_save=True)
  checkpointer.save(1, _state(), {})
  checkpointer.wait()
  shutil.rmtree(tmp_path / "ok")
  (tmp_path / "ok").write_text("the directory went away")
  start = time.perf_counter()
  with pytest.raises(CheckpointSaveError, match=f"step 2 to {tmp_path / 'ok'} failed"):
    checkpointer.save(2, _state(), {})
    checkpointer.wait()
  checkpointer.close()   # does not wait on a save that failed
  assert time.perf_counter() - start < 30


def test_a_save_failing_in_the_background_is_reported_at_the_next_check(tmp_path, monkeypatch):
  checkpointer = Checkpointer(tmp_path / "checkpoints", async_save=True)
  wait = checkpointer.manager.wait_until_finished

  def commit_fails_in_the_background():   # what a read-only directory does to orbax's commit thread
    wait()
    if threading.current_thread().name.startswith("checkpoint-"):
      raise PermissionError(13, "Permission denied", str(tmp_path / "checkpoints" / "1.orbax-checkpoint-tmp"))

  monkeypatch.setattr(checkpointer.manager, "wait_until_finished", commit_fails_in_the_background)
  checkpointer.save(1, _state(), {})   # returns at once; the failure comes behind it
  deadline = time.time() + 10
  while checkpointer._failure is None and time.time() < deadline:
    time.sleep(0.01)
  with pytest.raises(CheckpointSaveError, match="step 1 .* failed: PermissionError"):
    checkpointer.raise_if_failed()
  with pytest.raises(CheckpointSaveError):   # and the next save refuses to go on
    checkpointer.save(2, _state(), {})

  def orbax_repeats_the_failure():   # while its threads shut down, orbax raises the same failure again
    raise PermissionError(13, "Permission denied")

  monkeypatch.setattr(checkpointer.manager, "wait_until_finished", orbax_repeats_the_failure)
  checkpointer.close()   # the failure was raised already: closing neither raises nor masks it


def test_a_training_run_stops_when_its_checkpoints_cannot_be_written(tmp_path):
  config = toy_rl.get_config("runlocal")
  config.rollout.num_rollouts, config.train.checkpoint_every, config.train.progress_bar = 2, 1, False
  workdir = tmp_path / "run"
  calls = []

  def reward(examples, responses, lengths):   # the second rollout finds its checkpoints gone
    calls.append(1)
    if len(calls) == 2:   # moved away in one step: orbax may still be writing step 1 in the background
      (workdir / "checkpoints").rename(tmp_path / "checkpoints_moved_away")
      (workdir / "checkpoints").write_text("not a directory any more")
    return toy_digits.reward(examples, responses, lengths)

  data = get_task(config.task, config.seed)
  start = time.perf_counter()
  with pytest.raises(CheckpointSaveError, match=str(workdir / "checkpoints")):
    from_config(config, workdir, dataclasses.replace(data, reward=reward))()
  assert time.perf_counter() - start < 120 and len(read_metrics(workdir)) <= 6


def test_the_entry_point_ends_at_once_when_a_save_fails_though_orbax_threads_still_wait(tmp_path):
  """A failed save leaves orbax threads waiting (300 s per signal) for a save that never comes: the command names
  the failure and ends, rather than hang at exit while a scheduler waits for it."""
  script = ("import sys, threading\n"
            "from absl import app\n"
            "from safework import main\n"
            "from safework.training import CheckpointSaveError\n"
            "def run(config, workdir):\n"
            "  threading.Thread(target=threading.Event().wait, name='orbax-like').start()   # never ends\n"
            "  raise CheckpointSaveError(f'saving the checkpoint of step 3 to {workdir} failed')\n"
            "main._run = run\n"
            "app.run(main.main, flags_parser=main._parse_flags)\n")
  ended = subprocess.run([sys.executable, "-c", script, "--config=experiments/toy_rl.py:runlocal",
                          f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert ended.returncode == 1, ended.stderr[-2000:]
  assert f"CheckpointSaveError: saving the checkpoint of step 3 to {tmp_path} failed" in ended.stderr


def test_one_run_per_work_directory_and_a_lock_that_survives_kill_9(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from safework.training.workdir import WorkdirLock; "
       f"WorkdirLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); time.sleep(120)"],
      cwd=ROOT, stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(WorkdirBusyError, match=rf"{tmp_path} is in use by another run \(pid {holder.pid} on "):
    with WorkdirLock(tmp_path):
      pass
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  with WorkdirLock(tmp_path), WorkdirLock(tmp_path):   # free again, and re-entrant within a process
    pass


def test_a_rerun_with_another_config_is_refused_and_fresh_moves_the_old_run_aside(tmp_path):
  config = {"seed": 0, "data": {"manual_dir": "/data/a"}, "train": {"progress_bar": True}}
  check_config(tmp_path, config)
  check_config(tmp_path, {**config, "train": {"progress_bar": False}})   # how a run is watched may change
  differences = r"differs in:\n  data.manual_dir: '/data/a' -> '/data/b'\n  seed: 0 -> 1\n"
  with pytest.raises(ConfigMismatchError, match=differences):
    check_config(tmp_path, {**config, "seed": 1, "data": {"manual_dir": "/data/b"}})
  (tmp_path / "metrics.jsonl").write_text("{}\n")
  moved = supersede(tmp_path)
  assert moved.name.startswith(f"{tmp_path.name}.superseded-") and (moved / "metrics.jsonl").is_file()
  assert not tmp_path.exists() or not any(tmp_path.iterdir())
  check_config(tmp_path, {**config, "seed": 1})


def test_the_entry_point_refuses_another_config_and_bad_overrides_in_one_line(tmp_path):
  def main(*args):
    return subprocess.run([sys.executable, "-m", "safework.main", "--config=experiments/toy_rl.py:runlocal",
                           f"--workdir={tmp_path / 'run'}", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
  (tmp_path / "run").mkdir()
  recorded = toy_rl.get_config("runlocal").to_dict()
  (tmp_path / "run" / "config.json").write_text(json.dumps(recorded))
  refused = main("--config.seed=1")
  assert refused.returncode == 1 and "seed: 0 -> 1" in refused.stderr and "--fresh" in refused.stderr
  assert "Traceback" not in refused.stderr
  typo = main("--config.rollout.num_rolouts=3")
  assert typo.returncode == 2 and "Traceback" not in typo.stderr
  assert "config.rollout has no key 'num_rolouts' (did you mean 'num_rollouts'?)" in typo.stderr
  bad_value = subprocess.run([sys.executable, "-m", "safework.main", "--config=experiments/toy_rl.py:runlocal=ture",
                              f"--workdir={tmp_path / 'x'}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert bad_value.returncode == 2 and "runlocal='ture' is not a boolean" in bad_value.stderr
  assert len(bad_value.stderr.strip().splitlines()) == 1


def test_a_metrics_file_cut_mid_line_does_not_block_resume(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "lo')
  assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
  truncate_metrics(tmp_path, 2)
  assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
