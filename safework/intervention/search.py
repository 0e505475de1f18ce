"""Verifier-guided step search over the policy's reasoning: re-ranking candidate steps, masking rejected ones, and a
person's review of each chosen step.

At each step every live beam forks into K candidate continuations in one jitted decode call (the beam's cache is
repeated on device, never recomputed), the verifiers score prefix + candidate in one batched call, and the best W
per prompt are kept (`Prefix.take`). With a threshold, a beam whose candidates all score below it rolls back to the
step's start, the tokens that began its rejected candidates are masked in its next-token logits, and it resamples.
The final answer after `</think>` is made of steps like the reasoning and judged the same way. Only the step loop
runs on the host. Cache slots are shared by the rows (each step advances them all by its longest candidate), so the
prompt reserves `max_new_tokens + step_tokens` slots; a row ends at its own `max_new_tokens`.

Axis legend: P prompts, W beams kept per prompt, K candidates per beam, R rows of the cache (P at the first step,
then P W), C = R x samples candidate rows.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from safework.data.example import Example
from safework.distributed import host_array
from safework.intervention.settings import SearchSettings
from safework.sampling.masks import BannedSequences, Chain, GreedyEvery, banned_next, end_rows, mask_next_tokens
from safework.sampling.sampler import Prefix, Sampler
from safework.sampling.shapes import bucket_length, left_padded_block
from safework.sampling.settings import SamplingSettings
from safework.sampling.text import delimiter_stops, stop_sequences
from safework.verifiers.recipes import Scorer
from safework.verifiers.rules import final_answer

# A person's review of a chosen step: (prompt index, step index, step text, score) -> None to accept, or the text
# that replaces the step.
Review = Callable[[int, int, str, float], "str | None"]


@dataclasses.dataclass(frozen=True)
class Candidate:
  text: str
  score: float
  tokens: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class Step:
  text: str                           # the kept step
  score: float                        # the verifiers' score of the response up to and including it
  candidates: tuple[Candidate, ...]   # every candidate the step's beam drew, rejected attempts first
  resampled: int = 0                  # times the step rolled back and resampled with masked first tokens
  edited: bool = False                # a person rewrote it


@dataclasses.dataclass(frozen=True)
class SearchResult:
  response: str
  steps: tuple[Step, ...]
  tokens: tuple[int, ...]       # the response's tokens
  logprobs: tuple[float, ...]   # their policy log-probs (nan where a person wrote them)
  score: float                  # the verifiers' score of the whole response
  generated_tokens: int         # every token sampled for this prompt: all candidates, all attempts
  finished: bool                # ended with an end token (not cut at max_new_tokens or out of cache room)


@dataclasses.dataclass(frozen=True)
class _Beam:
  tokens: tuple[int, ...] = ()
  logprobs: tuple[float, ...] = ()
  steps: tuple[Step, ...] = ()
  score: float = 0.0
  done: bool = False
  finished: bool = False


@dataclasses.dataclass
class _Pool:
  """Every candidate row of one step: the decoded cache [C] and, on the host, what each row drew and scored."""
  prefix: Prefix
  tokens: list[list[int]]
  logprobs: list[list[float]]
  scores: np.ndarray                  # [C]
  history: list[list[Candidate]]      # [R]: each beam's candidates over the attempts
  resampled: np.ndarray               # [R]


def _chain(processors: tuple):
  return None if not processors else processors[0] if len(processors) == 1 else Chain(processors)


def judged_text(response: str) -> str:
  """What the verifiers read of a partial response: the response once its final answer has begun (they judge the
  text after `</think>`), before that the reasoning so far without its think tags, so a step inside the reasoning
  is judged on what it says."""
  if "</think>" in response and final_answer(response):
    return response
  return response.replace("<think>", "").replace("</think>", "").strip()


class StepSearch:
  """The step search of one policy (`sampler`) with its verifiers (`scorers`, name -> scorer)."""

  def __init__(self, sampler: Sampler, tokenizer, scorers: Mapping[str, Scorer], settings: SearchSettings,
               sampling: SamplingSettings):
    self.settings = settings.validate()
    missing = sorted(settings.verifiers - set(scorers))
    if missing:
      raise ValueError(f"the search weighs verifiers {missing}, which were not given (given: {sorted(scorers)})")
    banned = stop_sequences(tokenizer, settings.banned)
    self.sampler, self.tokenizer, self.scorers, self.banned = sampler, tokenizer, scorers, banned
    self.max_new_tokens, self.sampling = sampling.max_new_tokens, sampling
    self.processors = tuple(p for p in (sampling.logits_processor, BannedSequences(banned) if banned else None) if p)
    self.completion_sampling = sampling.replace(   # the lookahead: greedy to the end of the answer
        temperature=0.0, top_p=1.0, logits_processor=_chain(self.processors))
    self.step_sampling = sampling.replace(
        temperature=settings.temperature, top_p=settings.top_p,
        stop_sequences=sampling.stop_sequences + delimiter_stops(tokenizer, settings.delimiters))

  def _candidate_sampling(self, samples: int, budget: int) -> SamplingSettings:
    """A step's candidates: `samples` per row, each row's first one greedy with `greedy_first`."""
    greedy = (GreedyEvery(samples),) if self.settings.greedy_first and self.settings.temperature > 0 else ()
    return self.step_sampling.replace(max_new_tokens=budget, logits_processor=_chain(self.processors + greedy))

  # -- the host's view of candidates ---------------------------------------------------------------------------

  def _text(self, tokens: Sequence[int]) -> str:
    return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

  def _score(self, examples: Sequence[Example], responses: Sequence[str]) -> np.ndarray:
    """Each row's recipe: the weighted mean of its verifiers' scores (0 for rows no recipe judges), each verifier
    called once on all the rows it judges."""
    judged = [judged_text(r) for r in responses]
    recipes = [dict(self.settings.recipe(e.label)) for e in examples]
    total, weight = np.zeros(len(judged), np.float32), np.zeros(len(judged), np.float32)
    for name in sorted(self.settings.verifiers):
      rows = [i for i, recipe in enumerate(recipes) if name in recipe]
      if rows:
        scores = self.scorers[name]([examples[i] for i in rows], [judged[i] for i in rows], np.zeros(len(rows)))
        w = np.array([recipes[i][name] for i in rows], np.float32)
        total[rows] += w * np.asarray(scores, np.float32)
        weight[rows] += w
    return total / np.maximum(weight, 1e-9)

  # -- one step ------------------------------------------------------------------------------------------------

  def _decode(self, params, prefix: Prefix, masked: list[set[int]], done: np.ndarray, rng, samples: int,
              budget: int):
    prefix = end_rows(mask_next_tokens(prefix, masked), done, self.sampling.eos_ids)   # finished beams
    out = self.sampler.decode(params, prefix, rng, self._candidate_sampling(samples, budget), num_samples=samples,
                              keep_prefix=True)
    tokens, lengths, logprobs = (host_array(x) for x in (out.tokens, out.lengths, out.logprobs))
    return out.prefix, [t[:n].tolist() for t, n in zip(tokens, lengths)], [lp[:n].tolist()
                                                                           for lp, n in zip(logprobs, lengths)]

  def _complete(self, params, prefix: Prefix, rows: list[int], drawn: list[tuple[int, ...]],
                wanted: list[bool]) -> list[list[int]]:
    """Greedy completions of the `wanted` ones of `prefix`'s `rows` (whose responses so far are `drawn`) to the end
    of the answer, in one compacting decode call; a row whose answer has ended, or that is at max_new_tokens, gets
    none."""
    rooms = [0 if not want or self.sampling.ends(d) else self.max_new_tokens - len(d) for d, want in zip(drawn, wanted)]
    budget = min(self.max_new_tokens, prefix.capacity - int(prefix.write_index))   # one program for every step
    if budget < 1 or max(rooms) < 1:
      return [[] for _ in rows]
    picked = rows + [rows[0]] * (bucket_length(len(rows), minimum=1) - len(rows))
    idle = np.array([room < 1 for room in rooms] + [True] * (len(picked) - len(rows)))
    start = end_rows(prefix.take(jnp.asarray(picked)), idle, self.sampling.eos_ids)
    out = self.sampler.decode(params, start, jax.random.key(0), self.completion_sampling.replace(
        max_new_tokens=budget), keep_prefix=True, compact=True)   # keep: no buffer of a compacting loop is reused
    tokens, lengths = host_array(out.tokens), host_array(out.lengths)
    return [tokens[i, :min(lengths[i], room)].tolist() if room > 0 else [] for i, room in enumerate(rooms)]

  def _fork(self, params, prefix: Prefix, flat: list[_Beam], examples: list[Example], rng, samples: int,
            budget: int, generated: np.ndarray, owner: list[int]) -> _Pool:
    """Draws `samples` candidates per beam (resampling rejected beams with masks) and scores them."""
    settings, rows = self.settings, len(flat)
    done = np.array([b.done for b in flat])
    masked = [banned_next(b.tokens, self.banned) for b in flat]
    candidate_rows = lambda r: range(r * samples, (r + 1) * samples)
    pool_prefix, tokens, logprobs = self._decode(params, prefix, masked, done, rng, samples, budget)
    scores = np.zeros(rows * samples, np.float32)
    history: list[list[Candidate]] = [[] for _ in range(rows)]
    resampled = np.zeros(rows, int)
    todo = [r for r in range(rows) if not done[r]]
    for attempt in itertools.count():
      for r in todo:
        for c in candidate_rows(r):
          room = self.max_new_tokens - len(flat[r].tokens)
          tokens[c], logprobs[c] = tokens[c][:room], logprobs[c][:room]
          generated[owner[r]] += len(tokens[c])
      cands = [c for r in todo for c in candidate_rows(r)]
      # A beam's identical candidates (a confident policy draws many) are completed and scored once.
      first_of = {}
      same = [first_of.setdefault((c // samples, tuple(tokens[c])), c) for c in cands]
      distinct = sorted(set(same))
      drawn = [flat[c // samples].tokens + tuple(tokens[c]) for c in distinct]
      if settings.lookahead:   # rows no verifier judges keep their greedy candidate: nothing to look ahead for
        judged = [bool(settings.recipe(examples[owner[c // samples]].label)) for c in distinct]
        completions = self._complete(params, pool_prefix, distinct, drawn, judged)
        for c, completion in zip(distinct, completions):
          generated[owner[c // samples]] += len(completion)
        drawn = [d + tuple(completion) for d, completion in zip(drawn, completions)]
      scores[distinct] = self._score([examples[owner[c // samples]] for c in distinct],
                                     [self._text(d) for d in drawn])
      scores[cands] = scores[same]
      for c in cands:
        history[c // samples].append(Candidate(self._text(tokens[c]), float(scores[c]), tuple(tokens[c])))
      if settings.threshold is None or attempt == settings.resamples:
        break
      todo = [r for r in todo if self.settings.recipe(examples[owner[r]].label)
              and scores[list(candidate_rows(r))].max() < settings.threshold]
      if not todo:
        break
      for r in todo:
        masked[r] = masked[r] | {tokens[c][0] for c in candidate_rows(r) if tokens[c]}
        resampled[r] += 1
      picked = todo + [todo[0]] * (bucket_length(len(todo), minimum=1) - len(todo))   # few shapes
      again, new_tokens, new_logprobs = self._decode(
          params, prefix.take(jnp.asarray(picked)), [masked[r] for r in picked], np.zeros(len(picked), bool),
          jax.random.fold_in(rng, attempt + 1), samples, budget)
      replaced = [c for r in todo for c in candidate_rows(r)]
      pool_prefix = pool_prefix.put(jnp.asarray(replaced), again.take(jnp.arange(len(replaced))))
      for i, c in enumerate(replaced):
        tokens[c], logprobs[c] = new_tokens[i], new_logprobs[i]
    return _Pool(pool_prefix, tokens, logprobs, scores, history, resampled)

  def _select(self, pool: _Pool, groups: list[list[_Beam]], samples: int) -> tuple[list[list[_Beam]], list[int]]:
    """The best W beams per prompt among its beams' candidates (a finished beam stands for itself), and the pool
    rows they continue from."""
    kept, rows, r = [], [], 0
    for group in groups:
      options = []   # (score, beam, pool row)
      for beam in group:
        if beam.done:
          options.append((beam.score, beam, r * samples))
        for c in ([] if beam.done else range(r * samples, (r + 1) * samples)):
          tokens = beam.tokens + tuple(pool.tokens[c])
          at_limit = len(tokens) >= self.max_new_tokens
          step = Step(self._text(pool.tokens[c]), float(pool.scores[c]), tuple(pool.history[r]),
                      int(pool.resampled[r]))
          ends = self.sampling.ends(tokens)
          options.append((float(pool.scores[c]), _Beam(tokens, beam.logprobs + tuple(pool.logprobs[c]),
                                                       beam.steps + (step,), float(pool.scores[c]),
                                                       done=ends or at_limit or not pool.tokens[c], finished=ends),
                          c))
        r += 1
      options.sort(key=lambda option: -option[0])   # stable: ties keep the earlier draw
      kept.append([beam for _, beam, _ in options[:self.settings.beam]])
      rows += [row for _, _, row in options[:self.settings.beam]]
    return kept, rows

  def _review(self, params, review: Review, step: int, before: Prefix, after: Prefix, groups: list[list[_Beam]],
              parents: list[_Beam], examples: list[Example]) -> tuple[list[list[_Beam]], Prefix]:
    """A person accepts or rewrites each prompt's newly chosen step; a rewritten step replaces the candidate in the
    cache: the beam's state before the step, extended by the person's text (the prompt is not recomputed)."""
    edits = {}
    for p, ((beam,), parent) in enumerate(zip(groups, parents)):
      if not parent.done:
        replacement = review(p, step, beam.steps[-1].text, beam.score)
        if replacement is not None:
          edits[p] = replacement
    if not edits:
      return groups, after
    rows = list(edits)
    encoded = [self.tokenizer.encode(edits[p], add_special_tokens=False) for p in rows]
    extended = self.sampler.extend(params, before.take(jnp.asarray(rows)), *left_padded_block(encoded))
    after = after.put(jnp.asarray(rows), extended)
    responses = [self._text(parents[p].tokens + tuple(ids)) for p, ids in zip(rows, encoded)]
    scores = self._score([examples[p] for p in rows], responses)
    for p, ids, score in zip(rows, encoded, scores):
      parent, chosen = parents[p], groups[p][0]
      step_record = dataclasses.replace(chosen.steps[-1], text=edits[p], score=float(score), edited=True)
      groups[p] = [_Beam(parent.tokens + tuple(ids), parent.logprobs + (float("nan"),) * len(ids),
                         parent.steps + (step_record,), float(score))]
    return groups, after

  # -- the search ----------------------------------------------------------------------------------------------

  def run(self, params, batch: dict, examples: Sequence[Example], rng: jax.Array, review: Review | None = None,
          edit_slots: int = 0) -> list[SearchResult]:
    """Searches a response for each prompt of `batch` (the processor's arrays of `examples`' prompts). `review`
    lets a person accept or rewrite each chosen step (beam 1); `edit_slots` reserves cache room for their text."""
    settings, examples = self.settings, list(examples)
    if review is not None and settings.beam != 1:
      raise ValueError(f"a person reviews one chosen step per prompt: use beam 1 (got {settings.beam})")
    reserve = self.max_new_tokens * (2 if settings.lookahead else 1) + settings.step_tokens   # see the module doc
    prefix = self.sampler.prefill(params, batch, reserve, extra_slots=edit_slots)
    groups = [[_Beam()] for _ in examples]
    generated = np.zeros(len(examples), int)
    for step in itertools.count():
      flat = [beam for group in groups for beam in group]
      if all(beam.done for beam in flat):
        break
      budget = min(settings.step_tokens, prefix.capacity - int(prefix.write_index))
      if budget < 1:   # out of cache room: the live beams end where they are
        groups = [[dataclasses.replace(b, done=True) for b in group] for group in groups]
        break
      owner = [p for p, group in enumerate(groups) for _ in group]
      samples = settings.candidates * settings.beam // len(groups[0])   # the first step forks one beam K W ways
      pool = self._fork(params, prefix, flat, examples, jax.random.fold_in(rng, step), samples, budget, generated,
                        owner)
      parents = [group[0] for group in groups]
      groups, rows = self._select(pool, groups, samples)
      chosen = pool.prefix.take(jnp.asarray(rows))
      if review is not None:
        groups, chosen = self._review(params, review, step, prefix, chosen, groups, parents, examples)
      prefix = chosen
    results = []
    for group, count in zip(groups, generated):
      best = max(group, key=lambda beam: beam.score)
      results.append(SearchResult(self._text(best.tokens), best.steps, best.tokens, best.logprobs, best.score,
                                  int(count), best.finished))
    return results
