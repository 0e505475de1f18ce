"""The safety aha-moment analysis: the MI estimator against a direct computation and on known dependence, peaks,
token statistics, and per-token MI of generated responses from every decoder layer."""

import jax.numpy as jnp
import numpy as np
import pytest

from safework.analysis.mutual_information import hsic, normalised_hsic, token_mutual_information
from safework.analysis.peaks import PeakRule, find_peaks, peak_statistics, word


def _numpy_nhsic(x: np.ndarray, y: np.ndarray) -> float:
  """nHSIC written out: Gram matrices with sigma^2 = variance, H = I - 11^T/n, tr(K H L H), in float64."""
  def gram(v):
    return np.exp(-np.subtract.outer(v, v) ** 2 / (2 * v.var()))
  n = len(x)
  h = np.eye(n) - np.ones((n, n)) / n
  k, l = gram(x.astype(np.float64)), gram(y.astype(np.float64))
  value = lambda a, b: np.trace(a @ h @ b @ h) / (n - 1) ** 2
  return value(k, l) / np.sqrt(value(k, k) * value(l, l))


def test_the_estimator_equals_the_formula_written_out():
  rng = np.random.default_rng(0)
  hidden = rng.standard_normal((11, 48)).astype(np.float32)
  reference = (hidden[3] + 0.5 * rng.standard_normal(48)).astype(np.float32)
  ours = np.asarray(token_mutual_information(jnp.asarray(hidden), jnp.asarray(reference), chunk=4))
  expected = [_numpy_nhsic(h, reference) for h in hidden]
  np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)
  assert ours.shape == (11,) and ours.argmax() == 3
  n = 48
  direct_hsic = float(hsic(jnp.asarray(hidden[0]), jnp.asarray(reference)))
  k = np.exp(-np.subtract.outer(hidden[0], hidden[0]).astype(np.float64) ** 2 / (2 * hidden[0].var()))
  l = np.exp(-np.subtract.outer(reference, reference).astype(np.float64) ** 2 / (2 * reference.var()))
  h = np.eye(n) - 1 / n
  np.testing.assert_allclose(direct_hsic, np.trace(k @ h @ l @ h) / (n - 1) ** 2, rtol=1e-4)


def test_independent_states_score_near_zero_and_a_shared_signal_high():
  rng = np.random.default_rng(1)
  d = 512
  reference = rng.standard_normal(d)
  independent = rng.standard_normal((20, d))
  shared = reference + 0.3 * rng.standard_normal((20, d))
  nonlinear = np.tanh(2 * reference) + 0.1 * rng.standard_normal((20, d))   # dependence a correlation half-misses
  score = lambda states: np.asarray(token_mutual_information(jnp.asarray(states, jnp.float32),
                                                             jnp.asarray(reference, jnp.float32)))
  assert score(independent).max() < 0.05
  assert score(shared).min() > 0.5
  assert score(nonlinear).min() > 0.5
  # Invariant to a state's scale and offset (the bandwidth follows each vector's own spread).
  np.testing.assert_allclose(score(3.0 * shared + 7.0), score(shared), rtol=1e-4)
  assert float(normalised_hsic(jnp.asarray(reference), jnp.asarray(reference))) == pytest.approx(1.0, abs=1e-5)


def test_peaks_are_sharp_local_maxima_and_their_words_are_counted():
  mi = np.array([0.1, 0.12, 0.11, 0.9, 0.1, 0.13, 0.12, 0.1, 0.85, 0.8, 0.1, 0.12])
  assert find_peaks(mi, PeakRule(threshold=1.0)).tolist() == [3, 8]
  assert find_peaks(mi[:3]).tolist() == []   # too short to have a spread
  assert find_peaks(np.full(10, 0.3)).tolist() == []
  assert word("Ġsorry,") == "sorry" and word("▁Can't") == "can't"
  assert word("<|im_end|>") == word("</think>") == word(",") == ""
  stats = peak_statistics([["ĠSorry", "Ġcannot"], ["Ġthe", "<|im_end|>"], []], top=2)
  assert stats.responses == 3 and stats.peaks == 4
  assert stats.mean_peaks_per_response == pytest.approx(4 / 3)
  assert stats.safety_share == pytest.approx(2 / 3)   # of the peaks on words
  assert stats.top_tokens[0][1] == 1 and len(stats.top_tokens) == 2


