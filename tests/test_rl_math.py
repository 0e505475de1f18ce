"""RL math against hand formulas written independently in numpy (values and gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from safework.rl import advantages as adv
from safework.rl import losses
from safework.rl.logprobs import chunked_token_logprobs

RNG = np.random.default_rng(0)


def test_group_zscore_uses_the_unbiased_std():
  r = np.array([[1.0, 0.0, 0.5, 0.5], [2.0, 2.0, 2.0, 2.0]])
  expected = (r - r.mean(1, keepdims=True)) / (r.std(1, ddof=1, keepdims=True) + 1e-9)
  np.testing.assert_allclose(adv.group_zscore(jnp.asarray(r)), expected, rtol=1e-6)
  assert np.all(np.asarray(adv.group_zscore(jnp.asarray(r)))[1] == 0)   # equal rewards: no signal, no NaN
  np.testing.assert_allclose(adv.group_mean_centered(jnp.asarray(r)), r - r.mean(1, keepdims=True))


# The paper's reward values (safework_r1.md section 3): format 1 + a bare refusal 0.1, a refusal alone, an
# illogical completion 0.01, ... Eight equal fp32 rewards of these do not average back to themselves.
PAPER_VALUES = [0.1, 1.1, 1.01, 0.01, 1.0, 2.0, 0.0, 1.5]


@pytest.mark.parametrize("value", PAPER_VALUES)
@pytest.mark.parametrize("name", adv.ESTIMATORS)
def test_a_group_of_equal_rewards_gets_exactly_zero_advantage(name, value):
  rewards = jnp.full((3, 8), value, jnp.float32)   # the sampler's fp32 sums, as a rollout holds them
  lengths = jnp.tile(jnp.asarray([[12] * 8]), (3, 1))
  got = np.asarray(adv.compute_advantages(name, rewards, lengths))
  assert np.all(got == 0.0), got
  # The unguarded fp32 z-score of such a group is what the old estimator gave: -0.83 for 0.1, -0.93 for 1.01.
  naive = (rewards - rewards.mean(-1, keepdims=True)) / (jnp.std(rewards, -1, keepdims=True, ddof=1) + 1e-9)
  assert value not in (0.1, 1.01, 0.01) or float(jnp.abs(naive).max()) > 0.4


def _length_conditional_by_hand(r, lengths, scale, lam, alpha, beta):
  out = np.zeros_like(r)
  for p in range(r.shape[0]):
    median = np.median(lengths[p])
    long = [i for i in range(r.shape[1]) if lengths[p, i] > median]
    short = [i for i in range(r.shape[1]) if lengths[p, i] <= median]
    if not long:
      out[p] = (r[p] - r[p].mean()) / scale
      continue
    mu_s, mu_l = r[p, short].mean(), r[p, long].mean()
    for i in long:
      out[p, i] = (lam * (alpha * r[p, i] - mu_s + beta) + (1 - lam) * (r[p, i] - mu_l)) / scale
    for i in short:
      out[p, i] = (lam * (r[p, i] - alpha * mu_l - beta) + (1 - lam) * (r[p, i] - mu_s)) / scale
  return out


@pytest.mark.parametrize("g", [4, 5])
def test_length_conditional_advantage(g):
  r = RNG.random((4, g))
  lengths = RNG.integers(5, 50, (4, g))
  lengths[0, :2] = 7          # a tie
  lengths[1, :] = 9           # all equal: no split, mean-centred
  lengths[2, 1:] = lengths[2, 0]   # a tie across the median
  got = adv.length_conditional(jnp.asarray(r), jnp.asarray(lengths), lam=0.6, alpha=0.9, beta=0.05, scale=64.0)
  np.testing.assert_allclose(got, _length_conditional_by_hand(r, lengths, 64.0, 0.6, 0.9, 0.05), rtol=1e-5,
                             atol=1e-7)


def test_length_conditional_defaults_prefer_brevity_and_alpha_one_is_mean_centring():
  r = np.array([[1.0, 1.0, 1.0, 1.0], [0.0, 1.0, 0.0, 1.0]])
  lengths = np.array([[10, 20, 30, 40], [10, 20, 30, 40]])
  equal = adv.length_conditional(r, lengths)   # the defaults: lam 0.5, alpha 0.9, beta 0
  assert equal[0, 0] > 0 and equal[0, 1] > 0 and equal[0, 2] < 0 and equal[0, 3] < 0
  np.testing.assert_allclose(equal[0], [0.05, 0.05, -0.05, -0.05], atol=1e-7)   # lam * (1 - alpha) * r
  neutral = adv.length_conditional(r, lengths, alpha=1.0, beta=0.0)
  np.testing.assert_allclose(neutral, r - r.mean(1, keepdims=True), atol=1e-7)


def _grad(fn, logp):
  return np.asarray(jax.grad(lambda x: fn(x).sum())(jnp.asarray(logp)))


def test_ppo_asymmetric_clip_values_and_gradients():
  old = np.zeros((1, 6), np.float32)
  ratio = np.array([[0.7, 0.9, 1.1, 1.3, 0.7, 1.3]], np.float32)
  logp = np.log(ratio)
  a = np.array([1.0], np.float32)
  eps_low, eps_high = 0.2, 0.28
  for sign in (1.0, -1.0):
    loss, clipped = losses.ppo_clip(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(a * sign), eps_low, eps_high)
    expected = -np.minimum(ratio * sign, np.clip(ratio, 1 - eps_low, 1 + eps_high) * sign)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    grad = _grad(lambda x: losses.ppo_clip(x, jnp.asarray(old), jnp.asarray(a * sign), eps_low, eps_high)[0], logp)
    # d(-ratio * A)/d logp = -A * ratio where the unclipped term is the min, else 0.
    active = (ratio * sign <= np.clip(ratio, 1 - eps_low, 1 + eps_high) * sign)
    np.testing.assert_allclose(grad, np.where(active, -sign * ratio, 0.0), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(clipped), ~active)
  # Positive advantages clip above 1 + eps_high = 1.28, negative ones below 1 - eps_low = 0.8.
  np.testing.assert_array_equal(
      np.asarray(losses.ppo_clip(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(a), eps_low, eps_high)[1]),
      [[False, False, False, True, False, True]])


def test_cpgd_gradient_is_the_policy_gradient_inside_the_trust_region_and_zero_outside():
  old = np.log(np.full((2, 5), 0.3, np.float32))
  ratio = np.array([0.5, 0.85, 1.0, 1.15, 1.5], np.float32)
  logp = old + np.log(ratio)
  a = np.array([2.0, -3.0], np.float32)
  eps = 0.2
  loss, outside = losses.cpgd(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(a), eps)
  upper, lower = old + np.log(1 + eps), old + np.log(1 - eps)
  clamped = np.where(a[:, None] > 0, np.minimum(logp, upper), np.maximum(logp, lower))
  np.testing.assert_allclose(loss, -a[:, None] * clamped, rtol=1e-6)
  grad = _grad(lambda x: losses.cpgd(x, jnp.asarray(old), jnp.asarray(a), eps)[0], logp)
  inside = np.where(a[:, None] > 0, ratio <= 1 + eps, ratio >= 1 - eps)
  np.testing.assert_allclose(grad, np.where(inside, -a[:, None], 0.0), rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(outside), ~inside)


def test_cpgd_drift_gradient():
  old = np.zeros((1, 3), np.float32)
  logp = np.log(np.array([[0.5, 1.2, 4.0]], np.float32))
  grad = _grad(lambda x: losses.cpgd_drift(x, jnp.asarray(old), 0.01), logp)
  np.testing.assert_allclose(grad, 0.01 * np.minimum(np.exp(logp - old) - 1, 2.0), rtol=1e-6)


def test_gspo_sequence_ratio_value_and_gradient():
  old = np.log(RNG.uniform(0.2, 0.8, (2, 4))).astype(np.float32)
  logp = (old + RNG.normal(0, 0.05, (2, 4))).astype(np.float32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 1, 1]], np.float32)
  a = np.array([1.5, -0.5], np.float32)
  loss, _ = losses.gspo(jnp.asarray(logp), jnp.asarray(old), jnp.asarray(a), jnp.asarray(mask), 3e-4, 4e-4)
  s = np.exp(((logp - old) * mask).sum(1) / mask.sum(1))
  expected = -np.minimum(s * a, np.clip(s, 1 - 3e-4, 1 + 4e-4) * a)
  np.testing.assert_allclose(np.asarray(loss)[:, 0], expected, rtol=1e-5)
  # Unclipped: d/d logp_t of -A * s = -A * s / |y| on valid tokens (GSPO's token gradient).
  wide = lambda x: losses.gspo(x, jnp.asarray(old), jnp.asarray(a), jnp.asarray(mask), 10.0, 10.0)[0][:, 0]
  grad = np.asarray(jax.grad(lambda x: wide(x).sum())(jnp.asarray(logp)))
  np.testing.assert_allclose(grad, -(a * s / mask.sum(1))[:, None] * mask, rtol=1e-5)


def test_kl_estimators_values_and_gradients():
  logp = np.log(RNG.uniform(0.1, 0.9, (2, 5))).astype(np.float32)
  ref = np.log(RNG.uniform(0.1, 0.9, (2, 5))).astype(np.float32)
  d = ref - logp
  expected = {"k1": -d, "k2": 0.5 * d**2, "k3": np.exp(d) - d - 1}
  grads = {"k1": np.ones_like(d), "k2": -d, "k3": 1 - np.exp(d)}
  for name in ("k1", "k2", "k3"):
    np.testing.assert_allclose(losses.kl_penalty(jnp.asarray(logp), jnp.asarray(ref), name), expected[name], rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(_grad(lambda x: losses.kl_penalty(x, jnp.asarray(ref), name), logp), grads[name],
                               rtol=1e-5, atol=1e-7)
  assert np.all(expected["k3"] >= 0)


def test_aggregations_and_their_micro_batch_sums():
  per_token = RNG.normal(size=(4, 6)).astype(np.float32)
  mask = (RNG.random((4, 6)) > 0.3).astype(np.float32)
  mask[:, 0] = 1
  tokens, seqs = mask.sum(), 4
  expected = {
      "token-mean": (per_token * mask).sum() / tokens,
      "seq-mean-token-mean": np.mean((per_token * mask).sum(1) / mask.sum(1)),
      "seq-mean-token-sum-norm": (per_token * mask).sum() / (seqs * 16),
  }
  for mode, value in expected.items():
    full = losses.aggregate(jnp.asarray(per_token), jnp.asarray(mask), mode, seqs, tokens, 16)
    halves = sum(losses.aggregate(jnp.asarray(per_token[i:i + 2]), jnp.asarray(mask[i:i + 2]), mode, seqs, tokens, 16)
                 for i in (0, 2))
    np.testing.assert_allclose(full, value, rtol=1e-6)
    np.testing.assert_allclose(halves, value, rtol=1e-6)


def test_chunked_logprobs_equal_full_logprobs_with_gradients():
  hidden = jnp.asarray(RNG.normal(size=(2, 7, 8)), jnp.float32)
  weights = jnp.asarray(RNG.normal(size=(11, 8)), jnp.float32)
  targets = jnp.asarray(RNG.integers(0, 11, (2, 7)))

  def full(h, w):
    logits = jnp.einsum("btd,vd->btv", h, w)
    logp = jax.nn.log_softmax(logits)
    return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0], -(jnp.exp(logp) * logp).sum(-1)

  for chunk in (1, 3, 7, 16):
    got_logp, got_entropy = chunked_token_logprobs(hidden, weights, targets, chunk)
    want_logp, want_entropy = full(hidden, weights)
    np.testing.assert_allclose(got_logp, want_logp, atol=1e-5)
    np.testing.assert_allclose(got_entropy, want_entropy, atol=1e-5)
    g_chunk = jax.grad(lambda h, w: chunked_token_logprobs(h, w, targets, chunk)[0].sum(), (0, 1))(hidden, weights)
    g_full = jax.grad(lambda h, w: full(h, w)[0].sum(), (0, 1))(hidden, weights)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g_chunk, g_full)


def test_settings_validation():
  with pytest.raises(ValueError, match="policy_loss"):
    losses.LossSettings(policy_loss="reinforce").validate()
  with pytest.raises(ValueError, match="unknown advantage"):
    adv.compute_advantages("rloo", jnp.zeros((1, 2)), jnp.zeros((1, 2)))
