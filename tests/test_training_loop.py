"""The training core on its own, with a linear model: metrics one step late, exact resume with a source
position and buffer, the update guard, micro-batches, and the state born sharded."""

import dataclasses
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from safework import sharding
from safework.training import (Preempted, StepBatch, Trainer, TrainingDiverged, TrainSettings, new_state, read_metrics)
from safework.training import loop as loop_module

D = 8


@dataclasses.dataclass(frozen=True)
class Squares:
  """Mean squared error of a linear model, normalised by the whole batch (so micro-batches add up)."""

  def totals(self, batch):
    return jnp.asarray(batch["x"].shape[0], jnp.float32)

  def __call__(self, params, micro, context, totals):
    error = micro["x"] @ params["w"] + params["b"] - micro["y"]
    return jnp.sum(error**2) / totals, {"abs_error": jnp.sum(jnp.abs(error)) / totals}


class Source:
  """Batches drawn from (seed, step); its position counts the batches served, its buffer holds the last one."""

  def __init__(self, mesh, steps=6, batch=16, sigterm_at=None):
    self.mesh, self.total_steps, self.batch_size, self.sigterm_at = mesh, steps, batch, sigterm_at
    self.served, self.events, self.restored = 0, [], None

  def batch(self, step, params):
    self.events.append(("batch", step))
    if step == self.sigterm_at:
      os.kill(os.getpid(), signal.SIGTERM)
    rng = np.random.default_rng([3, step])
    x = rng.normal(size=(self.batch_size, D)).astype(np.float32)
    y = (x @ np.arange(D, dtype=np.float32) + 1.0).astype(np.float32)
    self.served += 1
    place = lambda a: jax.device_put(a, sharding.batch_sharding(self.mesh, sharding.DEFAULT_RULES, a.ndim, len(a)))
    return StepBatch(rows={"x": place(x), "y": place(y)}, tokens=self.batch_size, metrics={"served": self.served})

  def position(self):
    return {"served": self.served}, {"last": np.full(3, self.served, np.int32)}

  def restore(self, position, buffer):
    self.served, self.restored = position["served"], (position, {k: v.tolist() for k, v in buffer.items()})

  def reads_device(self, step):
    return False


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})


def _params(mesh):
  w = jax.device_put(jnp.full((D,), 3.0), sharding.logical_sharding((D,), ("embed",), mesh, sharding.DEFAULT_RULES))
  return {"w": w, "b": jax.device_put(jnp.zeros(()), sharding.replicated(mesh))}


def _run(tmp_path, mesh, source, tx=optax.sgd(0.1), **settings):
  settings = TrainSettings(progress_bar=False, checkpoint_every=2, **settings)
  trainer = Trainer(workdir=tmp_path, mesh=mesh, settings=settings, objective=Squares(), tx=tx, source=source)
  return trainer.run(_params(mesh))


def test_metrics_are_read_one_step_late_and_the_model_learns(tmp_path, mesh, monkeypatch):
  source = Source(mesh)
  write = loop_module.MetricsWriter.write
  monkeypatch.setattr(loop_module.MetricsWriter, "write",
                      lambda self, step, m: (source.events.append(("write", step)), write(self, step, m)))
  state = _run(tmp_path, mesh, source)
  # Step N's metrics are fetched only after step N + 1 is dispatched: the host never waits for the device.
  assert source.events == [("batch", 0), ("batch", 1), ("write", 1), ("batch", 2), ("write", 2), ("batch", 3),
                           ("write", 3), ("batch", 4), ("write", 4), ("batch", 5), ("write", 5), ("write", 6)]
  rows = read_metrics(tmp_path)
  assert [r["served"] for r in rows] == list(range(1, 7)) and rows[-1]["loss"] < 0.5 * rows[0]["loss"]
  assert int(state.step) == 6 and all(r["accepted"] == 1.0 for r in rows)


def test_state_is_born_sharded_with_moments_like_their_parameters(mesh):
  params = _params(mesh)
  state = new_state(optax.adam(0.1), params, mesh)   # moments mu, nu mirror the parameters
  assert state.opt_state[0].mu["w"].sharding == params["w"].sharding
  assert state.opt_state[0].mu["w"].sharding.spec == jax.sharding.PartitionSpec("fsdp")
  assert state.step.sharding.is_fully_replicated and state.opt_state[0].count.sharding.mesh == mesh


def test_a_preempted_run_resumes_exactly_with_its_source_position(tmp_path, mesh):
  straight = jax.device_get(_run(tmp_path / "straight", mesh, Source(mesh)).params)
  with pytest.raises(Preempted, match="preempted at step 4"):
    _run(tmp_path / "cut", mesh, Source(mesh, sigterm_at=3))   # arrives while step 3 is prepared: it still runs
  resumed_source = Source(mesh)
  resumed = jax.device_get(_run(tmp_path / "cut", mesh, resumed_source).params)
  assert resumed_source.restored == ({"served": 4}, {"last": [4, 4, 4]})
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  assert [r["step"] for r in read_metrics(tmp_path / "cut")] == list(range(1, 7))


def test_micro_batches_give_the_same_update(tmp_path, mesh):
  whole = jax.device_get(_run(tmp_path / "whole", mesh, Source(mesh)).params)
  micro = jax.device_get(_run(tmp_path / "micro", mesh, Source(mesh), micro_batch_size=4).params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), micro, whole)


def test_exploding_updates_are_rejected_and_the_policy_decides(tmp_path, mesh):
  with pytest.raises(TrainingDiverged, match=r"step 1: update norm .* \(max_update_ratio=0.5\)"):
    _run(tmp_path / "stop", mesh, Source(mesh), tx=optax.sgd(1e6), on_bad_update="stop")
  with pytest.raises(TrainingDiverged, match="3 updates in a row were rejected"):
    _run(tmp_path / "skip", mesh, Source(mesh), tx=optax.sgd(1e6), max_consecutive_skips=3)
  # With the guard off (max_update_ratio=None) the same finite blow-up is applied: that is what the guard stops.
  state = _run(tmp_path / "off", mesh, Source(mesh), tx=optax.sgd(1e6), max_update_ratio=None)
  assert float(jnp.abs(state.params["w"]).max()) > 1e6