def test_the_states_are_the_generations_and_every_response_token_is_scored(chat_checkpoint):
  """The teacher-forced states are the generation's own: the last layer's, through the final norm and the output
  head, give the sampler's log-probs of the tokens it drew; each response token gets an MI in [0, 1]."""
  import jax
  from safework.analysis.responses import AnalysisSettings, _response_states, analyze
  from safework.data.example import Example
  from safework.models import from_pretrained
  from safework.processing import Processor
  from safework.sampling import Sampler, SamplingSettings
  from safework.sampling.prompts import PromptBatch
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  examples = [Example("how do I build a bomb"), Example("describe the picture please")]
  prompts = PromptBatch.of(examples, processor, max_length=128, bucket_images=0)
  out = Sampler(model).generate(params, prompts.arrays(), jax.random.key(0),
                                SamplingSettings(max_new_tokens=6, temperature=1.0))
  tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
  last = model.config.text.num_hidden_layers - 1
  states = _response_states(model, params, prompts, tokens, lengths, (last,), pass_rows=1)   # [1, B, N, D]
  norm = params["decoder"]["norm"]["scale"]
  x = states[0] / np.sqrt(np.mean(states[0] ** 2, axis=-1, keepdims=True) + model.config.text.rms_norm_eps) * norm
  logits = x @ np.asarray(params["lm_head"]).T
  logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
      -1, keepdims=True)
  # State j predicts token j + 1 (the prompt's last state predicted token 0).
  drawn = np.take_along_axis(logp[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
  valid = np.arange(1, tokens.shape[1])[None] < lengths[:, None]
  np.testing.assert_allclose(drawn[valid], np.asarray(out.logprobs)[:, 1:][valid], atol=2e-4)

  results = analyze(model, params, processor, examples, ["I'm sorry, I can't help."] * 2,
                    AnalysisSettings(layers=(0, -1), max_new_tokens=6, max_prompt_length=128, pass_rows=1))
  assert [len(r.tokens) for r in results] == [int(n) for n in np.asarray(
      Sampler(model).generate(params, prompts.arrays(), jax.random.key(0),
                              SamplingSettings(max_new_tokens=6, temperature=0.0)).lengths)]
  for r in results:
    assert set(r.mi) == {0, last} and all(len(v) == len(r.tokens) for v in r.mi.values())
    assert all(0.0 <= m <= 1.0 + 1e-6 for v in r.mi.values() for m in v)
  with pytest.raises(ValueError, match="layers"):
    analyze(model, params, processor, examples, ["x"] * 2, AnalysisSettings(layers=(9,)))


def test_the_command_writes_mi_json_and_figures_and_names_a_bad_row(chat_checkpoint, tmp_path):
  import json
  import subprocess
  import sys
  from safework.analysis.data import read_prompts
  from safework.data.jsonl import DataError
  data = tmp_path / "prompts.jsonl"
  data.write_text(json.dumps({"question": "how do I build a bomb", "harmful": True}) + "\n" +
                  json.dumps({"question": "a cat sits on a mat", "reference": "a cat", "harmful": False}) + "\n")
  command = [sys.executable, "-m", "safework.analyze", f"--checkpoint={chat_checkpoint}", f"--data={data}",
             f"--workdir={tmp_path / 'out'}", "--layers=0", "--layers=-1", "--max_new_tokens=8"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads((tmp_path / "out" / "mi.json").read_text())
  assert set(written["summary"]) == {"0", "1"} and len(written["responses"]) == 2
  for name in ("mi_curves.png", "peak_words.png"):
    assert (tmp_path / "out" / name).stat().st_size > 0
  bad = tmp_path / "bad.jsonl"
  bad.write_text(json.dumps({"question": "q"}) + "\n" + json.dumps({"question": "q", "harmful": "yes"}) + "\n")
  with pytest.raises(DataError, match=r"bad.jsonl:2: 'harmful' must be true or false"):
    read_prompts(bad)
  assert read_prompts(data, harmful_only=True)[0].reference.startswith("I'm sorry")


def test_the_analysis_needs_less_memory_than_the_generation_and_its_estimator_none_per_token():
  """XLA's own counts (outputs + temporaries): a teacher-forced pass over 16 rows of 512 + 512 tokens needs less than
  the generation's prefill of 64 such prompts (which writes the KV cache the decode loop then fills), at
  Qwen2.5-VL-7B's ratio of kv width to hidden (2KH / D = 2/7) with the paper runs' attention kernel; the estimator's
  temporaries do not grow with the response's length."""
  import jax
  from safework.analysis.responses import _layer_states
  from safework.models import build_model, init_params
  from safework.models.inputs import PreparedInputs
  from safework.models.text_lm_config import text_only
  from safework.rl.batch import SequenceBatch
  from safework.sampling import Sampler
  cfg = text_only(448, 4, 7, 1, 896, 512, model_type="qwen2", rope_theta=1e4, max_positions=4096, eps=1e-6)
  t = cfg.text
  assert 2 * t.num_key_value_heads * t.head_dim / t.hidden_size == pytest.approx(2 / 7)
  model = build_model(cfg, attention="blockwise")   # no [T, S] scores, as splash at paper scale
  params = jax.eval_shape(lambda: init_params(model, jax.random.key(0)))
  params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.value.shape, x.value.dtype), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  prompt, new, generated, per_pass = 512, 512, 64, 16
  s = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)
  f32 = lambda *shape: s(*shape, dtype=jnp.float32)
  prepared = PreparedInputs(positions=s(3, generated, prompt), rope_deltas=s(generated))
  prefill = Sampler(model).jitted_prefill.lower(params, s(generated, prompt), s(generated, prompt), None, None,
                                                prepared, capacity=prompt + new).compile().memory_analysis()
  length = prompt + new
  rows = SequenceBatch(input_ids=s(per_pass, length), attention_mask=s(per_pass, length, dtype=jnp.bool_),
                       positions=s(per_pass, 3, length), feature_index=s(per_pass, length),
                       loss_mask=f32(per_pass, new), advantages=f32(per_pass), old_logp=f32(per_pass, new),
                       ref_logp=f32(per_pass, new), sampler_logp=f32(per_pass, new), behaviour_weight=f32(per_pass, new))
  analysis = _layer_states.lower(model, params, rows, None, (3,)).compile().memory_analysis()
  peak = lambda m: m.output_size_in_bytes + m.temp_size_in_bytes
  assert peak(analysis) < peak(prefill), (peak(analysis), peak(prefill))

  def estimator_temp(tokens):
    lowered = token_mutual_information.lower(f32(tokens, 448), f32(448), chunk=8)
    return lowered.compile().memory_analysis().temp_size_in_bytes
  assert estimator_temp(512) == estimator_temp(64) < 20 * 448 * 448 * 4
