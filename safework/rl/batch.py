"""Rollouts as training rows: prompt + response sequences, their masks, log-probs and vision inputs.

Host-side (numpy) assembly: each prompt's G responses become G rows `[prompt bucket | response]`. Positions of
the response continue from the prompt's last M-RoPE position, exactly as the sampler assigned them. Vision
features are computed once per rollout for the unique prompts; rows find their placeholders' features through
`feature_index`, so the G copies of a prompt never rerun the vision tower.

Axis legend: P prompts, G samples per prompt, B = P * G rows, Lp prompt bucket, N response length, L = Lp + N.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safework.models.inputs import PreparedInputs, prepare_inputs
from safework.models.protocol import CausalLM
from safework.models.qwen2_5_vl import encode_vision
from safework.models.vision_layout import VisionLayout
from safework.models.vision_shards import ShardAxes, ShardedLayout
from safework.sampling.prompts import PromptBatch


@flax.struct.dataclass
class SequenceBatch:
  """Prompt + response rows for the loss. Vision features are looked up by `feature_index` (-1: none).

  input_ids, attention_mask, feature_index: [B, L]; positions: [B, 3, L] (batch first, so every field splits
  into micro-batches alike); over the response part [B, N]: loss_mask (tokens trained on), old_logp (the
  policy that sampled, the ratio's denominator), ref_logp (the KL reference), sampler_logp (the sampler's own
  log-probs of the policy, to measure sampler/trainer mismatch) and behaviour_weight (the truncated importance
  weight pi_old / mu of the distribution mu the sampler really drew from: temperature, top-k, top-p);
  advantages: [B].
  """
  input_ids: jax.Array
  attention_mask: jax.Array
  positions: jax.Array
  feature_index: jax.Array
  loss_mask: jax.Array
  advantages: jax.Array
  old_logp: jax.Array
  ref_logp: jax.Array
  sampler_logp: jax.Array
  behaviour_weight: jax.Array

  @property
  def response_length(self) -> int:
    return self.loss_mask.shape[1]

  def rows(self, index: np.ndarray) -> "SequenceBatch":
    return jax.tree.map(lambda x: x[index], self)

  def longest_response(self) -> jax.Array:
    """The most response tokens of any row (responses are left-aligned in their columns)."""
    return jnp.max(jnp.sum(self.attention_mask[:, -self.response_length:], axis=1))

  def narrowed(self, width: int) -> "SequenceBatch":
    """The rows with only their first `width` response columns (every response must fit)."""
    keep = self.input_ids.shape[1] - self.response_length + width
    full, response = (lambda x: x[..., :keep]), (lambda x: x[:, :width])
    return self.replace(input_ids=full(self.input_ids), attention_mask=full(self.attention_mask),
                        positions=full(self.positions), feature_index=full(self.feature_index),
                        loss_mask=response(self.loss_mask), old_logp=response(self.old_logp),
                        ref_logp=response(self.ref_logp), sampler_logp=response(self.sampler_logp),
                        behaviour_weight=response(self.behaviour_weight))


@flax.struct.dataclass
class VisionContext:
  """What every micro-batch of a step shares: the vision inputs, and their features when the tower is frozen
  (computed once outside the gradient; None when the tower trains or there is no vision input)."""
  vision: "VisionInputs"
  features: jax.Array | None = None


@flax.struct.dataclass
class VisionInputs:
  """The unique prompts' pixels and layouts; their features, concatenated (images, then videos), are what
  `SequenceBatch.feature_index` points into."""
  pixel_values: Any = None
  image_layout: VisionLayout | ShardedLayout | None = None
  pixel_values_videos: Any = None
  video_layout: VisionLayout | ShardedLayout | None = None

  @property
  def empty(self) -> bool:
    return self.pixel_values is None and self.pixel_values_videos is None


def micro_batch_layout(rows: np.ndarray, lengths: np.ndarray, micro_batches: int) -> np.ndarray:
  """`rows` reordered so that each micro-batch (rows j, j + m, ...: `training.step.split_micro_batches`) holds rows
  of similar response length, the longest first: a micro-batch then computes over its own longest response
  (`response_bucket`), not the minibatch's. The loss is a sum over rows, so the order changes nothing else."""
  by_length = rows[np.argsort(-lengths[rows], kind="stable")]
  return by_length.reshape(micro_batches, -1).T.reshape(-1)


