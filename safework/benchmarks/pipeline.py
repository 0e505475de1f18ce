"""`python -m safework.evaluate` as a library: read and check the benchmarks, load the policy and the judge,
generate resumably, judge, score and write the tables (the notebook and the tests call `run`)."""

from __future__ import annotations

from pathlib import Path

import ml_collections
from absl import logging


def default_config() -> ml_collections.ConfigDict:
  """Generation and judging settings (--config.KEY=VALUE); `intervention` holds the step search's settings (see
  `safework.intervention.settings.SearchSettings`; candidates and threshold default to the mode's)."""
  from ml_collections import config_dict
  from safework.experiment import section
  from safework.intervention.settings import SearchSettings
  intervention = section(SearchSettings)
  intervention.candidates, intervention.threshold = config_dict.placeholder(int), config_dict.placeholder(float)
  del intervention.recipes   # every benchmark prompt is judged by every --intervention_judge
  return ml_collections.ConfigDict(dict(
      max_new_tokens=2048, batch_size=32, max_prompt_length=4096, bucket_images=4, dtype="bfloat16",
      mesh=dict(data=1, fsdp=-1, tensor=1), judge_batch_size=16, judge_max_length=8192, intervention=intervention))


def search_settings(mode: str | None, guides: dict[str, str], config):
  """The step search `--intervention MODE` asks for, guided by every `--intervention_judge` with equal weight."""
  from safework.intervention.settings import SearchSettings
  if mode is None:
    if guides:
      raise ValueError("--intervention_judge guides a step search: add --intervention rerank|mask|rerank+mask")
    return None
  if not guides:
    raise ValueError(f"--intervention {mode} needs a verifier to guide it: --intervention_judge KIND:CHECKPOINT")
  fields = config.intervention.to_dict()
  recipes = (("*", tuple((kind, 1.0) for kind in guides)),)
  return SearchSettings.for_mode(mode, recipes=recipes, **{k: tuple(v) if isinstance(v, list) else v
                                                          for k, v in fields.items()})


def run(names, data, checkpoint, completions, workdir: Path, judge_text: str, max_examples, config,
        intervention: str | None = None, intervention_judges=()) -> None:
  from safework.benchmarks import get_benchmark
  from safework.benchmarks.judging import JudgeChoice
  from safework.benchmarks import run as runs
  from safework.intervention.judges import parse_guides
  benchmarks = [get_benchmark(name) for name in names]
  judge = JudgeChoice.parse(judge_text)
  guides = parse_guides(intervention_judges)
  search = search_settings(intervention, guides, config)
  if search is not None and completions:
    raise ValueError("--intervention changes how responses are generated: it cannot apply to --completions")
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
  generate = None if completions else _generator(checkpoint, config, search, guides)
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
      if search is not None:
        generation["intervention"] = {"mode": search.mode, "settings": repr(search), "judges": guides}
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


def _generator(checkpoint: str, config, search_settings=None, guides=None):
  """Greedy responses of the policy (or the step search's), batch by batch."""
  import jax.numpy as jnp
  from safework.evaluation import EvalSettings, eval_sampling, generate
  from safework.intervention.judges import load_guides
  from safework.intervention.search import StepSearch
  from safework.sampling import Sampler
  mesh = _mesh(config)
  model, params, processor = _load(checkpoint, config, mesh)
  settings = EvalSettings(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size,
                          max_prompt_length=config.max_prompt_length, bucket_images=config.bucket_images)
  search = None
  if search_settings is not None:
    verifiers = load_guides(guides, mesh, jnp.dtype(config.dtype), config.judge_batch_size)
    search = StepSearch(Sampler(model, mesh=mesh), processor.tokenizer, verifiers, search_settings,
                        eval_sampling(model, processor.tokenizer, config.max_new_tokens))

  def generate_batch(items):
    import jax
    with jax.set_mesh(mesh):
      return generate(model, params, processor, [item.example() for item in items], settings, mesh, search,
                      progress=False).responses
  return generate_batch


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
