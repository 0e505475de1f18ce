"""The main job, `runlocal`: data, judges, SFT, two RL stages, evaluation and the report, through the CLI; and the
same ladder, smoke-sized, on a text-only Llama.

Each runs in its own process on one CPU device (the user's command, and fast); the pieces they chain are tested
sharded over 8 devices elsewhere.
"""

import json
import os
import subprocess
import sys

import pytest

from tests.test_notebooks import run_notebook


@pytest.mark.slow
def test_runlocal_ladder_improves_safety_and_capability_over_sft(tmp_path, monkeypatch):
  env = dict(os.environ, XLA_FLAGS="")
  command = [sys.executable, "-m", "safework.main", "--config=experiments/tiny_safeladder.py:runlocal",
             f"--workdir={tmp_path}"]
  # The job takes about 7 minutes on 2 cores beside the rest of the suite; the timeout only guards against a hang.
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  rows = [(c["stage"], c.get("intervention")) for c in report["checkpoints"]]
  assert rows == [("sft", None), ("sft", "rerank"), ("m3rl_kg", None), ("m3rl_svkg", None)]
  sft, sft_rerank, final = report["checkpoints"][0], report["checkpoints"][1], report["checkpoints"][-1]
  assert final["capability"] > sft["capability"] + 0.1, report
  assert final["safety"] > sft["safety"] + 0.03, report
  # The step search guided by the ladder's own safety judge: safer than greedy decoding, as capable, at a cost.
  assert sft_rerank["safety"] > sft["safety"] + 0.02 and sft_rerank["capability"] >= sft["capability"] - 0.02, report
  assert sft_rerank["generated_tokens"] > 2 * sft["generated_tokens"], report
  assert "| sft + rerank | " in (tmp_path / "report.md").read_text()
  for name in ("report.md", "ai45.png", "rewards.png", "search.png"):
    assert (tmp_path / name).stat().st_size > 0
  # Every checkpoint is scored on the search questions (the step search's evaluation leaves them out).
  for checkpoint in report["checkpoints"]:
    plain = checkpoint.get("intervention") is None
    assert all((k in checkpoint) == plain for k in ("search_accuracy", "false_certain_rate", "ece",
                                                    "searches_per_answer")), checkpoint
  assert (tmp_path / "stages" / "m3rl_svkg" / "policy" / "config.json").is_file()
  assert json.loads((tmp_path / "verifiers" / "safety" / "eval.json").read_text())["accuracy"] > 0.8
  _evaluate_with_the_ladders_own_judge(tmp_path)
  monkeypatch.setenv("SAFEWORK_LADDER", str(tmp_path))
  printed = run_notebook("intervene.ipynb")
  assert "harmful refused: greedy" in printed and "refuses after the edit: True" in printed, printed[-2000:]


def _evaluate_with_the_ladders_own_judge(workdir):
  """The benchmark harness end to end on the tiny preset: the last policy on a few XSTest prompts, judged by the
  ladder's trained safety verifier (its A-F verdicts stand in for the paper's safety judge)."""
  from safework.benchmarks import pipeline
  from tests.test_benchmarks import _xstest
  config = pipeline.default_config()
  config.update(max_new_tokens=8, batch_size=4, dtype="float32", judge_batch_size=4)
  out = workdir / "eval"
  judge = f"safety:{workdir / 'verifiers' / 'safety'}"
  pipeline.run(["xstest"], [str(_xstest(workdir))], str(workdir / "stages" / "m3rl_svkg" / "policy"), [], out,
               judge, None, config, intervention="rerank", intervention_judges=[judge])
  results = json.loads((out / "xstest" / "results.json").read_text())
  rows = [json.loads(line) for line in (out / "xstest" / "responses.jsonl").read_text().splitlines()]
  assert results["n"] == 4 and results["judge"].startswith("safety:")
  assert all(row["judge_verdicts"]["safety"] in "ABCDEF" for row in rows)
  assert 0.0 <= results["metrics"]["xstest_safe"] <= 1.0
  identity = json.loads((out / "xstest" / "generation.json").read_text())   # the search is part of the run's identity
  assert identity["intervention"]["mode"] == "rerank" and identity["intervention"]["judges"] == {"safety": judge[7:]}


@pytest.mark.slow
def test_text_only_llama_ladder_runs_end_to_end(tmp_path, monkeypatch):
  """The tiny SafeLadder on a text-only Llama 3 (`preset=llama_tiny`, `smoke`: a step or two per stage), through the
  CLI: every stage trains and hands a Llama checkpoint, which transformers reads, to the next; the safety aha
  analysis of the first and the last checkpoint lands in the report, and the notebook draws their curves."""
  import jax
  import numpy as np
  import transformers
  from safework.models import TextLM, from_pretrained
  command = [sys.executable, "-m", "safework.main", "--config=experiments/tiny_safeladder.py:preset=llama_tiny,smoke",
             f"--workdir={tmp_path}"]
  # One device, compiled for speed of compiling (a smoke run compiles more than it computes).
  env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0")
  result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  assert [c["stage"] for c in report["checkpoints"]] == ["sft", "m3rl_kg", "m3rl_svkg", "efficient_rl"]
  assert all(0 <= c["safety"] <= 1 and c["response_tokens"] > 0 for c in report["checkpoints"]), report
  tasks = {key.split("/")[1] for key in report["checkpoints"][0] if key.startswith("task/")}
  assert "arithmetic" in tasks and not {"colour", "shape", "typographic"} & tasks, report   # no image task
  stages = tmp_path / "stages"
  assert transformers.AutoConfig.from_pretrained(stages / "efficient_rl" / "policy").architectures == [
      "LlamaForCausalLM"]
  params = []
  for name in ("sft", "m3rl_kg", "m3rl_svkg", "efficient_rl"):
    model, stage_params = from_pretrained(stages / name / "policy")
    assert isinstance(model, TextLM)
    params.append(stage_params)
  for before, after in zip(params, params[1:]):   # every RL stage updated the policy
    moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), before, after)
    assert max(jax.tree.leaves(moved)) > 0
  assert set(report["aha"]) == {"sft", "efficient_rl"}
  for stage in ("sft", "efficient_rl"):
    analysis = json.loads((tmp_path / "aha" / stage / "mi.json").read_text())
    harmful = analysis["summary"][str(model.config.text.num_hidden_layers - 1)]["responses"]
    assert harmful == report["aha"][stage]["responses"] > 0
    first = analysis["responses"][0]
    assert len(first["mi"]["3"]) == len(first["tokens"]) > 0
    assert (tmp_path / "aha" / stage / "mi_curves.png").stat().st_size > 0
  assert "## Safety aha moment" in (tmp_path / "report.md").read_text()
  assert (tmp_path / "aha_peaks.png").stat().st_size > 0
  monkeypatch.setenv("SAFEWORK_LADDER", str(tmp_path))
  printed = run_notebook("safety_aha.ipynb")
  assert "sft: " in printed and "efficient_rl: " in printed and "curves drawn: 8" in printed, printed[-2000:]
