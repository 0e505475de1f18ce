r"""The whole SafeLadder on the tiny preset, from scratch, on a CPU in minutes: the main job.

  python -m safework.main --config experiments/tiny_safeladder.py --workdir /tmp/safeladder
  python -m safework.main --config experiments/tiny_safeladder.py:runlocal --workdir /tmp/safeladder_ci
  python -m safework.main --config experiments/tiny_safeladder.py:preset=llama_tiny,smoke --workdir /tmp/llama

`preset` picks the tiny architecture: `tiny` (Qwen2.5-VL) or `llama_tiny` (a text-only Llama 3: the suite then
leaves out its image tasks). `smoke` runs every stage but the deliberative search for a step or two on small
splits: a check that the ladder works end to end on an architecture, not a result.

Builds the embedded tiny suite (tfds), trains the tiny safety and value judges, then CoT-SFT -> M³-RL kg ->
M³-RL svkg -> safe-and-efficient RL -> deliberative-search RL (runlocal stops after svkg), each stage starting
from (and KL-anchored to) the previous one, evaluated on the test split after each; then the safety aha-moment
analysis of the first and the last checkpoint (not in runlocal). Writes report.json, report.md and plots to the
work directory.
"""

import ml_collections

from experiments import common, deliberative_search, efficient_rl, m3rl_kg, m3rl_svkg, sft
from safework.analysis.responses import AnalysisSettings
from safework.evaluation import EvalSettings
from safework.experiment import parse_arg, section
from safework.intervention.settings import SearchSettings
from safework.models import family_of, get_preset


def get_config(arg=None):
  arg = parse_arg(arg, runlocal=False, preset="tiny", smoke=False)
  arg.runlocal = arg.runlocal or arg.smoke
  config = common.base("tiny", None)
  config.model.preset = arg.preset
  config.job = "safeladder"
  config.data = dict(sft=2000, train=2000, validation=200, test=200 if arg.runlocal else 300)
  judge = dict(layers=2, steps=60 if arg.runlocal else 80, batch_size=16, learning_rate=3e-3, judgments=400)
  config.verifiers = dict(
      safety=dict(judge, judge="safety", instruction="Question: {question}\nResponse: {answer}\nSafety verdict:"),
      value=dict(judge, judge="value", instruction="Question: {question}\nResponse: {answer}\nValue verdict:"))
  config.eval = section(EvalSettings, max_new_tokens=48, batch_size=50, max_prompt_length=80)
  # runlocal (CI's job, its longest) stops after svkg and smoke before the deliberative search: the pieces of the
  # stages they leave out are tested apart (and the smoke run takes safe-and-efficient RL end to end).
  last = "deliberative_search" if not arg.runlocal else "efficient_rl" if arg.smoke else "m3rl_svkg"
  ladder = ["sft", "m3rl_kg", "m3rl_svkg", "efficient_rl", "deliberative_search"]
  config.stage_order = ladder[:ladder.index(last) + 1]
  # The first and the last checkpoint (runlocal: the first) are evaluated a second time with the verifier-guided
  # step search: a step is the reasoning (up to </think>) or the answer, 4 candidates each (the first greedy), each
  # valued by the tiny judges on its greedy completion (they read final answers); capability rows are not judged
  # (no gold answers at inference time), so they keep the greedy answer.
  config.intervention_stages = ("sft",) if arg.runlocal else ("sft", "deliberative_search")
  judged = {"safety": [["safety", 1.0]], "safety_rule": [["safety", 1.0]], "value": [["value", 1.0]]}
  # A text-only policy's suite has no image tasks, so no `safety_rule` rows (the typographic attacks).
  text_only = not family_of(get_preset(arg.preset)).reads_images
  if text_only:
    del judged["safety_rule"]
  config.intervention = section(SearchSettings, candidates=4, delimiters=("</think>",), step_tokens=32,
                                lookahead=True, recipes=tuple((label, recipe) for label, recipe in judged.items()))
  config.stages = ml_collections.ConfigDict()
  config.stages.sft = sft.stage("tiny", arg.runlocal)
  if not arg.runlocal:
    # Reading a search result is learned late, and in a jump: the main job's SFT, which the deliberative-search
    # stage starts from, trains longer and faster (at 3e-3 x 600 steps the policy still writes the most frequent
    # town into its query; at 1e-2 x 600 it copies the question's town and reads the flag's colour).
    config.stages.sft.sft.update(batch_size=24, steps=600)
    config.stages.sft.optim.learning_rate = 1e-2
  config.stages.m3rl_kg = m3rl_kg.stage("tiny", arg.runlocal)
  config.stages.m3rl_svkg = m3rl_svkg.stage("tiny", arg.runlocal)
  if "efficient_rl" in config.stage_order:
    config.stages.efficient_rl = efficient_rl.stage("tiny", arg.runlocal)
  if "deliberative_search" in config.stage_order:
    config.stages.deliberative_search = deliberative_search.stage("tiny")   # the suite's corpus
  for name in config.stage_order[1:]:
    if text_only and "safety_rule" in config.stages[name].reward.recipes:
      del config.stages[name].reward.recipes["safety_rule"]
  # The safety aha moment of the SFT and the last checkpoint (runlocal, CI's job, leaves it to the smoke run).
  if arg.smoke or not arg.runlocal:
    config.aha = section(AnalysisSettings, layers=(-1,), max_new_tokens=48, max_prompt_length=80, batch_size=50)
  if arg.smoke:
    _shrink(config)
  return config


def _shrink(config: ml_collections.ConfigDict) -> None:
  """Every stage for a step or two, on small splits, with no second evaluation with the step search."""
  config.data = dict(sft=200, train=100, validation=20, test=40)
  for judge in config.verifiers.values():
    judge.update(steps=4, judgments=64)
  config.eval.batch_size = 40
  config.intervention_stages = ()
  config.stages.sft.sft.steps = 8
  for name in config.stage_order[1:]:
    config.stages[name].rollout.update(num_rollouts=1, prompts_per_rollout=4, samples_per_prompt=4, minibatch_size=16)
    config.stages[name].train.micro_batch_size = 16
