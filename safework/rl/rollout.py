"""One rollout: prompts -> G samples each on device -> rewards -> (DAPO filters) -> advantages -> training rows.

A rollout is sampled in rounds of `prompts_per_rollout` prompts. With `dynamic_sampling`, groups whose rewards
are all equal (no preference, advantage 0: in safety data the all-refuse group is the common case) are dropped
and further rounds refill the batch, up to `max_sampling_rounds`; whatever is still missing is filled with
dropped groups in sampling order. Overlong responses (cut at `max_new_tokens`) can be masked out of the loss or
penalised softly in the reward (DAPO), counted in tokens.

The result is a typed `Rollout` of host arrays, which is also what a checkpoint stores when a run stops between
the minibatches of a rollout (`to_buffer` / `from_buffer`), so resuming trains on exactly the same data.

Axis legend: P prompts, G samples per prompt, B = P * G rows (prompt-major: row = p * G + g), Lp prompt bucket,
N = max_new_tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safework import distributed, sharding
from safework.data.example import Example
from safework.models.checkpoint import abstract_params
from safework.models.vision_shards import ShardAxes
from safework.processing import Processor
from safework.rewards.base import RewardFunction, Rewards
from safework.rewards.constraint import ConstraintSettings, with_false_certain
from safework.rl import advantages as adv
from safework.rl import losses
from safework.rl.batch import SequenceBatch, VisionInputs, prompt_sequences
from safework.rl.logprobs import bucketed_widths
from safework.sampling import Sampler, SamplingSettings
from safework.sampling.prompts import PromptBatch
from safework.sampling.text import decode_rows, stop_sequences
from safework.tools.generate import ToolUse, example_documents, generate_with_tools

OVERLONG = ("none", "mask", "soft")


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """Defaults are the paper's: 128 prompts x 8 samples at temperature 1, 128 samples per optimizer step."""
  num_rollouts: int = 10
  prompts_per_rollout: int = 128
  samples_per_prompt: int = 8
  max_new_tokens: int = 1024
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int | None = None
  max_prompt_length: int = 2048
  stop_strings: tuple[str, ...] = ()
  advantage: str = "group_zscore"
  length_lambda: float = 0.5     # length_conditional only (advantages.length_conditional)
  length_alpha: float = 0.9
  length_beta: float = 0.0
  length_scale: float = 1.0
  old_logprobs: str = "sampler"  # "sampler": the sampler's own; "recompute": a forward pass before updating
  minibatch_size: int = 128
  epochs: int = 1
  bucket_images: int = 4         # sizes per octave of a batch's image patches (a blank image pads up); 0: none
  generation_prompts: int | None = None   # prompts prefilled and decoded together (None: a whole round at once);
                                          # fewer bound the KV cache (python -m safework.plan tells what fits)
  # The sampler decodes from a copy of the policy refreshed once per rollout: in this dtype (None: the masters'),
  # and, with sampling_replicated, replicated over the fsdp axis (no weight all-gathers per decode step).
  sampling_dtype: str | None = None
  sampling_replicated: bool = False
  # Rows that finish early stop costing: the decode moves the live rows into a batch half the size up to this many
  # times (0: off). Each level is more loop bodies to compile, and its copies cost temporaries (see the planner).
  compaction_levels: int = 0
  # A training micro-batch computes over its longest response rounded up to response_bucket * 2^k columns (rows are
  # grouped by length; every width is one branch of the one compiled step), not max_new_tokens; 0: all columns.
  response_bucket: int = 0
  dynamic_sampling: bool = False  # DAPO: replace groups with all-equal rewards by freshly sampled ones
  max_sampling_rounds: int = 3
  overlong: str = "none"         # responses cut at max_new_tokens: "none", "mask" (no loss) or "soft" (penalty)
  overlong_buffer: int = 0       # soft: the penalty ramps from 0 to overlong_penalty over the last this many tokens
  overlong_penalty: float = 1.0

  @property
  def rows(self) -> int:
    return self.prompts_per_rollout * self.samples_per_prompt

  @property
  def steps(self) -> int:
    return self.epochs * self.rows // self.minibatch_size

  @property
  def response_widths(self) -> tuple[int, ...]:
    """The response widths training micro-batches compute over (see `bucketed_widths`)."""
    return self.widths(self.max_new_tokens)

  def widths(self, response_length: int) -> tuple[int, ...]:
    """The narrower widths of responses of `response_length` columns (with tools: the policy's tokens and the
    results it reads)."""
    return bucketed_widths(self.response_bucket, response_length)

  def validate(self) -> "RolloutSettings":
    if self.num_rollouts < 1:
      raise ValueError(f"num_rollouts must be at least 1, got {self.num_rollouts}")
    if self.rows % self.minibatch_size:
      raise ValueError(f"{self.prompts_per_rollout} prompts x {self.samples_per_prompt} samples = {self.rows} rows "
                       f"do not split into minibatches of {self.minibatch_size}")
    if self.samples_per_prompt < 2:
      raise ValueError("group advantages need at least 2 samples per prompt")
    if self.temperature <= 0:
      raise ValueError(f"RL samples its rollouts: temperature must be positive, got {self.temperature}")
    if self.old_logprobs not in ("sampler", "recompute"):
      raise ValueError(f"old_logprobs={self.old_logprobs!r}: choose 'sampler' or 'recompute'")
    if self.advantage not in adv.ESTIMATORS:
      raise ValueError(f"unknown advantage estimator {self.advantage!r}; choose one of {adv.ESTIMATORS}")
    if self.overlong not in OVERLONG:
      raise ValueError(f"overlong={self.overlong!r}: choose one of {OVERLONG}")
    if self.overlong == "soft" and not 0 < self.overlong_buffer < self.max_new_tokens:
      raise ValueError(f"overlong='soft' needs 0 < overlong_buffer < max_new_tokens ({self.max_new_tokens}), "
                       f"got {self.overlong_buffer}")
    if self.sampling_dtype is not None:
      try:
        jnp.dtype(self.sampling_dtype)
      except TypeError:
        raise ValueError(f"sampling_dtype={self.sampling_dtype!r} is not a dtype (bfloat16, float32)") from None
    if self.response_bucket < 0:
      raise ValueError(f"response_bucket must be 0 (off) or positive, got {self.response_bucket}")
    if self.compaction_levels < 0:
      raise ValueError(f"compaction_levels must be 0 (off) or more, got {self.compaction_levels}")
    if self.generation_prompts is not None and self.generation_prompts < 1:
      raise ValueError(f"generation_prompts must be positive (or None), got {self.generation_prompts}")
    if self.max_sampling_rounds < 1 or self.length_scale <= 0:
      raise ValueError("max_sampling_rounds must be at least 1 and length_scale positive")
    return self

  def sampling_copy(self, model, mesh: jax.sharding.Mesh, rules) -> Callable[[Any], Any] | None:
    """The jitted cast of the masters into the sampler's copy (None: the sampler reads the masters)."""
    if self.sampling_dtype is None and not self.sampling_replicated:
      return None
    dtype = jnp.dtype(self.sampling_dtype or model.param_dtype)
    rules = sharding.without_axis(rules, "fsdp") if self.sampling_replicated else rules
    shardings = sharding.param_shardings(abstract_params(model), mesh, rules)
    return jax.jit(lambda params: jax.tree.map(lambda x: x.astype(dtype), params), out_shardings=shardings)

  def sampling(self, tokenizer, eos_ids: Sequence[int]) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                            top_k=self.top_k, eos_ids=tuple(sorted(set(eos_ids))),
                            stop_sequences=stop_sequences(tokenizer, self.stop_strings),
                            pad_id=tokenizer.pad_token_id, vocab_limit=len(tokenizer)).validate()

  def advantages(self, rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    shape = (-1, self.samples_per_prompt)
    kwargs = {}
    if self.advantage == "length_conditional":
      kwargs = dict(lam=self.length_lambda, alpha=self.length_alpha, beta=self.length_beta, scale=self.length_scale)
    return adv.compute_advantages(self.advantage, rewards.reshape(shape), lengths.reshape(shape),
                                  **kwargs).reshape(-1)


@dataclasses.dataclass
class Rollout:
  """One rollout's host arrays, rows prompt-major (row = prompt * G + sample)."""
  prompts: PromptBatch
  responses: np.ndarray                # [B, N] int32 sampled tokens, pad after each row's end
  lengths: np.ndarray                  # [B] int32 tokens per response (the stop token included)
  done: np.ndarray                     # [B] bool: ended by EOS or a stop sequence (False: cut at max_new_tokens)
  policy_logp: np.ndarray              # [B, N] the sampling policy's log-probs (temperature 1, full vocabulary)
  behaviour_logp: np.ndarray           # [B, N] log-probs under the distribution really drawn from
  rewards: np.ndarray                  # [B] the rewards the advantages come from (shaping and KL included)
  components: dict[str, np.ndarray]    # [B] each reward component, as scored
  trained: np.ndarray                  # [B] bool: rows in the loss (False: an overlong row under overlong='mask')
  advantages: np.ndarray | None = None  # [B]
  old_logp: np.ndarray | None = None   # [B, N] recomputed before the update (old_logprobs='recompute')
  ref_logp: np.ndarray | None = None   # [B, N] under the reference policy (KL)
  tool_mask: np.ndarray | None = None  # [B, N] bool: tokens a tool wrote (context: no loss, KL or entropy)
  tool_calls: np.ndarray | None = None   # [B] tool calls answered
  constrained: np.ndarray | None = None  # [B] bool: rows the false-certain constraint applies to

  def to_buffer(self) -> dict[str, np.ndarray]:
    """Flat host arrays for a checkpoint."""
    out = {f"prompt/{k}": np.asarray(v) for k, v in dataclasses.asdict(self.prompts).items() if v is not None}
    for field in dataclasses.fields(self):
      value = getattr(self, field.name)
      if field.name == "components":
        out.update({f"component/{k}": v for k, v in value.items()})
      elif field.name != "prompts" and value is not None:
        out[field.name] = np.asarray(value)
    return out

  @classmethod
  def from_buffer(cls, buffer: dict[str, np.ndarray]) -> "Rollout":
    prompt = {k.split("/", 1)[1]: v for k, v in buffer.items() if k.startswith("prompt/")}
    prompt["padding_images"] = int(prompt.get("padding_images", 0))
    components = {k.split("/", 1)[1]: v for k, v in buffer.items() if k.startswith("component/")}
    rest = {k: v for k, v in buffer.items() if "/" not in k}
    return cls(prompts=PromptBatch(**prompt), components=components, **rest)


@dataclasses.dataclass
class _Round:
  examples: list[Example]
  prompts: PromptBatch
  outputs: dict[str, np.ndarray]       # responses, lengths, done, policy_logp, behaviour_logp [P * G, ...]
  scored: Rewards
  shaped: np.ndarray                   # [P * G] rewards after overlong shaping
  trained: np.ndarray                  # [P * G] bool

  def component(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, rows it applies to) of a reward component; zeros on no rows when this round lacks it."""
    n = len(self.shaped)
    if name not in self.scored.components:
      return np.zeros(n, np.float32), np.zeros(n, bool)
    values = np.asarray(self.scored.components[name], np.float32)
    return values, np.asarray(self.scored.applicable.get(name, np.ones(n, bool)), bool)


def overlong_shaping(lengths: np.ndarray, done: np.ndarray, settings: RolloutSettings
                     ) -> tuple[np.ndarray, np.ndarray]:
  """(reward change [B], trained [B]) for responses cut at max_new_tokens (DAPO), in tokens.

  mask: rows that did not finish are left out of the loss. soft: a linear penalty from 0 at
  max_new_tokens - overlong_buffer tokens to -overlong_penalty at max_new_tokens, and -overlong_penalty for a
  row that did not finish.
  """
  change, trained = np.zeros(len(lengths), np.float32), np.ones(len(lengths), bool)
  if settings.overlong == "mask":
    trained = np.asarray(done, bool).copy()
  elif settings.overlong == "soft":
    start = settings.max_new_tokens - settings.overlong_buffer
    ramp = np.clip((lengths - start) / settings.overlong_buffer, 0, 1)
    change = -settings.overlong_penalty * np.where(done, ramp, 1.0).astype(np.float32)
  return change, trained


def _generate(sampler: Sampler, params, part: PromptBatch, rng, sampling: SamplingSettings, tokenizer,
              settings: RolloutSettings, tools: ToolUse | None, first_row: int,
              documents: list) -> dict[str, np.ndarray]:
  """One chunk of prompts' G samples each, as host arrays (with tools: their results interleaved, each prompt's
  calls searching its own `documents` where it brings some)."""
  g = settings.samples_per_prompt
  if tools is not None:
    out = generate_with_tools(sampler, params, part.arrays(), rng, sampling, tools, tokenizer, num_samples=g,
                              first_row=first_row, documents=documents)
    return {"responses": out.tokens, "lengths": out.lengths, "done": out.done, "policy_logp": out.logprobs,
            "behaviour_logp": out.behaviour_logprobs, "tool_mask": out.tool_mask, "tool_calls": out.calls}
  out = sampler.generate(params, part.arrays(), rng, sampling, num_samples=g, first_row=first_row,
                         compact=settings.compaction_levels > 0)
  return {name: distributed.host_array(value) for name, value in (
      ("responses", out.tokens), ("lengths", out.lengths), ("done", out.done), ("policy_logp", out.logprobs),
      ("behaviour_logp", out.behaviour_logprobs))}


def sample_round(examples: Sequence[Example], params, rng: jax.Array, *, sampler: Sampler, processor: Processor,
                 reward_fn: RewardFunction, settings: RolloutSettings, sampling: SamplingSettings,
                 tools: ToolUse | None = None, constraint: ConstraintSettings | None = None) -> _Round:
  """Samples G responses per prompt (pausing for `tools` when given) and scores them (with the `constraint`'s
  confidence and false-certain components when given).

  Prompts are generated `generation_prompts` at a time (the last chunk padded with repeats, one compiled shape);
  every prompt samples with its own key, so the chunking does not change the samples. With `compaction_levels`,
  rows that finish early stop costing (the sampler compacts the live rows).
  """
  prompts = PromptBatch.of(examples, processor, settings.max_prompt_length, settings.bucket_images)
  documents = [example_documents(e) for e in examples] if tools is not None else [None] * len(examples)
  chunk = min(settings.generation_prompts or len(examples), len(examples))
  parts = []
  for start in range(0, len(examples), chunk):
    rows = list(range(start, min(start + chunk, len(examples))))
    part = prompts if chunk == len(examples) else PromptBatch.of(
        [examples[i] for i in rows + rows[:1] * (chunk - len(rows))], processor, settings.max_prompt_length,
        settings.bucket_images, width=prompts.input_ids.shape[1])
    out = _generate(sampler, params, part, rng, sampling, processor.tokenizer, settings, tools, start,
                    [documents[i] for i in rows + rows[:1] * (chunk - len(rows))])
    kept = len(rows) * settings.samples_per_prompt
    parts.append({name: value[:kept] for name, value in out.items()})
  outputs = {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
  texts = decode_rows(processor.tokenizer, outputs["responses"], outputs["lengths"], settings.stop_strings)
  rows = [e for e in examples for _ in range(settings.samples_per_prompt)]
  scored = reward_fn(rows, texts, outputs["lengths"]).check(len(texts))
  if constraint is not None:
    scored, outputs["constrained"] = with_false_certain(rows, texts, scored, constraint)
  change, trained = overlong_shaping(outputs["lengths"], outputs["done"], settings)
  return _Round(list(examples), prompts, outputs, scored, np.asarray(scored.total, np.float32) + change, trained)


def equal_groups(rewards: np.ndarray, group: int) -> np.ndarray:
  """[P] whether each group's rewards are all equal (no preference between its samples)."""
  r = rewards.reshape(-1, group)
  return r.max(axis=1) == r.min(axis=1)


