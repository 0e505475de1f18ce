"""Fine-tuning verifiers on labelled judgments: cross-entropy over verdicts, or Bradley-Terry over pairs.

The trainable tree is {"backbone": judge parameters, "head": classifier head}; the backbone is frozen unless
`train_backbone` (its vision tower always is). Verifiers save like policies: a Hugging Face checkpoint of the
backbone plus `verifier.json` (the judge spec and head kind) and `verifier_head.safetensors`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from safetensors.numpy import load_file, save_file

from safework import sharding
from safework.data.example import Example
from safework.models import from_pretrained, save_pretrained
from safework.models.checkpoint import abstract_params
from safework.processing import Processor
from safework.rl.optim import OptimSettings, make_optimizer
from safework.verifiers.judges import JudgeSpec
from safework.verifiers.model_verifier import ModelVerifier

OBJECTIVES = ("cross_entropy", "bradley_terry")


@dataclasses.dataclass(frozen=True)
class VerifierTrainSettings:
  objective: str = "cross_entropy"
  train_backbone: bool = False
  learning_rate: float = 1e-4
  steps: int = 200
  batch_size: int = 16
  weight_decay: float = 0.0
  seed: int = 0
  progress_bar: bool = True

  def validate(self) -> "VerifierTrainSettings":
    if self.objective not in OBJECTIVES:
      raise ValueError(f"objective {self.objective!r} is not one of {OBJECTIVES}")
    return self


def judgment_examples(row: dict[str, Any]) -> Example:
  return Example(question=row["question"], images=tuple(row.get("images") or ()), label=row.get("label") or "normal",
                 answer=row.get("answer") or None)


def _verdict_index(spec: JudgeSpec, verdict: str) -> int:
  if verdict not in spec.verdicts:
    raise ValueError(f"verdict {verdict!r} is not one of judge {spec.name}'s verdicts {list(spec.verdicts)}")
  return spec.verdicts.index(verdict)


class VerifierTrainer:
  def __init__(self, verifier: ModelVerifier, settings: VerifierTrainSettings):
    if verifier.head == "verdict" and not settings.train_backbone:
      raise ValueError("a verdict head is the judge's own LM head: train it with train_backbone=True, or use a "
                       "classifier head")
    self.verifier, self.settings = verifier, settings.validate()
    freeze = ("backbone/visual",) if settings.train_backbone else ("backbone",)
    self.trainable = {"backbone": verifier.params, "head": verifier.head_params or {}}
    optim = OptimSettings(learning_rate=settings.learning_rate, warmup_fraction=0.05, weight_decay=settings.weight_decay,
                          freeze_prefixes=freeze)
    self.tx = make_optimizer(optim, settings.steps, self.trainable)
    v = verifier
    logprobs = functools.partial(ModelVerifier.logprobs_fn, v.model, v.head, v.verdict_ids)
    objective = settings.objective

    def loss_fn(trainable, ids, mask, pixel_values, prepared, targets):
      out = logprobs(trainable["backbone"], trainable["head"] or None, ids, mask, pixel_values, prepared)
      normalised = jax.nn.log_softmax(out, axis=-1)
      if objective == "cross_entropy":
        return -jnp.take_along_axis(normalised, targets[:, None], axis=1).mean()
      half = out.shape[0] // 2   # rows [chosen..., rejected...]; score = first verdict vs second
      score = normalised[:, 0] - normalised[:, 1]
      return -jax.nn.log_sigmoid(score[:half] - score[half:]).mean()

    def step(trainable, opt_state, ids, mask, pixel_values, prepared, targets):
      loss, grads = jax.value_and_grad(loss_fn)(trainable, ids, mask, pixel_values, prepared, targets)
      updates, opt_state = self.tx.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, loss

    self._step = jax.jit(step, donate_argnums=(0, 1))

  def _batch(self, rows: Sequence[dict]) -> tuple[dict, np.ndarray]:
    spec = self.verifier.spec
    if self.settings.objective == "cross_entropy":
      examples = [judgment_examples(r) for r in rows]
      arrays = self.verifier.batch_arrays(examples, [r["response"] for r in rows])
      return arrays, np.array([_verdict_index(spec, r["verdict"]) for r in rows], np.int32)
    examples = [judgment_examples(r) for r in rows] * 2
    responses = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    return self.verifier.batch_arrays(examples, responses), np.zeros(len(responses), np.int32)

  def train(self, rows: Sequence[dict]) -> list[float]:
    """Trains for `steps` batches drawn (seeded) from `rows`; updates the verifier's parameters in place."""
    rng = np.random.default_rng(self.settings.seed)
    trainable = jax.tree.map(jnp.copy, self.trainable)
    opt_state = self.tx.init(trainable)
    losses = []
    for _ in tqdm.trange(self.settings.steps, desc="verifier", dynamic_ncols=True,
                         disable=not self.settings.progress_bar or jax.process_index() != 0):
      picked = [rows[i] for i in rng.choice(len(rows), self.settings.batch_size, replace=len(rows) < self.settings.batch_size)]
      arrays, targets = self._batch(picked)
      prepared = self.verifier.prepare(arrays)
      trainable, opt_state, loss = self._step(trainable, opt_state, arrays["input_ids"], arrays["attention_mask"],
                                              arrays.get("pixel_values"), prepared, targets)
      losses.append(float(loss))
    self.verifier.params, self.verifier.head_params = trainable["backbone"], trainable["head"] or None
    self.trainable = {"backbone": self.verifier.params, "head": self.verifier.head_params or {}}
    return losses


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
  save_pretrained(path, verifier.model, verifier.params)
  verifier.processor.tokenizer.save_pretrained(path)
  (path / "verifier.json").write_text(json.dumps({"head": verifier.head, "spec": dataclasses.asdict(verifier.spec)},
                                                 indent=2))
  if verifier.head_params is not None:
    save_file({k: np.asarray(jax.device_get(v)) for k, v in verifier.head_params.items()},
              str(path / "verifier_head.safetensors"))
  return path


def load_verifier(path: str | Path, mesh: jax.sharding.Mesh | None = None,
                  rules: sharding.Rules = sharding.DEFAULT_RULES, **kwargs) -> ModelVerifier:
  path = Path(path)
  meta = json.loads((path / "verifier.json").read_text())
  spec = JudgeSpec(**{k: tuple(v) if isinstance(v, list) else v for k, v in meta["spec"].items()})
  shardings = None if mesh is None else (lambda m: sharding.param_shardings(abstract_params(m), mesh, rules))
  model, params = from_pretrained(path, shardings=shardings)
  head = load_file(str(path / "verifier_head.safetensors")) if (path / "verifier_head.safetensors").is_file() else None
  return ModelVerifier(model, params, Processor.from_pretrained(path), spec, head=meta["head"], head_params=head,
                       mesh=mesh, rules=rules, **kwargs)
