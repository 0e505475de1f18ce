"""One benchmark evaluated into a work directory: generate (resumable), judge, score, write the tables.

OUT/NAME/ holds `generation.json` (what the responses were generated with: a resumed run must match it),
`generations.jsonl` (one line per finished item, appended batch by batch, so an interrupted run regenerates only
what it had not finished), `responses.jsonl` (per item: prompt, images, response, the rules' verdict, the model
judge's verdicts and scores: for audit), `results.json` and `report.md`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from safework import distributed
from safework.benchmarks.base import Benchmark, BenchmarkFileError, Item, Judgement, csv_rows, jsonl_rows
from safework.benchmarks.judging import JudgeChoice, rule_judgements, with_model
from safework.verifiers.refusal import RefusalVerdict, verdict_agreement

Generate = Callable[[Sequence[Item]], list[str]]   # responses of a batch of items, in order


@dataclasses.dataclass(frozen=True)
class Responses:
  """Responses of a benchmark's items (in item order), and how fast the new ones were generated."""
  texts: list[str]
  items_per_s: float | None = None


def generate_resumably(items: Sequence[Item], generate: Generate, out: Path, identity: Mapping[str, Any],
                       chunk: int, progress: Callable[[int], None] = lambda n: None) -> Responses:
  """Responses to every item, reusing those `out/generations.jsonl` already holds from a run with the same
  `identity` (checkpoint, data, generation settings); new ones are appended `chunk` items at a time."""
  out.mkdir(parents=True, exist_ok=True)
  record, done_path = out / "generation.json", out / "generations.jsonl"
  identity = json.loads(json.dumps(dict(identity)))
  if record.is_file() and json.loads(record.read_text()) != identity:
    before = json.loads(record.read_text())
    changed = sorted(k for k in {*before, *identity} if before.get(k) != identity.get(k))
    raise ValueError(f"{out} holds responses generated with other settings ({', '.join(changed)} differ); give "
                     "another --workdir or delete that folder")
  done: dict[str, str] = {}
  if done_path.is_file():
    for _, row in jsonl_rows(done_path):
      done[row["id"]] = row["response"]
  if distributed.is_main():
    record.write_text(json.dumps(identity, indent=1))
  progress(sum(item.id in done for item in items))
  todo = [item for item in items if item.id not in done]
  start = time.perf_counter()
  for first in range(0, len(todo), chunk):
    batch = todo[first:first + chunk]
    texts = generate(batch)
    if distributed.is_main():
      with open(done_path, "a", encoding="utf-8") as f:
        for item, text in zip(batch, texts):
          f.write(json.dumps({"id": item.id, "response": text}) + "\n")
    done.update({item.id: text for item, text in zip(batch, texts)})
    progress(len(batch))
  elapsed = time.perf_counter() - start
  return Responses([done[item.id] for item in items], len(todo) / elapsed if todo and elapsed > 0 else None)


def read_completions(path: Path) -> tuple[list[str], list[str] | None]:
  """The `completion` column (CSV) or field (JSONL) of a completions file, and its human labels (`final_label`)
  where it has them."""
  path = Path(path)
  if path.suffix == ".jsonl":
    rows = list(jsonl_rows(path))
  else:
    rows = list(csv_rows(path, ("completion",)))
  for line, row in rows:
    if "completion" not in row or row["completion"] is None:
      raise BenchmarkFileError(f"{path}:{line}: no 'completion' field")
  labels = [row.get("final_label") for _, row in rows]
  return [str(row["completion"]) for _, row in rows], (labels if all(labels) else None)


_XSTEST_CLASSES = {"1": RefusalVerdict.FULL_COMPLIANCE, "2": RefusalVerdict.FULL_REFUSAL,
                   "3": RefusalVerdict.PARTIAL_REFUSAL}


