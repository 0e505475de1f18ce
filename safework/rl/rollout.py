"""One rollout: prompts -> G samples each on device -> rewards -> advantages -> training rows.

The result is a flat dict of host arrays (`Rollout`), which is also what a checkpoint stores when a run stops
between the minibatches of a rollout, so resuming trains on exactly the same data.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safework.data.example import Example
from safework.models.inputs import prepare_inputs
from safework.processing import Processor
from safework.rewards.base import RewardFunction
from safework.rl import advantages as adv
from safework.rl.batch import SequenceBatch, VisionInputs, build_sequences, prompt_feature_index
from safework.sampling import Sampler, SamplingSettings, bucket_length
from safework.sampling.text import decode_rows, stop_sequences

Rollout = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class RolloutSettings:
  """Defaults are the paper's: 128 prompts x 8 samples at temperature 1, 128 samples per optimizer step."""
  prompts_per_rollout: int = 128
  samples_per_prompt: int = 8
  max_new_tokens: int = 1024
  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int | None = None
  max_prompt_length: int = 2048
  stop_strings: tuple[str, ...] = ()
  advantage: str = "group_zscore"
  length_lambda: float = 0.5     # length_conditional only
  length_alpha: float = 1.0
  length_beta: float = 0.0
  length_scale: float | None = None   # the divisor L_max of the length-conditional advantage (None: max_new_tokens)
  old_logprobs: str = "sampler"  # "sampler": the sampler's own; "recompute": a forward pass before updating
  minibatch_size: int = 128
  epochs: int = 1
  image_multiple: int = 8        # blank images pad a rollout's image count to a multiple of this (fewer compiles)

  @property
  def rows(self) -> int:
    return self.prompts_per_rollout * self.samples_per_prompt

  @property
  def steps(self) -> int:
    return self.epochs * self.rows // self.minibatch_size

  def validate(self) -> "RolloutSettings":
    if self.rows % self.minibatch_size:
      raise ValueError(f"{self.prompts_per_rollout} prompts x {self.samples_per_prompt} samples = {self.rows} rows "
                       f"do not split into minibatches of {self.minibatch_size}")
    if self.samples_per_prompt < 2 and self.advantage != "group_mean_centered":
      raise ValueError("group advantages need at least 2 samples per prompt")
    if self.old_logprobs not in ("sampler", "recompute"):
      raise ValueError(f"old_logprobs={self.old_logprobs!r}: choose 'sampler' or 'recompute'")
    if self.advantage not in adv.ESTIMATORS:
      raise ValueError(f"unknown advantage estimator {self.advantage!r}; choose one of {adv.ESTIMATORS}")
    return self

  def sampling(self, tokenizer, eos_ids: Sequence[int]) -> SamplingSettings:
    return SamplingSettings(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                            top_k=self.top_k, eos_ids=tuple(sorted(set(eos_ids))),
                            stop_sequences=stop_sequences(tokenizer, self.stop_strings),
                            pad_id=tokenizer.pad_token_id, vocab_limit=len(tokenizer)).validate()


def advantages_of(settings: RolloutSettings, rewards: np.ndarray, lengths: np.ndarray) -> np.ndarray:
  shape = (settings.prompts_per_rollout, settings.samples_per_prompt)
  kwargs = {}
  if settings.advantage == "length_conditional":
    kwargs = dict(lam=settings.length_lambda, alpha=settings.length_alpha, beta=settings.length_beta)
  scale = settings.length_scale or settings.max_new_tokens
  values = adv.compute_advantages(settings.advantage, jnp.asarray(rewards.reshape(shape)),
                                  jnp.asarray(lengths.reshape(shape)), scale, **kwargs)
  return np.asarray(values).reshape(-1)


