"""SafeLadder end to end: data, verifiers, then each stage from the previous stage's policy, evaluated after each.

A stage writes `stages/<name>/policy` (a Hugging Face checkpoint: the next stage's start and its KL reference)
and `stages/<name>/eval.json` (and, for the stages in `intervention_stages`, `eval_<mode>.json`: the same
evaluation with the verifier-guided step search); a stage whose outputs exist is not run again, and a stage
interrupted mid-way resumes from its own checkpoints, so re-running the command continues the ladder. Every stage section is parsed
before anything is built or trained; each stage is built by `safework.stages`, like a single-stage experiment.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax
import ml_collections

from safework import distributed, sharding
from safework.analysis.output import write_analysis
from safework.analysis.responses import AnalysisSettings, analyze
from safework.data import tiny_suite
from safework.data.tiny_builder import SuiteData, TinySuiteConfig, build, example_of, write_search_corpus
from safework.data.user_builders import Judgments, decode, prepare
from safework.evaluation import SEARCH_LABELS, EvalSettings, eval_sampling, evaluate
from safework.experiment import settings
from safework.intervention.search import StepSearch
from safework.intervention.settings import SearchSettings
from safework.models import build_model, family_of, get_preset, init_params
from safework.policy import PolicySettings, load_processor, policy_config, policy_model, policy_params
from safework.processing import Processor
from safework.report import write_report
from safework.sampling import Sampler
from safework.stages import RLStage, Stage, parse_stage, run_stage
from safework.tools.calls import ToolSettings
from safework.tools.generate import ToolUse
from safework.training import read_metrics
from safework.verifiers.judges import JUDGES
from safework.verifiers.model_verifier import ModelVerifier
from safework.verifiers.train import VerifierTrainSettings, VerifierTrainer, evaluate as evaluate_verifier
from safework.verifiers.train import load_verifier, save_verifier

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TinyJudgeSettings:
  """A tiny judge trained from scratch on judgments the suite generates (a `config.verifiers` entry)."""
  judge: str = "safety"
  layers: int = 2
  steps: int = 80
  batch_size: int = 16
  learning_rate: float = 3e-3
  judgments: int = 400
  instruction: str | None = None   # a compact prompt for a tiny judge; verdicts and scores stay the paper's

  def validate(self) -> "TinyJudgeSettings":
    if self.judge not in JUDGES:
      raise ValueError(f"judge {self.judge!r} is not one of {sorted(JUDGES)}")
    return self


def train_verifiers(judges: dict[str, TinyJudgeSettings], seed: int, workdir: Path, processor: Processor, mesh,
                    rules, preset: str = "tiny") -> dict[str, ModelVerifier]:
  """The tiny judges, trained through the core loop (saved; reloaded on re-runs); each is the policy's `preset`
  with the judge's number of layers."""
  verifiers = {}
  for name, spec in judges.items():
    out = workdir / "verifiers" / name
    if (out / "verifier.json").is_file():
      verifiers[name] = load_verifier(out, mesh=mesh, rules=rules, batch_size=spec.batch_size)
      continue
    start = time.perf_counter()
    rows = tiny_suite.judgments(seed, spec.judgments)[spec.judge]
    split = int(0.85 * len(rows))
    manual = workdir / "data" / f"judgments_{name}"
    if distributed.is_main():
      manual.mkdir(parents=True, exist_ok=True)
      for split_name, part in (("train", rows[:split]), ("test", rows[split:])):
        (manual / f"{split_name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    distributed.wait_for_all()
    sources = prepare(Judgments, workdir / "data" / f"tfds_judgments_{name}", manual).as_data_source()
    train_rows, test_rows = ([decode(r) for r in sources[s]] for s in ("train", "test"))
    cfg = get_preset(preset)
    model = build_model(cfg.replace(text=dataclasses.replace(cfg.text, num_hidden_layers=spec.layers)))
    params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(seed), mesh, rules)
    judge = JUDGES[spec.judge]
    if spec.instruction:
      judge = dataclasses.replace(judge, instruction=spec.instruction, jailbreak_instruction=None)
    verifier = ModelVerifier(model, params, processor, judge, head="classifier", mesh=mesh, rules=rules,
                             batch_size=spec.batch_size)
    training = VerifierTrainSettings(objective="cross_entropy", train_backbone=True, learning_rate=spec.learning_rate,
                                     steps=spec.steps, batch_size=spec.batch_size)
    VerifierTrainer(verifier, training, workdir=out / "training", seed=seed).train(train_rows)
    with jax.set_mesh(mesh):
      metrics = evaluate_verifier(verifier, test_rows)
    save_verifier(out, verifier)
    if distributed.is_main():
      (out / "eval.json").write_text(json.dumps(metrics, indent=2))
    log.info("judge %s: held-out accuracy %.2f (%.0f s)", name, metrics["accuracy"], time.perf_counter() - start)
    verifiers[name] = verifier
  return verifiers


