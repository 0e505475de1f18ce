"""Fine-tuning verifiers on labelled judgments: cross-entropy over verdicts, or Bradley-Terry over pairs.

Training runs through the core loop (`safework.training.Trainer`: checkpoints, resume, guard, preemption). The
trainable tree is {"backbone": judge parameters, "head": classifier head}; the backbone is frozen unless
`train_backbone` (its vision tower always is). Verifiers save like policies: a Hugging Face checkpoint of the
backbone plus `verifier.json` (the judge spec and head kind) and `verifier_head.safetensors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from safework import distributed, sharding
from safework.distributed import host_array
from safework.data.example import Example
from safework.models import from_pretrained, save_pretrained
from safework.models.checkpoint import abstract_params
from safework.processing import Processor
from safework.rl.optim import OptimSettings, make_optimizer
from safework.training import StepBatch, StepSource, Trainer, TrainSettings, read_metrics
from safework.verifiers.judges import JudgeSpec
from safework.verifiers.model_verifier import JudgePixels, ModelVerifier

OBJECTIVES = ("cross_entropy", "bradley_terry")


@dataclasses.dataclass(frozen=True)
class VerifierTrainSettings:
  objective: str = "cross_entropy"
  train_backbone: bool = False
  learning_rate: float = 1e-4
  steps: int = 200
  batch_size: int = 16
  weight_decay: float = 0.0

  def validate(self) -> "VerifierTrainSettings":
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
    if self.steps < 1 or self.batch_size < 1:
      raise ValueError(f"verifier training needs positive steps and batch_size, got {self.steps}, {self.batch_size}")
    return self


def judgment_examples(row: dict[str, Any]) -> Example:
  return Example(question=row["question"], images=tuple(row.get("images") or ()), label=row.get("label") or "normal",
                 answer=row.get("answer") or None)


def _verdict_index(spec: JudgeSpec, verdict: str) -> int:
  if verdict not in spec.verdicts:
    raise ValueError(f"verdict {verdict!r} is not one of judge {spec.name}'s verdicts {list(spec.verdicts)}")
  return spec.verdicts.index(verdict)


@flax.struct.dataclass
class JudgeRows:
  """Judge prompts [R, T] (R = B rows, or 2B for preference pairs: chosen rows, then rejected) and targets [B]."""
  input_ids: jax.Array
  attention_mask: jax.Array
  targets: jax.Array


@flax.struct.dataclass
class JudgeContext:
  pixels: JudgePixels
  prepared: Any


@dataclasses.dataclass(frozen=True)
class VerdictObjective:
  """Cross-entropy on the verdict, or Bradley-Terry on (chosen, rejected) with score = lp(first) - lp(second)."""
  logprobs: Callable
  objective: str

  def totals(self, rows: JudgeRows):
    return None

  def __call__(self, trainable, rows: JudgeRows, context: JudgeContext, totals):
    out = self.logprobs(trainable["backbone"], trainable["head"] or None, rows.input_ids, rows.attention_mask,
                        context.pixels, context.prepared)
    normalised = jax.nn.log_softmax(out, axis=-1)
    if self.objective == "cross_entropy":
      return -jnp.take_along_axis(normalised, rows.targets[:, None], axis=1).mean(), {}
    half = out.shape[0] // 2
    score = normalised[:, 0] - normalised[:, 1]
    return -jax.nn.log_sigmoid(score[:half] - score[half:]).mean(), {}


class JudgmentSource(StepSource):
  """Batches of judgments drawn (seeded by step) from rows held in memory."""

  def __init__(self, verifier: ModelVerifier, rows: Sequence[dict], settings: VerifierTrainSettings, seed: int,
               mesh: jax.sharding.Mesh):
    if not rows:
      raise ValueError("verifier training needs at least one judgment row")
    self.verifier, self.rows, self.settings, self.seed, self.mesh = verifier, list(rows), settings, seed, mesh
    self.total_steps, self.batch_size = settings.steps, settings.batch_size
    for row in self.rows:   # every verdict is checked before the first step
      if settings.objective == "cross_entropy":
        _verdict_index(verifier.spec, row["verdict"])

  def batch(self, step: int, params) -> StepBatch:
    picked = np.random.default_rng([self.seed, step]).choice(len(self.rows), self.batch_size)
    rows = [self.rows[i] for i in picked]
    examples = [judgment_examples(r) for r in rows]
    if self.settings.objective == "cross_entropy":
      arrays = self.verifier.batch_arrays(examples, [r["response"] for r in rows])
      targets = np.array([_verdict_index(self.verifier.spec, r["verdict"]) for r in rows], np.int32)
    else:
      arrays = self.verifier.batch_arrays(examples * 2, [r["chosen"] for r in rows] + [r["rejected"] for r in rows])
      targets = np.zeros(len(rows), np.int32)
    rules = self.verifier.rules
    place = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, rules, x.ndim, x.shape[0]))
    judge_rows = jax.tree.map(place, JudgeRows(arrays["input_ids"], arrays["attention_mask"], targets))
    context = jax.device_put(JudgeContext(self.verifier.pixels(arrays), self.verifier.prepare(arrays)),
                             sharding.replicated(self.mesh))
    return StepBatch(rows=judge_rows, context=context, tokens=int(arrays["attention_mask"].sum()))


class VerifierTrainer:
  """Fine-tunes a verifier's backbone and head through the core loop, checkpointing in `workdir`."""

  def __init__(self, verifier: ModelVerifier, settings: VerifierTrainSettings, workdir: str | Path, seed: int = 0,
               train: TrainSettings = TrainSettings(checkpoint_every=100, keep_checkpoints=1)):
    settings, train = settings.validate(), train.validate()
    if verifier.head == "verdict" and not settings.train_backbone:
      raise ValueError("a verdict head is the judge's own LM head: train it with train_backbone=True, or use a "
                       "classifier head")
    if train.micro_batch_size not in (None, settings.batch_size):
      raise ValueError("verifier training takes each batch whole (micro_batch_size=None): its judge prompts and "
                       "their images are one block")
    self.verifier, self.settings, self.workdir, self.seed = verifier, settings, Path(workdir), seed
    self.mesh = verifier.mesh if verifier.mesh is not None else sharding.make_mesh({"data": -1})
    on_mesh = lambda x: jax.device_put(x, sharding.replicated(self.mesh)) if not _on(x, self.mesh) else x
    self.trainable = jax.tree.map(on_mesh, {"backbone": verifier.params, "head": verifier.head_params or {}})
    freeze = ("backbone/visual",) if settings.train_backbone else ("backbone",)
    optim = OptimSettings(learning_rate=settings.learning_rate, warmup_fraction=0.05,
                          weight_decay=settings.weight_decay, freeze_prefixes=freeze)
    self.tx = make_optimizer(optim, settings.steps, self.trainable)
    logprobs = functools.partial(ModelVerifier.logprobs_fn, verifier.model, verifier.head, verifier.verdict_ids)
    self.objective = VerdictObjective(logprobs, settings.objective)
    self.train_settings = train

  def train(self, rows: Sequence[dict]) -> list[float]:
    """Trains for `steps` batches drawn (seeded) from `rows` (resuming from `workdir`'s checkpoints); updates the
    verifier's parameters in place and returns the loss of each step."""
    source = JudgmentSource(self.verifier, rows, self.settings, self.seed, self.mesh)
    trainer = Trainer(workdir=self.workdir, mesh=self.mesh, settings=self.train_settings, objective=self.objective,
                      tx=self.tx, source=source, name=f"judge {self.verifier.spec.name}")
    state = trainer.run(self.trainable)
    self.trainable = state.params
    self.verifier.params, self.verifier.head_params = state.params["backbone"], state.params["head"] or None
    return [r["loss"] for r in read_metrics(self.workdir)]


