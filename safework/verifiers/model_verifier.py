"""A model verifier: a Qwen2.5-VL judge backbone plus a head, scoring a whole batch in one jitted forward.

Judge prompts are rendered with the judge's chat template, left-padded to a bucket length, and run in fixed-size
chunks (the last one padded with repeats), so a handful of shapes is ever compiled. On a mesh, rows are sharded
over the batch axes and the backbone over its parameter axes, colocated with the policy.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from safework import sharding
from safework.distributed import host_array
from safework.data.example import Example
from safework.models.inputs import PreparedInputs, prepare_inputs
from safework.models.protocol import CausalLM
from safework.models.qwen2_5_vl import encode_vision
from safework.models.vision_shards import shard_axes
from safework.processing import Processor
from safework.sampling.shapes import bucket_length, pad_left
from safework.verifiers import heads
from safework.verifiers.judges import JudgeSpec
from safework.verifiers.rules import final_answer


def verdict_token_ids(tokenizer, verdicts: Sequence[str]) -> np.ndarray:
  """The first token of each verdict; verdicts must differ in it to be told apart in one forward pass."""
  ids = []
  for verdict in verdicts:
    tokens = tokenizer.encode(verdict, add_special_tokens=False)
    if not tokens:
      raise ValueError(f"verdict {verdict!r} tokenizes to nothing")
    ids.append(tokens[0])
  if len(set(ids)) != len(ids):
    raise ValueError(f"verdicts {list(verdicts)} share first tokens {ids}; choose verdicts that start differently")
  return np.asarray(ids, np.int32)


IMAGE_BUCKETS = 4   # sizes per octave a judge batch's image patches are padded to (`models.inputs.pad_images`)


@flax.struct.dataclass
class JudgePixels:
  """The judge prompts' image and video patches (None where the batch has none)."""
  images: jax.Array | None = None
  videos: jax.Array | None = None


def hidden_at_last(model: CausalLM, params, input_ids, attention_mask, pixels: JudgePixels, prepared) -> jax.Array:
  """Final hidden state at the last (verdict) position of left-padded prompts: [B, D]."""
  encode = lambda values, layout: None if values is None else encode_vision(model, params, values, layout)
  apply = functools.partial(model.apply, {"params": params})
  embeds = apply(input_ids, encode(pixels.images, prepared.image_layout), encode(pixels.videos, prepared.video_layout),
                 method="embed")
  hidden, _ = apply(embeds, prepared.positions, attention_mask, method="decode")
  return hidden[:, -1]