def judge_class(judgement: Judgement, judge: str) -> RefusalVerdict | None:
  """The judge's refusal class (XSTest's three), where the judge gives one."""
  if judge == "rules":
    return RefusalVerdict(judgement.refusal)
  if judge == "xstest":
    return _XSTEST_CLASSES[judgement.verdicts["xstest"]]
  return None


def evaluate_responses(benchmark: Benchmark, items: Sequence[Item], responses: Sequence[str], judge: JudgeChoice,
                       model_judge: Callable | None = None, labels: Sequence[str] | None = None
                       ) -> tuple[dict[str, Any], list[Judgement]]:
  """(results, judgements): `model_judge(benchmark, items, responses, kind)` gives the model verdicts when the
  judge is a model."""
  judgements = rule_judgements(benchmark, responses)
  if judge.kind != "rules":
    judgements = with_model(judgements, model_judge(benchmark, items, responses, judge.kind))
  metrics, categories = benchmark.metrics(items, judgements, judge.kind)
  if labels is not None:
    classes = [judge_class(j, judge.kind) for j in judgements]
    if all(c is not None for c in classes):
      metrics["agreement"] = verdict_agreement(zip(classes, labels))
  return {"benchmark": benchmark.name, "n": len(items), "judge": str(judge), "metrics": metrics,
          "by_category": categories}, judgements


def write_outputs(out: Path, results: Mapping[str, Any], items: Sequence[Item], responses: Sequence[str],
                  judgements: Sequence[Judgement]) -> None:
  if not distributed.is_main():
    return
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
  with open(out / "responses.jsonl", "w", encoding="utf-8") as f:
    for item, response, judgement in zip(items, responses, judgements):
      f.write(json.dumps({"id": item.id, "prompt": item.prompt, "images": list(item.images),
                          "category": item.category, "meta": dict(item.meta), "response": response,
                          "verdict": judgement.refusal, "judge_verdicts": dict(judgement.verdicts),
                          "judge_scores": dict(judgement.scores)}) + "\n")
  (out / "report.md").write_text(report(results))


def _cell(value: Any) -> str:
  return f"{100 * value:.1f}" if isinstance(value, float) and not np.isnan(value) else str(value)


def report(results: Mapping[str, Any]) -> str:
  """A benchmark's table (rates in percent) and its per-category table."""
  metrics = {k: v for k, v in results["metrics"].items() if not isinstance(v, dict)}
  lines = [f"# {results['benchmark']} ({results['n']} items, judge: {results['judge']})", "",
           "| " + " | ".join(metrics) + " |", "|" + "---|" * len(metrics),
           "| " + " | ".join(_cell(v) for v in metrics.values()) + " |", ""]
  if "agreement" in results["metrics"]:
    a = results["metrics"]["agreement"]
    lines += [f"Agreement with the human labels: binary {_cell(a['binary'])}%, three-class "
              f"{_cell(a['three_class'])}% (n = {a['n']}).", ""]
  categories = results["by_category"]
  if categories:
    names = [k for k in next(iter(categories.values())) if k != "n"]
    lines += ["| category | n | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    lines += [f"| {c} | {int(v['n'])} | " + " | ".join(_cell(v[k]) for k in names) + " |"
              for c, v in categories.items()]
  return "\n".join(lines) + "\n"


def summary(all_results: Sequence[Mapping[str, Any]]) -> str:
  """One row per benchmark with its headline metric (the paper-style table)."""
  lines = ["| benchmark | judge | n | metric | value |", "|---|---|---|---|---|"]
  for r in all_results:
    name, value = next(((k, v) for k, v in r["metrics"].items() if not isinstance(v, dict)), ("-", "-"))
    headline = {"xstest": "xstest_safe"}.get(r["benchmark"])
    if headline in r["metrics"]:
      name, value = headline, r["metrics"][headline]
    lines.append(f"| {r['benchmark']} | {r['judge']} | {r['n']} | {name} | {_cell(value)} |")
  return "\n".join(lines) + "\n"