def _on(x, mesh) -> bool:
  return isinstance(getattr(x, "sharding", None), jax.sharding.NamedSharding) and x.sharding.mesh == mesh


def evaluate(verifier: ModelVerifier, rows: Sequence[dict]) -> dict[str, float]:
  """Accuracy and per-verdict F1 (classification rows), or pair accuracy (preference rows)."""
  spec = verifier.spec
  examples = [judgment_examples(r) for r in rows]
  if rows and rows[0].get("chosen"):
    chosen = verifier.verdict_logprobs(examples, [r["chosen"] for r in rows])
    rejected = verifier.verdict_logprobs(examples, [r["rejected"] for r in rows])
    margin = lambda lp: lp[:, 0] - lp[:, 1]
    return {"pair_accuracy": float(np.mean(margin(chosen) > margin(rejected)))}
  predicted = verifier.verdict_logprobs(examples, [r["response"] for r in rows]).argmax(axis=1)
  truth = np.array([_verdict_index(spec, r["verdict"]) for r in rows])
  out = {"accuracy": float(np.mean(predicted == truth))}
  for k, verdict in enumerate(spec.verdicts):
    tp = np.sum((predicted == k) & (truth == k))
    precision = tp / max(np.sum(predicted == k), 1)
    recall = tp / max(np.sum(truth == k), 1)
    out[f"f1/{verdict}"] = float(2 * precision * recall / max(precision + recall, 1e-12))
  return out


def save_verifier(path: str | Path, verifier: ModelVerifier) -> Path:
  """Backbone as a Hugging Face checkpoint (with the tokenizer), plus the judge spec and the head."""
  path = Path(path)
  save_pretrained(path, verifier.model, verifier.params)   # every process gathers its shards; process 0 writes
  head = {k: host_array(v) for k, v in (verifier.head_params or {}).items()}
  if distributed.is_main():
    verifier.processor.tokenizer.save_pretrained(path)
    (path / "verifier.json").write_text(json.dumps({"head": verifier.head, "spec": dataclasses.asdict(verifier.spec)},
                                                   indent=2))
    if head:
      save_file(head, str(path / "verifier_head.safetensors"))
  distributed.wait_for_all()
  return path


def load_verifier(path: str | Path, mesh: jax.sharding.Mesh | None = None,
                  rules: sharding.Rules = sharding.DEFAULT_RULES, dtype=jnp.float32, **kwargs) -> ModelVerifier:
  path = Path(path)
  meta = json.loads((path / "verifier.json").read_text())
  spec = JudgeSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
  shardings = None if mesh is None else (lambda m: sharding.param_shardings(abstract_params(m), mesh, rules))
  model, params = from_pretrained(path, dtype=dtype, shardings=shardings)
  head = load_file(str(path / "verifier_head.safetensors")) if (path / "verifier_head.safetensors").is_file() else None
  return ModelVerifier(model, params, Processor.from_pretrained(path), spec, head=meta["head"], head_params=head,
                       mesh=mesh, rules=rules, **kwargs)