class ModelVerifier:
  """Scores (question, images, final answer[, gold]) with a judge model; callable as a reward scorer."""

  def __init__(self, model: CausalLM, params, processor: Processor, spec: JudgeSpec, head: str = "verdict",
               head_params: dict | None = None, mesh: jax.sharding.Mesh | None = None,
               rules: sharding.Rules = sharding.DEFAULT_RULES, batch_size: int = 16, max_length: int = 2048,
               bucket_images: int = IMAGE_BUCKETS):
    if head not in heads.HEAD_KINDS:
      raise ValueError(f"head {head!r} is not one of {heads.HEAD_KINDS}")
    self.model, self.params, self.processor, self.spec = model, params, processor, spec.validate()
    self.head, self.mesh, self.rules = head, mesh, rules
    self.batch_size, self.max_length, self.bucket_images = batch_size, max_length, bucket_images
    self.verdict_ids = verdict_token_ids(processor.tokenizer, spec.verdicts)
    if head == "classifier" and head_params is None:
      output = model.apply({"params": params}, method="output_embedding")
      head_params = heads.classifier_from_lm_head(jax.device_get(output), self.verdict_ids)
    self.head_params = head_params
    self._logprobs = jax.jit(functools.partial(self.logprobs_fn, model, head, self.verdict_ids))

  @staticmethod
  def logprobs_fn(model, head, verdict_ids, params, head_params, input_ids, attention_mask, pixels: JudgePixels,
                  prepared):
    """Verdict log-probs [B, K]: raw next-token log-probs (verdict head) or log-softmax over K (classifier)."""
    hidden = hidden_at_last(model, params, input_ids, attention_mask, pixels, prepared)
    if head == "verdict":
      output = model.apply({"params": params}, method="output_embedding")
      return heads.verdict_logprobs(hidden, output, jnp.asarray(verdict_ids))
    return jax.nn.log_softmax(heads.classifier_logits(hidden, head_params), axis=-1)

  def render(self, examples: Sequence[Example], responses: Sequence[str]) -> tuple[list[str], list, list]:
    """The judge prompts (the question's images and videos, then the judge's text), and their images, videos."""
    texts, images, videos = [], [], []
    for example, response in zip(examples, responses):
      content = ([{"type": "image"}] * len(example.images) + [{"type": "video"}] * len(example.videos) +
                 [{"type": "text", "text": self.spec.prompt(example.question, final_answer(response), example.answer,
                                                             example.label)}])
      texts.append(self.processor.render([{"role": "user", "content": content}]))
      images.extend(example.images)
      videos.extend(example.videos)
    return texts, images, videos

  def batch_arrays(self, examples: Sequence[Example], responses: Sequence[str]) -> dict[str, np.ndarray]:
    """Processor arrays of the judge prompts, left-padded to a bucket length."""
    texts, images, videos = self.render(examples, responses)
    arrays = self.processor(texts, images=images, videos=videos, max_length=self.max_length,
                            bucket_images=self.bucket_images)
    arrays["input_ids"], arrays["attention_mask"] = pad_left(
        arrays["input_ids"], arrays["attention_mask"], bucket_length(arrays["input_ids"].shape[1]),
        self.processor.tokenizer.pad_token_id)
    return arrays

  def prepare(self, arrays: dict[str, np.ndarray]) -> PreparedInputs:
    return prepare_inputs(self.model.config, arrays["input_ids"], arrays["attention_mask"],
                          arrays.get("image_grid_thw"), arrays.get("video_grid_thw"), arrays.get("second_per_grid_ts"),
                          arrays.get("pixel_values"), arrays.get("pixel_values_videos"),
                          int(arrays.get("padding_images", 0)), shard_axes(self.mesh, self.rules))

  @staticmethod
  def pixels(arrays: dict[str, np.ndarray]) -> JudgePixels:
    return JudgePixels(arrays.get("pixel_values"), arrays.get("pixel_values_videos"))

  def _run(self, params, head_params, arrays: dict[str, np.ndarray]) -> jax.Array:
    prepared = self.prepare(arrays)
    ids, mask = arrays["input_ids"], arrays["attention_mask"]
    if self.mesh is not None:
      place = lambda x: jax.device_put(x, sharding.batch_sharding(self.mesh, self.rules, x.ndim, x.shape[0]))
      ids, mask = place(ids), place(mask)
    return self._logprobs(params, head_params, ids, mask, self.pixels(arrays), prepared)

  def verdict_logprobs(self, examples: Sequence[Example], responses: Sequence[str]) -> np.ndarray:
    """[n, K] verdict log-probs, computed in chunks of `batch_size` rows (the last padded with repeats)."""
    out = []
    for start in range(0, len(examples), self.batch_size):
      chunk = list(range(start, min(start + self.batch_size, len(examples))))
      padded = chunk + [chunk[0]] * (self.batch_size - len(chunk))
      arrays = self.batch_arrays([examples[i] for i in padded], [responses[i] for i in padded])
      out.append(host_array(self._run(self.params, self.head_params, arrays))[:len(chunk)])
    return np.concatenate(out) if out else np.zeros((0, len(self.verdict_ids)), np.float32)

  def __call__(self, examples: Sequence[Example], responses: Sequence[str], lengths=None) -> np.ndarray:
    logprobs = self.verdict_logprobs(examples, responses)
    return heads.scores_from_logprobs(logprobs, np.asarray(self.spec.scores, np.float32), self.spec.scoring)