def collect(examples: Sequence[Example], params, rng: jax.Array, *, sampler: Sampler, processor: Processor,
            reward_fn: RewardFunction, settings: RolloutSettings, sampling: SamplingSettings
            ) -> tuple[Rollout, list[str], dict[str, float]]:
  """Samples, scores and lays out one rollout. Returns the host arrays, the response texts and metrics."""
  texts = [processor.render(e.messages()) for e in examples]
  images = [im for e in examples for im in e.images]
  videos = [v for e in examples for v in e.videos]
  prompts = processor(texts, images=images, videos=videos, max_length=settings.max_prompt_length,
                      image_multiple=settings.image_multiple)
  # Pad once to the sampler's bucket so training rows and sampling see the same prompt layout.
  width = bucket_length(prompts["input_ids"].shape[1])
  pad = width - prompts["input_ids"].shape[1]
  prompts["input_ids"] = np.pad(prompts["input_ids"], ((0, 0), (pad, 0)), constant_values=processor.tokenizer.pad_token_id)
  prompts["attention_mask"] = np.pad(prompts["attention_mask"], ((0, 0), (pad, 0)))

  start = time.perf_counter()
  out = sampler.generate(params, prompts, rng, sampling, num_samples=settings.samples_per_prompt)
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  generation_s = time.perf_counter() - start
  responses = decode_rows(processor.tokenizer, out, settings.stop_strings)
  group = settings.samples_per_prompt
  scored = reward_fn([e for e in examples for _ in range(group)], responses, lengths).check(len(responses))

  rollout = {k: np.asarray(v) for k, v in prompts.items()}
  rollout.update(responses=tokens, lengths=lengths, sampler_logp=np.asarray(out.logprobs),
                 rewards=np.asarray(scored.total, np.float32), done=np.asarray(out.done),
                 **{f"reward_{k}": np.asarray(v, np.float32) for k, v in scored.components.items()})
  metrics = {**{f"reward/{k}": v for k, v in scored.means().items()}, "generation_s": generation_s,
             "generated_tokens_per_s": float(lengths.sum()) / max(generation_s, 1e-9),
             "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
             "stopped_fraction": float(np.asarray(out.done).mean())}
  return rollout, responses, metrics


def training_rows(rollout: Rollout, model_config) -> tuple[SequenceBatch, VisionInputs]:
  """Host-side training rows and vision inputs of a rollout (advantages must be in it)."""
  prepared = prepare_inputs(model_config, rollout["input_ids"], rollout["attention_mask"],
                            rollout.get("image_grid_thw"), rollout.get("video_grid_thw"),
                            rollout.get("second_per_grid_ts"), rollout.get("pixel_values"),
                            rollout.get("pixel_values_videos"), int(rollout.get("padding_images", 0)))
  index = prompt_feature_index(rollout["input_ids"], model_config.image_token_id, model_config.video_token_id)
  batch = build_sequences(rollout["input_ids"], rollout["attention_mask"], prepared, index, rollout["responses"],
                          rollout["lengths"], rollout["sampler_logp"], rollout["advantages"])
  batch = batch.replace(old_logp=rollout.get("old_logp", batch.old_logp), ref_logp=rollout.get("ref_logp", batch.ref_logp))
  vision = VisionInputs(pixel_values=rollout.get("pixel_values"), image_layout=prepared.image_layout,
                        pixel_values_videos=rollout.get("pixel_values_videos"), video_layout=prepared.video_layout)
  return batch, vision


def minibatch_order(seed: int, rollout_index: int, settings: RolloutSettings) -> list[np.ndarray]:
  """Row indices of each minibatch of a rollout, reshuffled every epoch (seeded, so resumption is exact)."""
  rng = np.random.default_rng([seed, rollout_index, 1])
  orders = [rng.permutation(settings.rows) for _ in range(settings.epochs)]
  flat = np.concatenate(orders)
  return [flat[i:i + settings.minibatch_size] for i in range(0, len(flat), settings.minibatch_size)]


def summarize_advantages(advantages: np.ndarray) -> dict[str, float]:
  return {"advantage/mean": float(advantages.mean()), "advantage/std": float(advantages.std()),
          "advantage/abs_mean": float(np.abs(advantages).mean()),
          "advantage/zero_fraction": float(np.mean(advantages == 0))}

