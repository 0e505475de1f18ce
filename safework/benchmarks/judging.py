"""Judging benchmark responses: the rules always (cheap, offline), a model judge when one is given.

`--judge rules` or `--judge KIND:CHECKPOINT`: KIND names one of the benchmark's judge prompts (its own, e.g.
HarmBench's classifier or the StrongREJECT rubric, or the paper's safety judge), CHECKPOINT any local Qwen2.5-VL
judge, run through the project's jitted verdict head (one forward pass per prompt, batched on device), or a saved
verifier (verifier.json: a trained head with its own prompt, e.g. the tiny SafeLadder's safety judge).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import jax
import numpy as np

from safework.benchmarks.base import Benchmark, Item, Judgement
from safework.verifiers import heads
from safework.verifiers.judges import JudgeSpec
from safework.verifiers.model_verifier import ModelVerifier
from safework.verifiers.refusal import classify_response


@dataclasses.dataclass(frozen=True)
class JudgeChoice:
  kind: str                      # "rules", or a kind of the benchmark's `judges`
  checkpoint: str | None = None

  @classmethod
  def parse(cls, text: str) -> "JudgeChoice":
    kind, _, checkpoint = text.partition(":")
    if kind == "rules" and not checkpoint:
      return cls("rules")
    if not kind or not checkpoint:
      raise ValueError(f"--judge {text!r}: give 'rules' or KIND:CHECKPOINT (e.g. harmbench:/ckpt/judge)")
    return cls(kind, checkpoint)

  def check(self, benchmark: Benchmark) -> "JudgeChoice":
    if self.kind == "rules" and not getattr(benchmark, "rules_judge", True):
      raise ValueError(f"{benchmark.name} is scored by a model judge: give --judge "
                       f"{next(iter(benchmark.judges))}:CHECKPOINT")
    if self.kind != "rules" and self.kind not in benchmark.judges:
      raise ValueError(f"{benchmark.name} has no {self.kind!r} judge; its judges: rules, "
                       f"{', '.join(sorted(benchmark.judges))}")
    return self

  def __str__(self) -> str:
    return self.kind if self.checkpoint is None else f"{self.kind}:{self.checkpoint}"


def rule_judgements(benchmark: Benchmark, responses: Sequence[str]) -> list[Judgement]:
  """The refusal class of every response, and the benchmark's own rule scores (`rule_scores`, where it has any)."""
  extra = getattr(benchmark, "rule_scores", lambda response: {})
  return [Judgement(refusal=classify_response(r).value, scores=extra(r)) for r in responses]


def model_judgements(benchmark: Benchmark, items: Sequence[Item], responses: Sequence[str], kind: str,
                     verifier_for: Callable[[JudgeSpec], ModelVerifier]) -> list[dict[str, tuple[str, float]]]:
  """Per item, {score name: (verdict, score)} from each of the kind's judge prompts; `verifier_for(spec)` gives the
  verifier that judges with a prompt (`hf_judge` or `saved_judge`)."""
  out: list[dict[str, tuple[str, float]]] = [{} for _ in items]
  judged = getattr(benchmark, "judged", lambda item, spec: (spec, item.example()))
  for name, spec in benchmark.judges[kind].items():
    groups: dict = {}
    for i, item in enumerate(items):
      item_spec, example = judged(item, spec)
      groups.setdefault(item_spec, []).append((i, example))
    for item_spec, rows in groups.items():
      verifier = verifier_for(item_spec)
      logprobs = verifier.verdict_logprobs([e for _, e in rows], [responses[i] for i, _ in rows])
      used = verifier.spec
      scores = heads.scores_from_logprobs(logprobs, np.asarray(used.scores, np.float32), used.scoring)
      for (i, _), best, score in zip(rows, np.argmax(logprobs, axis=1), scores):
        out[i][name] = (used.verdicts[int(best)], float(score))
  return out


def hf_judge(model, params, processor, mesh: jax.sharding.Mesh | None, rules, batch_size: int = 16,
             max_length: int = 4096) -> Callable[[JudgeSpec], ModelVerifier]:
  """A Hugging Face judge checkpoint asked each benchmark prompt through its verdict head."""
  return lambda spec: ModelVerifier(model, params, processor, spec, head="verdict", mesh=mesh, rules=rules,
                                    batch_size=batch_size, max_length=max_length)


def saved_judge(verifier: ModelVerifier) -> Callable[[JudgeSpec], ModelVerifier]:
  """A saved verifier (a trained head, e.g. the tiny SafeLadder's judges) keeps its own prompt: it stands in for a
  benchmark prompt with the same verdicts."""
  def verifier_for(spec: JudgeSpec) -> ModelVerifier:
    if tuple(verifier.spec.verdicts) != tuple(spec.verdicts):
      raise ValueError(f"the saved verifier {verifier.spec.name!r} answers {list(verifier.spec.verdicts)}; the "
                       f"{spec.name!r} prompt needs {list(spec.verdicts)}")
    return verifier
  return verifier_for


def with_model(judgements: Sequence[Judgement], model: Sequence[dict[str, tuple[str, float]]]) -> list[Judgement]:
  return [dataclasses.replace(j, verdicts={k: v for k, (v, _) in m.items()},
                              scores={**j.scores, **{k: s for k, (_, s) in m.items()}})
          for j, m in zip(judgements, model)]
