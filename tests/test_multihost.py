"""Multi-host without Pathways, on one machine: `python -m safework.main` in 2 processes x 4 CPU devices (gloo).

The same toy RL run as one process with 8 devices gives the same metrics; process 0 alone writes them; each
process reads its own share of the prompts; checkpoints are written by both and restored by both; a SIGTERM to
one process makes both save at the same step and exit cleanly, and the resumed run finishes like the
uninterrupted one. Also: `launch/tpu.sh --dry-run` prints the commands each host would run.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from safework.training import read_metrics

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--config=experiments/toy_rl.py:runlocal", "--config.rollout.num_rollouts=2",
        "--config.train.progress_bar=False", "--config.train.checkpoint_every=3"]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(workdir: Path, processes: int) -> list[subprocess.Popen]:
  port, started = _free_port(), []
  for index in range(processes):
    flags = f"--xla_force_host_platform_device_count={8 // processes} --xla_backend_optimization_level=0"
    env = dict(os.environ, XLA_FLAGS=flags,
               JAX_PLATFORMS="cpu", SAFEWORK_READS_LOG=str(workdir.parent / f"{workdir.name}.reads"))
    if processes > 1:
      env.update(SAFEWORK_DISTRIBUTED="1", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                 SAFEWORK_NUM_PROCESSES=str(processes), SAFEWORK_PROCESS_ID=str(index))
    command = [sys.executable, str(ROOT / "tests" / "multihost_worker.py"), *ARGS, f"--workdir={workdir}"]
    started.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                    text=True))
  return started


def _finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[str]:
  """Waits for every process (killing all of them on a timeout); returns their stderr."""
  deadline, errors = time.time() + timeout, []
  try:
    for process in processes:
      errors.append(process.communicate(timeout=max(1.0, deadline - time.time()))[1])
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  for process, error in zip(processes, errors):
    assert process.returncode == 0, error[-3000:]
  return errors


def _reads(workdir: Path) -> dict[int, list[int]]:
  logs = sorted(workdir.parent.glob(f"{workdir.name}.reads.*"))
  return {int(p.suffix[1:]): [int(x) for x in p.read_text().split()] for p in logs}


@pytest.mark.slow
def test_two_hosts_train_like_one_save_together_on_sigterm_and_resume(tmp_path):
  single = tmp_path / "single"
  _finish(_start(single, 1))
  expected = read_metrics(single)
  assert [r["step"] for r in expected] == list(range(1, 9))

  multi = tmp_path / "multi"
  processes = _start(multi, 2)
  deadline = time.time() + 240
  while time.time() < deadline and len(read_metrics(multi)) < 2 and processes[1].poll() is None:
    time.sleep(0.2)
  processes[1].send_signal(signal.SIGTERM)   # one host is preempted: both save at the same step and stop
  errors = _finish(processes)
  checkpoints = multi / "checkpoints"
  saved = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
  # Both processes stopped after saving the same step (the one JAX's preemption sync point agreed on).
  assert saved and all(f"preempted at step {saved[-1]};" in e for e in errors), [e[-1500:] for e in errors]
  # Every process wrote its own shards of the checkpoint.
  assert {p.name for p in (checkpoints / str(saved[-1]) / "state").glob("ocdbt.process_*")} == {
      "ocdbt.process_0", "ocdbt.process_1"}

  _finish(_start(multi, 2))   # both restore and finish the run
  got = read_metrics(multi)
  assert [r["step"] for r in got] == list(range(1, 9))   # one writer: no row twice, none missing
  for mine, theirs in zip(got, expected):
    for key in ("reward/total", "loss", "grad_norm", "kl_ref", "entropy", "advantage/abs_mean"):
      if key in theirs:
        np.testing.assert_allclose(mine[key], theirs[key], rtol=2e-4, atol=1e-6, err_msg=f"step {mine['step']} {key}")
  # Each process read its own half of every rollout's prompts, and together all of them (16 per rollout).
  reads = _reads(multi)
  assert set(reads) == {0, 1}
  first, second = set(reads[0]), set(reads[1])
  assert not first & second and first | second == set(range(2 * 16))


def test_launcher_dry_run_prints_the_commands_every_host_runs():
  result = subprocess.run(
      ["bash", str(ROOT / "launch" / "tpu.sh"), "--dry-run", "my-v5p", "us-east5-a",
       "experiments/m3rl_svkg.py:variant=72b,init=/mnt/runs/kg/policy", "/mnt/runs/svkg", "--config.seed=1",
       "--config.rollout.stop_strings=['a b']"],
      capture_output=True, text=True, check=True, env=dict(os.environ, PATH="/usr/bin:/bin"))   # no gcloud needed
  copy, ssh = result.stdout.strip().splitlines()
  assert shlex.split(copy)[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and "--worker=all" in copy
  words = shlex.split(ssh)
  assert words[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-v5p"] and "--worker=all" in words
  remote = words[words.index("--command") + 1]
  assert "pip install -q -e '.[tpu]'" in remote
  started = remote[remote.index("SAFEWORK_DISTRIBUTED=1"):remote.index(" > ")]
  assert shlex.split(started) == [
      "SAFEWORK_DISTRIBUTED=1", "nohup", ".venv/bin/python", "-m", "safework.main",
      "--config", "experiments/m3rl_svkg.py:variant=72b,init=/mnt/runs/kg/policy", "--workdir", "/mnt/runs/svkg",
      "--config.seed=1", "--config.rollout.stop_strings=['a b']"]
  usage = subprocess.run(["bash", str(ROOT / "launch" / "tpu.sh")], capture_output=True, text=True)
  assert usage.returncode == 2 and "--dry-run" in usage.stdout