def vision_features(model: CausalLM, params, vision: VisionInputs) -> jax.Array | None:
  """Features [M, D] of all images then all videos of the rollout's prompts (None without vision)."""
  parts = []
  if vision.pixel_values is not None:
    parts.append(encode_vision(model, params, vision.pixel_values, vision.image_layout))
  if vision.pixel_values_videos is not None:
    parts.append(encode_vision(model, params, vision.pixel_values_videos, vision.video_layout))
  return jnp.concatenate(parts) if parts else None


def prompt_feature_index(input_ids: np.ndarray, placeholder_ids: tuple[int, ...]) -> np.ndarray:
  """[P, Lp]: for each placeholder token, its row among the features of each kind in turn (all image features,
  then all video features); -1 elsewhere."""
  index = np.full(input_ids.shape, -1, np.int32)
  start = 0
  for token in placeholder_ids:
    is_token = input_ids == token
    index[is_token] = start + np.arange(is_token.sum())
    start += int(is_token.sum())
  return index


def build_sequences(prompt_ids: np.ndarray, prompt_mask: np.ndarray, prepared: PreparedInputs,
                    feature_index: np.ndarray, responses: np.ndarray, response_lengths: np.ndarray,
                    sampler_logp: np.ndarray, advantages: np.ndarray, loss_mask: np.ndarray | None = None
                    ) -> SequenceBatch:
  """Rows [B = P * G] of prompt + response; responses [B, N] are ordered prompt-major (row = p * G + g)."""
  groups = responses.shape[0] // prompt_ids.shape[0]
  repeat = lambda x: np.repeat(x, groups, axis=0)
  n = responses.shape[1]
  response_valid = np.arange(n)[None] < response_lengths[:, None]
  next_position = prepared.positions.max(axis=(0, 2)) + 1                          # [P]
  response_positions = repeat(next_position)[:, None] + np.arange(n)[None]        # [B, N]
  positions = np.concatenate([repeat(prepared.positions.transpose(1, 0, 2)),
                              np.broadcast_to(response_positions[:, None], (len(responses), 3, n))], axis=2)
  loss_mask = response_valid if loss_mask is None else loss_mask & response_valid
  zeros = np.zeros(responses.shape, np.float32)
  return SequenceBatch(
      input_ids=np.concatenate([repeat(prompt_ids), responses], axis=1).astype(np.int32),
      attention_mask=np.concatenate([repeat(prompt_mask), response_valid], axis=1).astype(bool),
      positions=positions.astype(np.int32),
      feature_index=np.concatenate([repeat(feature_index), np.full(responses.shape, -1, np.int32)], axis=1),
      loss_mask=loss_mask.astype(np.float32), advantages=advantages.astype(np.float32),
      old_logp=sampler_logp.astype(np.float32), ref_logp=zeros, sampler_logp=sampler_logp.astype(np.float32),
      behaviour_weight=np.ones(responses.shape, np.float32))


def prompt_sequences(prompts: PromptBatch, model_config, responses: np.ndarray, response_lengths: np.ndarray,
                     sampler_logp: np.ndarray, advantages: np.ndarray, loss_mask: np.ndarray | None = None,
                     vision_shards: ShardAxes | None = None) -> tuple[SequenceBatch, VisionInputs]:
  """`build_sequences` for a prompt batch, with its host-side positions and vision layout computed here (dealt to
  `vision_shards`, so the tower runs data-parallel)."""
  p = prompts
  prepared = prepare_inputs(model_config, p.input_ids, p.attention_mask, p.image_grid_thw, p.video_grid_thw,
                            p.second_per_grid_ts, p.pixel_values, p.pixel_values_videos, p.padding_images,
                            vision_shards)
  index = prompt_feature_index(p.input_ids, model_config.placeholder_token_ids)
  batch = build_sequences(p.input_ids, p.attention_mask, prepared, index, responses, response_lengths, sampler_logp,
                          advantages, loss_mask)
  vision = VisionInputs(pixel_values=p.pixel_values, image_layout=prepared.image_layout,
                        pixel_values_videos=p.pixel_values_videos, video_layout=prepared.video_layout)
  return batch, vision
