"""CoT-SFT: the rows it trains on, that it learns, that SIGTERM saves and the resume is exact, the job's checks."""

import dataclasses
import os
import re
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import sft as sft_experiment
from safework import sharding
from safework.data import tiny_suite
from safework.data.jsonl import DataError
from safework.policy import PolicySettings, load_processor, policy_model, policy_params
from safework.rl.optim import OptimSettings
from safework.sft import SFTSettings, SFTTrainer, TraceSource, sft_rows
from safework.stages import from_config
from safework.training import Preempted, TrainSettings, read_metrics

SETTINGS = SFTSettings(steps=6, batch_size=8, prompt_length=80, response_length=40)
TRAIN = TrainSettings(micro_batch_size=4, logprob_chunk=32, checkpoint_every=100, progress_bar=False)
OPTIM = OptimSettings(learning_rate=3e-3, warmup_fraction=0.0, final_lr_fraction=1.0, freeze_prefixes=())


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
  mesh = sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})
  settings = PolicySettings(preset="tiny")
  processor = load_processor(settings, tmp_path_factory.mktemp("policy"), corpus=tiny_suite.corpus(0))
  model = policy_model(settings)
  return model, policy_params(settings, model, mesh, sharding.DEFAULT_RULES), processor, mesh


def _trainer(policy, workdir):
  model, params, processor, mesh = policy
  params = jax.tree.map(jnp.copy, params)   # the trainer donates the buffers it is given
  return SFTTrainer(model=model, params=params, processor=processor, traces=tiny_suite.sft_traces(64, 0),
                    settings=SETTINGS, optim=OPTIM, train=TRAIN, seed=0, workdir=workdir, mesh=mesh)


def test_rows_hold_the_left_padded_prompt_and_the_trace_with_its_end_of_turn(policy):
  """The loss covers the trace's own tokens and its end of turn; a tool's result is in the row, not in the loss."""
  model, _, processor, _ = policy
  traces = tiny_suite.sft_traces(40, 0)
  pairs = traces[:3] + [next(p for p in traces if "<result>" in p[1])]
  settings = dataclasses.replace(SETTINGS, response_length=96)
  batch, _ = sft_rows([e for e, _ in pairs], [t for _, t in pairs], processor, model.config, settings)
  tokenizer = processor.tokenizer
  assert batch.input_ids.shape == (4, settings.prompt_length + settings.response_length)
  for row, (_, trace) in enumerate(pairs):
    response = np.asarray(batch.input_ids[row, settings.prompt_length:])
    mask = np.asarray(batch.loss_mask[row]) > 0
    present = np.asarray(batch.attention_mask[row, settings.prompt_length:]) > 0
    own = re.sub(r"<result>.*?</result>", "", trace)
    assert tokenizer.decode(response[mask]) == own + tokenizer.eos_token   # the loss covers exactly these
    assert tokenizer.decode(response[present & ~mask]) == "".join(re.findall(r"<result>.*?</result>", trace))
    assert np.asarray(batch.attention_mask[row, :settings.prompt_length])[-1] == 1   # prompts are left-padded


def test_a_batch_comes_grouped_by_length_into_micro_batches(policy):
  """Micro-batch j (rows j, j + m, ...) holds traces of similar length, the longest first, so each can compute over
  its own longest (`response_bucket`)."""
  model, _, processor, mesh = policy
  source = TraceSource(tiny_suite.sft_traces(64, 0), processor, model.config, SETTINGS, 0, mesh,
                       sharding.DEFAULT_RULES, micro_batches=2)
  rows = source.batch(0, None).rows
  lengths = np.asarray(rows.attention_mask)[:, -rows.response_length:].sum(axis=1)   # tool results included
  assert lengths[0::2].min() >= lengths[1::2].max() and lengths.min() < lengths.max(), lengths


def test_sft_learns_and_a_sigterm_resume_equals_the_uninterrupted_run(policy, tmp_path):
  straight = jax.device_get(_trainer(policy, tmp_path / "straight").run())
  losses = [r["loss"] for r in read_metrics(tmp_path / "straight")]
  assert losses[-1] < 0.8 * losses[0], losses   # measured: 6.28 -> 4.66 in six steps

  original = TraceSource.examples

  def sigterm_at_step_3(self, step):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)   # arrives while step 3 is prepared: it still runs, then a save
    return original(self, step)

  interrupted = tmp_path / "interrupted"
  TraceSource.examples = sigterm_at_step_3
  try:
    with pytest.raises(Preempted, match="at step 4"):
      _trainer(policy, interrupted).run()
  finally:
    TraceSource.examples = original
  resumed = jax.device_get(_trainer(policy, interrupted).run())
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)
  assert [r["step"] for r in read_metrics(interrupted)] == list(range(1, SETTINGS.steps + 1))


def test_the_sft_job_rejects_rows_without_a_trace_before_loading_the_model(tmp_path, chat_checkpoint):
  data = tmp_path / "data"
  data.mkdir()
  (data / "train.jsonl").write_text('{"prompt": "hi", "response": "<think>x</think> y"}\n{"prompt": "no trace"}\n')
  config = sft_experiment.get_config(f"variant=tiny,data={data},init={chat_checkpoint}")
  with pytest.raises(DataError, match=r"train.jsonl:2: SFT rows need a 'response'"):
    from_config(config, tmp_path / "work")()
  assert not (tmp_path / "work" / "checkpoints").exists()
