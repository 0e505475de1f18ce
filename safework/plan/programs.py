"""The programs a stage runs, built from abstract shapes only (no weights, no data), by the code the run uses.

Each `Program` is one of the run's jitted functions (the sampler's prefill and decode loop, the rollout's vision
and log-prob passes, the trainer's step, each verifier's scoring pass), made by the same constructors, with
arguments as ShapeDtypeStructs carrying the shardings the run gives them: compiling it for a slice tells what the
run needs there. Prompts are the
worst case the stage allows: `max_prompt_length` tokens with one image of `max_pixels` each.

Buffers that stay in HBM while a program runs without being its arguments (the optimizer state while sampling, the
reference policy, colocated judges) are the program's `resident` bytes, counted from their shardings.

Axis legend: P prompts, G samples per prompt, B rows, Lp prompt bucket, N new tokens, L = Lp + N, M vision
features, D hidden.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from safework import sharding
from safework.models import CausalLM
from safework.models.checkpoint import abstract_params
from safework.models.config import ModelConfig
from safework.models.internvl_config import InternVLConfig
from safework.models.inputs import filler_grid, prepare_inputs
from safework.models.vision_layout import num_patches
from safework.models.vision_shards import ShardAxes, shard_axes
from safework.plan import costs
from safework.rl.batch import SequenceBatch, VisionContext, VisionInputs, vision_features
from safework.rl.logprobs import bucketed_widths
from safework.rl.objectives import CrossEntropyObjective, PolicyGradientObjective, make_logprob_fn
from safework.rl.optim import make_optimizer
from safework.sampling import Sampler, SamplingSettings
from safework.sampling.shapes import bucket_length, filled_floor
from safework.tools.generate import cache_reserve
from safework.training.state import abstract_state
from safework.training.step import make_train_step
from safework.verifiers.model_verifier import IMAGE_BUCKETS, JudgePixels, ModelVerifier

DUMMY_TOKEN = 100   # any id that is not a placeholder: synthetic prompts are shapes, not text


@dataclasses.dataclass(frozen=True)
class Program:
  name: str
  fn: Callable                       # the jitted function the run calls
  args: tuple                        # abstract arguments (ShapeDtypeStructs with shardings)
  arg_names: tuple[str, ...]
  knob: str                          # the setting that sizes the program, to turn when it does not fit
  work: costs.Work                   # FLOPs and bytes, counted from the shapes (safework.plan.costs)
  static: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  resident: Mapping[str, int] = dataclasses.field(default_factory=dict)   # name -> bytes per device

  def lower(self, mesh: Mesh):
    with jax.set_mesh(mesh):
      return self.fn.lower(*self.args, **self.static)


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard, for uneven splits)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += math.prod(shape) * leaf.dtype.itemsize   # (PRNG key dtypes have an itemsize too)
  return total


def on_mesh(tree: Any, sharding_of: Callable[[Any], NamedSharding]) -> Any:
  """ShapeDtypeStructs of a tree of host arrays (or structs), each with `sharding_of(leaf)`."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding_of(x)), tree)


def sharded_params(model: CausalLM, mesh: Mesh, rules: sharding.Rules, dtype=None) -> Any:
  """The model's parameters as sharded ShapeDtypeStructs (in `dtype` when given), as `policy_params` places them."""
  boxed = abstract_params(model)
  shardings = sharding.param_shardings(boxed, mesh, rules)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s),
                      nn.meta.unbox(boxed), shardings)


@dataclasses.dataclass(frozen=True)
class PromptShape:
  rows: int
  length: int          # tokens per prompt, images included
  image_pixels: int    # one image of at most this many pixels per prompt; 0: text only
  image_buckets: int = 0   # the run's bucket_images (sizes per octave its patches are padded to)


TEXT_TOKENS = 16   # the least text a prompt carries beside its image (the chat template's own tokens)


@functools.singledispatch
def image_extent(cfg, pixels: int, prompt_length: int) -> int:
  """The vision tower's input per image of at most `pixels` pixels in a `prompt_length` prompt that keeps
  `TEXT_TOKENS` for text: Qwen2.5-VL's patches, InternVL's tiles."""
  raise TypeError(f"the planner has no image shape for a {type(cfg).__name__}")


