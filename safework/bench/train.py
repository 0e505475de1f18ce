"""Train-step throughput: tokens/s and MFU of the jitted RL update, and the rollout / train time split.

  python -m safework.bench train --preset 3b --dtype bfloat16 --remat full --batch 16 --prompt_len 512 --gen_len 512

MFU counts 6 x (decoder parameters) x (tokens in the minibatch) per step against the measured matmul rate.
Weights are random; the vision tower is frozen and unused (text prompts), as in the paper's RL stages.
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np

from safework import sharding
from safework.bench.roofline import Ceilings, best_time
from safework.bench.sampler import decoder_param_count
from safework.models import Qwen25VL, get_preset, init_params
from safework.rl.batch import SequenceBatch, VisionContext, VisionInputs
from safework.rl.objectives import PolicyGradientObjective
from safework.rl.optim import OptimSettings, make_optimizer
from safework.sampling import Sampler, SamplingSettings
from safework.training import make_train_step, new_state


def synthetic_batch(vocab: int, batch: int, prompt_len: int, gen_len: int, seed: int = 0) -> SequenceBatch:
  rng = np.random.default_rng(seed)
  length = prompt_len + gen_len
  positions = np.broadcast_to(np.arange(length), (batch, 3, length)).astype(np.int32)
  logp = -rng.uniform(0.5, 3.0, (batch, gen_len)).astype(np.float32)
  return SequenceBatch(
      input_ids=rng.integers(10, vocab, (batch, length)).astype(np.int32),
      attention_mask=np.ones((batch, length), bool), positions=positions,
      feature_index=np.full((batch, length), -1, np.int32), loss_mask=np.ones((batch, gen_len), np.float32),
      advantages=rng.normal(size=batch).astype(np.float32), old_logp=logp, ref_logp=logp, sampler_logp=logp,
      behaviour_weight=np.ones((batch, gen_len), np.float32))


def run(preset: str, batch: int, prompt_len: int, gen_len: int, dtype: str, remat: str, micro_batch: int,
        ceilings: Ceilings, group: int = 8) -> dict:
  cfg = get_preset(preset)
  dt = jnp.dtype(dtype)
  model = Qwen25VL(cfg, dtype=dt, param_dtype=dt, remat_policy=remat)
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  rules = sharding.DEFAULT_RULES
  with jax.set_mesh(mesh):
    params = sharding.init_sharded(lambda r: init_params(model, r), jax.random.key(0), mesh, rules)
    tx = make_optimizer(OptimSettings(), 100, params)
    state = new_state(tx, params, mesh)
    objective = PolicyGradientObjective(model=model, logprob_chunk=512)
    step = jax.jit(make_train_step(objective, tx, batch // micro_batch), donate_argnums=0)
    data = jax.tree.map(lambda x: jax.device_put(x, sharding.batch_sharding(mesh, rules, x.ndim, x.shape[0])),
                        synthetic_batch(cfg.text.vocab_size, batch, prompt_len, gen_len))
    holder = {"state": state}

    def one_step():
      holder["state"], metrics = step(holder["state"], data, VisionContext(vision=VisionInputs()))
      return metrics["loss"]

    step_s = best_time(one_step, repeats=3)
    # The rollout that would feed this minibatch: batch / group prompts x group samples.
    sampler = Sampler(model, mesh=mesh)
    prompts = np.asarray(data.input_ids[: max(1, batch // group), :prompt_len])
    inputs = dict(input_ids=prompts, attention_mask=np.ones_like(prompts))
    settings = SamplingSettings(max_new_tokens=gen_len, temperature=1.0)
    rollout_s = best_time(lambda: sampler.generate(holder["state"].params, inputs, jax.random.key(1), settings,
                                                   num_samples=group).tokens, repeats=2)
  read_params, _ = decoder_param_count(model)
  tokens = batch * (prompt_len + gen_len)
  flops = 6 * read_params * tokens
  return {"preset": preset, "dtype": dtype, "remat": remat, "batch": batch, "micro_batch": micro_batch,
          "prompt_len": prompt_len, "gen_len": gen_len, "device": ceilings.device, "step_s": step_s,
          "train_tokens_per_s": tokens / step_s, "mfu": ceilings.compute_time(flops) / step_s,
          "rollout_s": rollout_s, "rollout_fraction": rollout_s / (rollout_s + step_s)}