@dataclasses.dataclass(frozen=True)
class Ladder:
  """The ladder of an experiment config, parsed and checked (nothing built or loaded yet)."""
  seed: int
  mesh: dict
  rules: sharding.Rules
  policy: PolicySettings
  data_sizes: dict[str, int]
  judges: dict[str, TinyJudgeSettings]
  stages: dict[str, Stage]   # in order
  eval: EvalSettings
  intervention: SearchSettings | None = None   # the step search the checkpoints of `intervention_stages` are
  intervention_stages: tuple[str, ...] = ()    # evaluated with a second time
  # The search tool of the ladder's deliberative-search stage: at hand in every checkpoint's evaluation, so each
  # is measured on the search questions under the same conditions (empty corpus: the suite's).
  tools: ToolSettings | None = None
  # The safety aha-moment analysis of the first and the last checkpoint on the test split's harmful prompts.
  aha: AnalysisSettings | None = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "Ladder":
    judges = {name: settings(TinyJudgeSettings, spec) for name, spec in config.verifiers.items()}
    unknown = sorted(set(config.stage_order) - set(config.stages))
    if unknown:
      raise ValueError(f"stage_order names {unknown}, which config.stages does not define ({sorted(config.stages)})")
    intervention_stages = tuple(config.get("intervention_stages", ()))
    unknown = sorted(set(intervention_stages) - set(config.stage_order))
    if unknown:
      raise ValueError(f"intervention_stages names {unknown}, which stage_order does not run ({config.stage_order})")
    intervention = settings(SearchSettings, config.intervention) if intervention_stages else None
    if intervention is not None and intervention.verifiers - set(judges):
      raise ValueError(f"the intervention's recipes use verifiers {sorted(intervention.verifiers - set(judges))}; "
                       f"the ladder trains {sorted(judges)} (config.verifiers)")
    stages = {n: parse_stage(config.stages[n], extra_scorers=tuple(judges)) for n in config.stage_order}
    tools = [s.tools for s in stages.values() if isinstance(s, RLStage) and s.tools is not None]
    return cls(seed=config.seed, mesh=dict(config.mesh), rules=sharding.rules_of(config.sharding_rules),
               policy=settings(PolicySettings, config.model), data_sizes=config.data.to_dict(), judges=judges,
               stages=stages, eval=settings(EvalSettings, config.eval), intervention=intervention,
               intervention_stages=intervention_stages, tools=tools[0] if tools else None,
               aha=settings(AnalysisSettings, config.aha) if config.get("aha") else None)

  def stage_policy(self, out: Path, mesh):
    """The model, processor and parameters (on `mesh`) of the policy a stage wrote to `out/policy`."""
    policy = dataclasses.replace(self.policy, checkpoint=str(out / "policy"))
    model = policy_model(policy)
    return model, load_processor(policy, out), policy_params(policy, model, mesh, self.rules)

  def evaluate_intervened(self, name: str, out: Path, mesh, test, verifiers) -> dict:
    """The stage's policy evaluated with the step search guided by the ladder's judges (once; kept in
    `eval_<mode>.json`). The search calls no tool, so the search questions are left out."""
    test = [e for e in test if e.label not in SEARCH_LABELS]
    mode = self.intervention.mode
    path = out / f"eval_{mode}.json"
    if not path.is_file():
      start = time.perf_counter()
      model, processor, params = self.stage_policy(out, mesh)
      sampling = eval_sampling(model, processor.tokenizer, self.eval.max_new_tokens)
      search = StepSearch(Sampler(model, mesh=mesh, rules=self.rules), processor.tokenizer, verifiers,
                          self.intervention, sampling)
      with jax.set_mesh(mesh):
        scores = evaluate(model, params, processor, test, self.eval, mesh, search)
      plain = json.loads((out / "eval.json").read_text())
      if distributed.is_main():
        path.write_text(json.dumps({"stage": name, "intervention": mode, "step": plain["step"], **scores}, indent=2))
      distributed.wait_for_all()
      log.info("stage %s with the %s intervention: capability %.3f, safety %.3f, %.0f tokens sampled per answer "
               "(%.0f s)", name, mode, scores["capability"], scores["safety"], scores["generated_tokens"],
               time.perf_counter() - start)
    return json.loads(path.read_text())

  def analyze_aha(self, name: str, workdir: Path, mesh, test) -> dict:
    """MI peaks of the stage's policy on the test split's harmful prompts, against the suite's refusal (once; kept
    in `aha/<stage>/mi.json` with its figures); returns the summary of the first analysed layer."""
    out = workdir / "aha" / name
    if not (out / "mi.json").is_file():
      start = time.perf_counter()
      model, processor, params = self.stage_policy(workdir / "stages" / name, mesh)
      harmful = [e for e in test if e.meta.get("harmful")]
      with jax.set_mesh(mesh):
        responses = analyze(model, params, processor, harmful, [tiny_suite.REFUSAL] * len(harmful), self.aha,
                            Sampler(model, mesh=mesh, rules=self.rules))
      if distributed.is_main():
        write_analysis(out, str(workdir / "stages" / name / "policy"), responses, self.aha)
      distributed.wait_for_all()
      log.info("stage %s: safety aha analysis of %d harmful prompts (%.0f s)", name, len(harmful),
               time.perf_counter() - start)
    summary = json.loads((out / "mi.json").read_text())["summary"]
    return summary[min(summary, key=int)] if summary else {}

  def run(self, workdir: str | Path) -> Path:
    """Runs (or continues) the ladder in `workdir`; returns the report's path."""
    workdir, mesh = Path(workdir), sharding.make_mesh(self.mesh)
    sizes = self.data_sizes
    text_only = not family_of(policy_config(self.policy)).reads_images   # a text-only policy: no image tasks
    name = f"seed{self.seed}_" + "_".join(f"{k}{v}" for k, v in sorted(sizes.items())) + "_text" * text_only
    sources = build(workdir / "data" / "tfds", TinySuiteConfig(name=name, seed=self.seed, text_only=text_only,
                                                               **sizes)).as_data_source()
    data = SuiteData(sources, self.seed)
    # Evaluation searches the suite's corpus (its facts differ from every training question's own documents).
    tools = None if self.tools is None else ToolUse.build(dataclasses.replace(
        self.tools, corpus=self.tools.corpus or str(write_search_corpus(workdir / "data", self.seed))),
        workdir / "search_index")
    test = [example_of(row)[0] for row in sources["test"]]
    processor = load_processor(self.policy, workdir, data.corpus())
    verifiers = train_verifiers(self.judges, self.seed, workdir, processor, mesh, self.rules, self.policy.preset)
    previous, checkpoints, curves = None, [], {}
    for name, stage in self.stages.items():
      out = workdir / "stages" / name
      start = time.perf_counter()
      if not (out / "eval.json").is_file():
        policy = dataclasses.replace(self.policy, checkpoint=previous) if previous else self.policy
        trained = run_stage(stage, policy=policy, data=data, seed=self.seed, workdir=out, mesh=mesh, rules=self.rules,
                            processor=None if previous else processor, extra_scorers=verifiers)
        with jax.set_mesh(mesh):
          scores = evaluate(trained.model, trained.params, trained.processor, test, self.eval, mesh, tools=tools)
        if distributed.is_main():
          (out / "eval.json").write_text(json.dumps({"stage": name, "step": stage.total_steps, **scores}, indent=2))
        distributed.wait_for_all()
      result = json.loads((out / "eval.json").read_text())
      log.info("stage %s: capability %.3f, safety %.3f, value %.3f, search %.3f (false-certain %.3f), %.1f "
               "response tokens (%.0f s)", name, result["capability"], result["safety"], result["value"],
               result.get("search_accuracy", float("nan")), result.get("false_certain_rate", float("nan")),
               result["response_tokens"], time.perf_counter() - start)
      checkpoints.append(result)
      if name in self.intervention_stages:
        checkpoints.append(self.evaluate_intervened(name, out, mesh, test, verifiers))
      curves[name] = read_metrics(out)
      previous = str(out / "policy")
    aha = {}
    if self.aha is not None:
      for name in dict.fromkeys((list(self.stages)[0], list(self.stages)[-1])):
        aha[name] = self.analyze_aha(name, workdir, mesh, test)
    if distributed.is_main():
      write_report(workdir, checkpoints, curves, aha)
    distributed.wait_for_all()
    return workdir / "report.json"