@image_extent.register
def _patches(cfg: ModelConfig, pixels: int, prompt_length: int) -> int:
  """Patches of the largest square image (sides a multiple of the merge size)."""
  merge = cfg.vision.spatial_merge_size
  merged_side = min(math.isqrt(pixels) // (cfg.vision.patch_size * merge), math.isqrt(prompt_length - TEXT_TOKENS))
  if merged_side < 1:
    raise ValueError(f"a prompt of {prompt_length} tokens has no room for an image of {pixels} pixels")
  return (merged_side * merge)**2


@image_extent.register
def _tiles(cfg: InternVLConfig, pixels: int, prompt_length: int) -> int:
  """Tiles of the image: as many as the pixels cover (at least one), within the prompt."""
  tiles = min(max(1, pixels // cfg.vision.image_size**2), (prompt_length - TEXT_TOKENS) // cfg.tokens_per_tile)
  if tiles < 1:
    raise ValueError(f"a prompt of {prompt_length} tokens has no room for a tile of {cfg.tokens_per_tile} tokens")
  return tiles


@functools.singledispatch
def _place_images(cfg, arrays: dict[str, np.ndarray], extent: int, buckets: int) -> None:
  raise TypeError(f"the planner has no images for a {type(cfg).__name__}")


@_place_images.register
def _(cfg: ModelConfig, arrays: dict[str, np.ndarray], extent: int, buckets: int) -> None:
  """A square image of `extent` patches opening each prompt (grids, patch rows; a blank filler to the bucket)."""
  rows, merge, side = arrays["input_ids"].shape[0], cfg.vision.spatial_merge_size, math.isqrt(extent)
  arrays["input_ids"][:, :extent // merge**2] = cfg.image_token_id
  grid = np.tile(np.array([[1, side, side]], np.int64), (rows, 1))
  filler = filler_grid(len(grid) * extent, merge, buckets) if buckets else None
  if filler is not None:
    grid, arrays["padding_images"] = np.concatenate([grid, filler]), 1
  arrays["image_grid_thw"] = grid
  arrays["pixel_values"] = np.broadcast_to(np.zeros((), np.float32), (num_patches(grid), cfg.vision.patch_dim))


@_place_images.register
def _(cfg: InternVLConfig, arrays: dict[str, np.ndarray], extent: int, buckets: int) -> None:
  """An image of `extent` tiles opening each prompt."""
  rows, side = arrays["input_ids"].shape[0], cfg.vision.image_size
  arrays["input_ids"][:, :extent * cfg.tokens_per_tile] = cfg.image_token_id
  arrays["pixel_values"] = np.broadcast_to(np.zeros((), np.float32),
                                           (rows * extent, cfg.vision.num_channels, side, side))


def synthetic_prompts(cfg, shape: PromptShape) -> dict[str, np.ndarray]:
  """Processor-like arrays of `shape.rows` full-length prompts, each opening with the largest image the pixel
  budget and the prompt length allow.

  Pixels are a zero-stride view: their shape is what counts, and nothing of that size is allocated.
  """
  ids = np.full((shape.rows, shape.length), DUMMY_TOKEN, np.int32)
  arrays = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
  if shape.image_pixels:
    _place_images(cfg, arrays, image_extent(cfg, shape.image_pixels, shape.length), shape.image_buckets)
  return arrays


def _vision_inputs(cfg: ModelConfig, arrays: dict[str, np.ndarray], shards: ShardAxes | None):
  prepared = prepare_inputs(cfg, arrays["input_ids"], arrays["attention_mask"], arrays.get("image_grid_thw"),
                            pixel_values=arrays.get("pixel_values"), padding_images=arrays.get("padding_images", 0),
                            vision_shards=shards)
  vision = VisionInputs(pixel_values=arrays.get("pixel_values"), image_layout=prepared.image_layout)
  return prepared, vision


def _features_struct(model: CausalLM, arrays: dict[str, np.ndarray], replicated) -> jax.ShapeDtypeStruct | None:
  if "pixel_values" not in arrays:
    return None
  merged = int((arrays["input_ids"] == model.config.image_token_id).sum())
  return jax.ShapeDtypeStruct((merged, model.config.text.hidden_size), model.dtype, sharding=replicated)


def sequence_struct(rows: int, prompt_length: int, response_length: int, batch_sharding) -> SequenceBatch:
  """The abstract training rows of a (mini)batch, sharded over the batch axes as the run places them."""
  length = prompt_length + response_length
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=batch_sharding(len(shape), rows))
  f32 = lambda: s((rows, response_length), jnp.float32)
  return SequenceBatch(input_ids=s((rows, length), jnp.int32), attention_mask=s((rows, length), jnp.bool_),
                       positions=s((rows, 3, length), jnp.int32), feature_index=s((rows, length), jnp.int32),
                       loss_mask=f32(), advantages=s((rows,), jnp.float32), old_logp=f32(), ref_logp=f32(),
                       sampler_logp=f32(), behaviour_weight=f32())


@dataclasses.dataclass(frozen=True)
class JudgeShape:
  """Colocated verifiers that score alike (one program) with one model; `weights` names the copy in HBM (judges
  of one checkpoint share it)."""
  name: str
  weights: str
  model: CausalLM
  head: str
  batch_size: int
  max_length: int


class StagePrograms:
  """Builds the programs of one stage on one mesh."""

  def __init__(self, model: CausalLM, mesh: Mesh, rules: sharding.Rules, max_pixels: int, remat: str):
    self.model, self.mesh, self.rules, self.max_pixels, self.remat = model, mesh, rules, max_pixels, remat
    self.replicated = sharding.replicated(mesh)
    self.params = sharded_params(model, mesh, rules)
    self.weight_bytes = jnp.dtype(model.param_dtype).itemsize
    self._vision_shards = shard_axes(mesh, rules)   # images dealt to the batch shards, as the runs deal them

  def _batch_sharding(self, rank: int, rows: int) -> NamedSharding:
    return sharding.batch_sharding(self.mesh, self.rules, rank, rows)

  def _host(self, tree):
    return on_mesh(tree, lambda _: self.replicated)

  def _vision_work(self, model: CausalLM, images: int, prompt_length: int) -> costs.Work:
    if not self.max_pixels:
      return costs.Work(0.0, 0.0)
    extent = image_extent(model.config, self.max_pixels, prompt_length)
    return costs.vision_pass(model.config, images, extent, jnp.dtype(model.param_dtype).itemsize)

  def _train_step(self, objective, optim, total_steps: int, rows: int, micro_batch: int, prompt: PromptShape,
                  response: int, guard_ratio, resident: Mapping[str, int]) -> Program:
    tx = make_optimizer(optim, total_steps, self.params)
    state = abstract_state(tx, self.params, self.mesh)
    arrays = synthetic_prompts(self.model.config, prompt)
    _, vision = _vision_inputs(self.model.config, arrays, self._vision_shards)
    features = None if objective.vision_trainable else _features_struct(self.model, arrays, self.replicated)
    context = VisionContext(vision=self._host(vision), features=features)
    step = make_train_step(objective, tx, rows // micro_batch, guard_ratio)
    fn = jax.jit(step, donate_argnums=0, out_shardings=(jax.tree.map(lambda x: x.sharding, state), None))
    batch = sequence_struct(rows, prompt.length, response, self._batch_sharding)
    length = prompt.length + response
    forward = costs.decoder_pass(self.model.config, rows * length, costs.causal_pairs(rows, length), rows * response,
                                 self.weight_bytes)
    if objective.vision_trainable:
      forward = forward + self._vision_work(self.model, rows, prompt.length)
    return Program("train_step", fn, (state, batch, context), ("train state", "minibatch", "vision context"),
                   "train.micro_batch_size (or model.remat, or more chips)", costs.train_pass(forward, self.remat),
                   resident=resident)

  def _vision(self, arrays, resident: Mapping[str, int]) -> list[Program]:
    if "pixel_values" not in arrays:
      return []
    _, vision = _vision_inputs(self.model.config, arrays, self._vision_shards)
    fn = jax.jit(lambda params, v: vision_features(self.model, params, v))
    return [Program("vision", fn, (self.params, self._host(vision)), ("policy params", "images"),
                    "model.max_pixels", self._vision_work(self.model, *arrays["input_ids"].shape),
                    resident=resident)]

  def rl(self, stage, judges: tuple[JudgeShape, ...] = ()) -> list[Program]:
    """vision, prefill, decode, logprobs (old / reference), train_step and one scoring pass per judge."""
    r, loss, train, cfg = stage.rollout, stage.loss, stage.train, self.model.config
    prompt = PromptShape(r.prompts_per_rollout, bucket_length(r.max_prompt_length), self.max_pixels, r.bucket_images)
    arrays = synthetic_prompts(cfg, prompt)
    optimizer_bytes = 2 * bytes_per_device(self.params)   # Adam's two moments, sharded like the parameters
    judge_params = {j.weights: sharded_params(j.model, self.mesh, self.rules) for j in judges}
    resident = {"optimizer state": optimizer_bytes,
                **{f"judge weights {w}": bytes_per_device(p) for w, p in judge_params.items()}}
    if loss.uses_reference:   # kept in the sampling dtype (RLTrainer)
      resident["reference policy"] = bytes_per_device(sharded_params(self.model, self.mesh, self.rules,
                                                                     r.sampling_dtype))
    programs = self._vision(arrays, resident)

    # Generation: `generation_prompts` prompts at a time, from the sampling copy (the masters stay resident).
    chunk = min(r.generation_prompts or r.prompts_per_rollout, r.prompts_per_rollout)
    chunks = -(-r.prompts_per_rollout // chunk)
    copy_rules = sharding.without_axis(self.rules, "fsdp") if r.sampling_replicated else self.rules
    sampled = sharded_params(self.model, self.mesh, copy_rules, r.sampling_dtype)
    sampled_bytes = jnp.dtype(r.sampling_dtype or self.model.param_dtype).itemsize
    generating = {**resident, "policy params (masters)": bytes_per_device(self.params)} \
        if r.sampling_dtype or r.sampling_replicated else resident
    gen_prompt = dataclasses.replace(prompt, rows=chunk)
    gen_arrays = synthetic_prompts(cfg, gen_prompt)
    sampler = Sampler(self.model, mesh=self.mesh, rules=self.rules, compaction_levels=r.compaction_levels)
    prepared, _ = _vision_inputs(cfg, gen_arrays, self._vision_shards)
    # With tools, decoding runs chunk by chunk over a cache that holds the results too, and results are appended.
    tools = stage.tools
    capacity = prompt.length + (cache_reserve(r.max_new_tokens, tools) if tools else r.max_new_tokens)
    decoded = tools.chunk_tokens if tools else r.max_new_tokens   # tokens one decode call draws
    response = stage.response_length
    prefill_args = (sampled, self._host(gen_arrays["input_ids"]), self._host(gen_arrays["attention_mask"]),
                    self._host(gen_arrays.get("pixel_values")), None, self._host(prepared))
    prefill_work = (costs.decoder_pass(cfg, chunk * prompt.length, costs.causal_pairs(chunk, prompt.length), chunk,
                                       sampled_bytes) + self._vision_work(self.model, chunk, prompt.length)) * chunks
    knob = "rollout.generation_prompts (or rollout.sampling_dtype / sampling_replicated)"
    programs.append(Program("prefill", sampler.jitted_prefill, prefill_args,
                            ("sampling params", "prompt ids", "prompt mask", "images", "videos", "positions"),
                            knob, prefill_work, static={"capacity": capacity}, resident=generating))
    prefix = jax.eval_shape(functools.partial(sampler.jitted_prefill, capacity=capacity), *prefill_args)
    prefix = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), prefix,
                          sampler.prefix_shardings(prefix))
    eos = cfg.eos_token_id
    settings = SamplingSettings(max_new_tokens=decoded, temperature=r.temperature, top_p=r.top_p,
                                top_k=r.top_k, eos_ids=tuple(eos) if isinstance(eos, tuple) else (eos or 0,),
                                vocab_limit=cfg.text.vocab_size).validate()
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=self.replicated)
    decode_work = costs.decode_loop(cfg, chunk * r.samples_per_prompt, prompt.length, r.max_new_tokens,
                                    sampled_bytes, jnp.dtype(sampler.cache_dtype).itemsize) * chunks
    if tools:   # the decode program runs on the prefix repeated to G rows per prompt
      prefix = jax.eval_shape(lambda p: p.take(jnp.repeat(jnp.arange(chunk), r.samples_per_prompt)), prefix)
      prefix = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), prefix,
                            sampler.prefix_shardings(prefix))
    first_row = jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)
    samples = 1 if tools else r.samples_per_prompt
    programs.append(Program("decode", sampler.jitted_decode(samples), (sampled, prefix, key, first_row),
                            ("sampling params", "prompt cache", "rng", "first row"),
                            knob + " or rollout.max_new_tokens", decode_work,
                            static={"settings": settings, "num_samples": samples,
                                    "compact": r.compaction_levels > 0 and not tools,
                                    "filled": filled_floor(prompt.length)},
                            resident=generating))
    if tools:   # a block of results appended to every row's cache
      block = bucket_length(tools.result_tokens, minimum=1)
      shape = (chunk * r.samples_per_prompt, block)
      results = self._host((np.zeros(shape, np.int32), np.zeros(shape, bool)))
      programs.append(Program("extend", sampler.jitted_extend, (sampled, prefix, *results),
                              ("sampling params", "rows' cache", "result tokens", "result mask"),
                              "tools.result_tokens or rollout.generation_prompts",
                              costs.decoder_pass(cfg, math.prod(shape), math.prod(shape) * capacity, 0,
                                                 sampled_bytes)
                              * tools.max_calls * chunks, resident=generating))

    rows, micro, length = r.rows, train.micro_batch_size or r.minibatch_size, prompt.length + response
    logprob_fn = jax.jit(make_logprob_fn(self.model, rows // micro, train.logprob_chunk, settings.vocab_limit,
                                         r.widths(response)))
    logprob_work = costs.decoder_pass(cfg, rows * length, costs.causal_pairs(rows, length), rows * response,
                                      self.weight_bytes)
    programs.append(Program("logprobs", logprob_fn, (self.params, sequence_struct(rows, prompt.length, response,
                                                                                  self._batch_sharding),
                                                      _features_struct(self.model, arrays, self.replicated)),
                            ("policy params", "rollout rows", "vision features"),
                            "train.micro_batch_size or train.logprob_chunk", logprob_work, resident=resident))
    objective = PolicyGradientObjective(model=self.model, logprob_chunk=train.logprob_chunk,
                                        vision_trainable=stage.optim.vision_trainable,
                                        vocab_limit=settings.vocab_limit, loss=loss,
                                        response_widths=r.widths(response))
    during_training = {k: v for k, v in resident.items() if k != "optimizer state"}   # the step holds it
    programs.append(self._train_step(objective, stage.optim, stage.total_steps, r.minibatch_size, micro, prompt,
                                     response, train.max_update_ratio, during_training))
    policy = {**resident, "policy params": bytes_per_device(self.params)}
    programs += [self._judge(j, judge_params[j.weights], policy) for j in judges]
    return programs

  def sft(self, stage) -> list[Program]:
    s, train = stage.sft, stage.train
    prompt = PromptShape(s.batch_size, s.prompt_length, self.max_pixels, s.bucket_images)
    objective = CrossEntropyObjective(model=self.model, logprob_chunk=train.logprob_chunk,
                                      vision_trainable=stage.optim.vision_trainable,
                                      response_widths=bucketed_widths(s.response_bucket, s.response_length))
    arrays = synthetic_prompts(self.model.config, prompt)
    programs = self._vision(arrays, {"optimizer state": 2 * bytes_per_device(self.params)})
    programs.append(self._train_step(objective, stage.optim, stage.total_steps, s.batch_size,
                                     train.micro_batch_size or s.batch_size, prompt, s.response_length,
                                     train.max_update_ratio, {}))
    return programs

  def _judge(self, judge: JudgeShape, params, resident: Mapping[str, int]) -> Program:
    length = bucket_length(judge.max_length)
    shape = PromptShape(judge.batch_size, length, self.max_pixels, IMAGE_BUCKETS)   # as ModelVerifier pads
    arrays = synthetic_prompts(judge.model.config, shape)
    prepared, _ = _vision_inputs(judge.model.config, arrays, self._vision_shards)
    verdicts = np.arange(2, dtype=np.int32)
    head_params = None
    if judge.head == "classifier":   # heads.classifier_from_lm_head's shapes
      d = judge.model.config.text.hidden_size
      head_params = self._host({"kernel": jax.ShapeDtypeStruct((d, len(verdicts)), jnp.float32),
                                "bias": jax.ShapeDtypeStruct((len(verdicts),), jnp.float32)})
    fn = jax.jit(functools.partial(ModelVerifier.logprobs_fn, judge.model, judge.head, verdicts))
    rows = lambda x: on_mesh(x, lambda a: self._batch_sharding(a.ndim, a.shape[0]))
    pixels = JudgePixels(images=self._host(arrays.get("pixel_values")))
    itemsize = jnp.dtype(judge.model.param_dtype).itemsize
    work = (costs.decoder_pass(judge.model.config, judge.batch_size * length,
                               costs.causal_pairs(judge.batch_size, length), judge.batch_size, itemsize)
            + self._vision_work(judge.model, judge.batch_size, length))
    resident = {k: v for k, v in resident.items() if k != f"judge weights {judge.weights}"}   # an argument here
    return Program(f"judge_{judge.name}", fn, (params, head_params, rows(arrays["input_ids"]),
                                               rows(arrays["attention_mask"]), pixels, self._host(prepared)),
                   (f"judge weights {judge.weights}", "head", "judge prompts", "mask", "images", "positions"),
                   f"reward.verifiers.{judge.name}.batch_size", work, resident=resident)