def assemble(rounds: Sequence[_Round], settings: RolloutSettings, processor: Processor) -> tuple[Rollout, dict]:
  """The rollout's P groups: groups with a preference first, in sampling order, then equal ones if needed."""
  g, p = settings.samples_per_prompt, settings.prompts_per_rollout
  informative = [(r, i) for r, rnd in enumerate(rounds) for i in np.nonzero(~equal_groups(rnd.shaped, g))[0]]
  equal = [(r, i) for r, rnd in enumerate(rounds) for i in np.nonzero(equal_groups(rnd.shaped, g))[0]]
  chosen = (informative + equal)[:p] if settings.dynamic_sampling else [(0, i) for i in range(p)]
  chosen.sort()
  if len(rounds) == 1 and [i for _, i in chosen] == list(range(p)):
    prompts = rounds[0].prompts
  else:   # groups from several rounds: lay their prompts out afresh (same tokens, one bucket)
    prompts = PromptBatch.of([rounds[r].examples[i] for r, i in chosen], processor, settings.max_prompt_length,
                             settings.bucket_images)
  offsets = np.cumsum([0] + [len(rnd.shaped) for rnd in rounds])   # first row of each round, rounds joined
  rows = np.concatenate([offsets[r] + np.arange(i * g, (i + 1) * g) for r, i in chosen])
  joined = lambda get: np.concatenate([np.asarray(get(rnd)) for rnd in rounds])[rows]
  names = sorted({k for rnd in rounds for k in rnd.scored.components})
  scored = Rewards(total=joined(lambda rnd: rnd.scored.total),
                   components={k: joined(lambda rnd, k=k: rnd.component(k)[0]) for k in names},
                   applicable={k: joined(lambda rnd, k=k: rnd.component(k)[1]) for k in names})
  rollout = Rollout(prompts=prompts, **{k: joined(lambda rnd, k=k: rnd.outputs[k]) for k in rounds[0].outputs},
                    rewards=joined(lambda rnd: rnd.shaped), trained=joined(lambda rnd: rnd.trained),
                    components=scored.components)
  metrics = {**{f"reward/{k}": v for k, v in scored.means().items()},
             "groups/all_equal_fraction": float(equal_groups(rounds[0].shaped, g).mean()),
             "groups/all_equal_in_batch": float(equal_groups(rollout.rewards, g).mean()),
             "groups/sampling_rounds": float(len(rounds)),
             "overlong/untrained_fraction": float(1 - rollout.trained.mean()),
             "response_length/mean": float(rollout.lengths.mean()), "response_length/max": float(rollout.lengths.max()),
             "stopped_fraction": float(rollout.done.mean())}
  if settings.overlong == "soft":
    metrics["reward/overlong_penalty"] = float(np.mean(rollout.rewards - scored.total))
  if rollout.tool_calls is not None:
    metrics["tools/calls_per_answer"] = float(rollout.tool_calls.mean())
    metrics["tools/read_tokens_per_answer"] = float(rollout.tool_mask.sum(axis=1).mean())
  return rollout, metrics


