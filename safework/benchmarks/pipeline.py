"""`python -m safework.evaluate` as a library: read and check the benchmarks, load the policy and the judge,
generate resumably, judge, score and write the tables (the notebook and the tests call `run`)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from absl import logging


def default_config() -> ml_collections.ConfigDict:
  """Generation and judging settings (--config.KEY=VALUE)."""
  return ml_collections.ConfigDict(dict(
      max_new_tokens=2048, batch_size=32, max_prompt_length=4096, bucket_images=4, dtype="bfloat16",
      mesh=dict(data=1, fsdp=-1, tensor=1), judge_batch_size=16, judge_max_length=8192))


def run(names, data, checkpoint, completions, workdir: Path, judge_text: str, max_examples, config) -> None:
  from safework.benchmarks import get_benchmark
  from safework.benchmarks.judging import JudgeChoice
  from safework.benchmarks import run as runs
  benchmarks = [get_benchmark(name) for name in names]
  judge = JudgeChoice.parse(judge_text)
  for benchmark in benchmarks:
    judge.check(benchmark)
  sources = completions or data
  if completions and checkpoint:
    raise ValueError("give --checkpoint (to generate) or --completions (to judge given responses), not both")
  if not completions and not checkpoint:
    raise ValueError("give --checkpoint to generate responses, or --completions to judge given ones")
  if len(sources) != len(benchmarks):
    flag = "--completions" if completions else "--data"
    raise ValueError(f"{flag} names {len(sources)} path(s) for {len(benchmarks)} benchmark(s); give one per "
                     "benchmark, in --benchmark's order")
  # Every file is read and checked before any model is loaded.
  items = {b.name: b.read(Path(s))[:max_examples] for b, s in zip(benchmarks, sources)}
  given = {b.name: runs.read_completions(Path(s)) for b, s in zip(benchmarks, completions)}
  for name, (texts, _) in given.items():
    if len(texts) != len(items[name]):
      raise ValueError(f"{name}: {len(texts)} completions for {len(items[name])} items")
  generate = None if completions else _generator(checkpoint, config)
  model_judge = None if judge.kind == "rules" else _model_judge(judge.checkpoint, config)
  all_results = []
  for benchmark in benchmarks:
    out = workdir / benchmark.name
    if benchmark.name in given:
      texts, labels = given[benchmark.name]
      responses = runs.Responses(texts[:max_examples])
      labels = labels[:max_examples] if labels else None
    else:
      generation = {k: config[k] for k in ("max_new_tokens", "max_prompt_length", "bucket_images", "dtype",
                                           "batch_size")}   # judging settings may change between runs
      identity = {"checkpoint": str(Path(checkpoint).resolve()), "data": str(Path(data[names.index(
          benchmark.name)]).resolve()), "max_examples": max_examples, **generation}
      with _progress(len(items[benchmark.name]), benchmark.name) as bar:
        responses = runs.generate_resumably(items[benchmark.name], generate, out, identity, config.batch_size,
                                            bar.update)
      labels = None
    results, judgements = runs.evaluate_responses(benchmark, items[benchmark.name], responses.texts, judge,
                                                  model_judge, labels)
    if responses.items_per_s is not None:
      results["items_per_s"] = responses.items_per_s
    runs.write_outputs(out, results, items[benchmark.name], responses.texts, judgements)
    all_results.append(results)
    logging.info("%s: %s", benchmark.name, {k: v for k, v in results["metrics"].items() if not isinstance(v, dict)})
  from safework import distributed
  if distributed.is_main():
    (workdir / "report.md").write_text(runs.summary(all_results))


def _progress(total: int, name: str):
  import jax
  import tqdm
  return tqdm.tqdm(total=total, desc=name, dynamic_ncols=True, disable=jax.process_index() != 0)


def _mesh(config):
  from safework import sharding
  return sharding.make_mesh(dict(config.mesh))


def _load(path: str, config, mesh):
  import jax.numpy as jnp
  from safework import sharding
  from safework.models import from_pretrained
  from safework.models.checkpoint import abstract_params
  from safework.processing import Processor
  processor = Processor.from_pretrained(path)   # the cheap checks before the weights
  model, params = from_pretrained(path, dtype=jnp.dtype(config.dtype), shardings=lambda m: sharding.param_shardings(
      abstract_params(m), mesh, sharding.DEFAULT_RULES))
  return model, params, processor


def _generator(checkpoint: str, config):
  """Greedy responses of the policy, batch by batch."""
  from safework.evaluation import EvalSettings, generate_greedy
  mesh = _mesh(config)
  model, params, processor = _load(checkpoint, config, mesh)
  settings = EvalSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                          max_prompt_length=config.max_prompt_length, bucket_images=config.bucket_images)

  def generate(items):
    import jax
    with jax.set_mesh(mesh):
      texts, _ = generate_greedy(model, params, processor, [item.example() for item in items], settings, mesh,
                                 progress=False)
    return texts
  return generate


def _model_judge(checkpoint: str, config):
  """Verdicts of a judge (a Hugging Face checkpoint or a saved verifier; loaded on first use, once) for any
  benchmark's judge prompts."""
  import functools
  from safework import sharding
  from safework.benchmarks.judging import hf_judge, model_judgements, saved_judge
  mesh = _mesh(config)

  @functools.cache
  def verifier_for():
    if (Path(checkpoint) / "verifier.json").is_file():
      import jax.numpy as jnp
      from safework.verifiers.train import load_verifier
      return saved_judge(load_verifier(checkpoint, mesh=mesh, dtype=jnp.dtype(config.dtype),
                                       batch_size=config.judge_batch_size, max_length=config.judge_max_length))
    return hf_judge(*_load(checkpoint, config, mesh), mesh, sharding.DEFAULT_RULES, config.judge_batch_size,
                    config.judge_max_length)

  def judge(benchmark, items, responses, kind):
    import jax
    with jax.set_mesh(mesh):
      return model_judgements(benchmark, items, responses, kind, verifier_for())
  return judge