def training_rows(rollout: Rollout, model_config, loss: losses.LossSettings, vision_shards: ShardAxes | None = None
                  ) -> tuple[SequenceBatch, VisionInputs]:
  """Host-side training rows and vision inputs of a rollout (its advantages must be set); the images are dealt to
  `vision_shards`."""
  advantages = rollout.advantages if rollout.advantages is not None else np.zeros(len(rollout.lengths), np.float32)
  trained = np.broadcast_to(rollout.trained[:, None], rollout.responses.shape)
  if rollout.tool_mask is not None:   # what the tools wrote is context, not the policy's actions
    trained = trained & ~rollout.tool_mask
  batch, vision = prompt_sequences(rollout.prompts, model_config, rollout.responses, rollout.lengths,
                                   rollout.policy_logp, advantages, trained, vision_shards)
  old = rollout.old_logp if rollout.old_logp is not None else batch.old_logp
  weight = np.asarray(losses.behaviour_weights(old, rollout.behaviour_logp, loss), np.float32)
  batch = batch.replace(old_logp=old, behaviour_weight=weight,
                        ref_logp=rollout.ref_logp if rollout.ref_logp is not None else batch.ref_logp)
  return batch, vision


def behaviour_ratio_stats(rollout: Rollout) -> dict[str, float]:
  """The raw importance ratio pi_old / mu over the response tokens, before truncation."""
  old = rollout.old_logp if rollout.old_logp is not None else rollout.policy_logp
  valid = np.arange(rollout.responses.shape[1])[None] < rollout.lengths[:, None]
  if rollout.tool_mask is not None:   # the policy's tokens only
    valid &= ~rollout.tool_mask
  ratio = np.exp((old - rollout.behaviour_logp)[valid].astype(np.float64))
  if not ratio.size:
    return {}
  return {"behaviour_ratio/min": float(ratio.min()), "behaviour_ratio/mean": float(ratio.mean()),
          "behaviour_ratio/max": float(ratio.max())}


def minibatch_order(seed: int, rollout_index: int, settings: RolloutSettings) -> list[np.ndarray]:
  """Row indices of each minibatch of a rollout, reshuffled every epoch (seeded, so resumption is exact)."""
  rng = np.random.default_rng([seed, rollout_index, 1])
  flat = np.concatenate([rng.permutation(settings.rows) for _ in range(settings.epochs)])
  return [flat[i:i + settings.minibatch_size] for i in range(0, len(flat), settings.minibatch_size)]


def summarize_advantages(advantages: np.ndarray) -> dict[str, float]:
  return {"advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()),
          "advantage/abs_mean": float(np.abs(advantages).mean()),
          "advantage/zero_fraction": float(np.mean(advantages == 0))}
