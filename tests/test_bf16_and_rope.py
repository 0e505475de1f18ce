"""bf16 numerics against fp32, and the rotary tables against torch."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from safework.models import forward, from_pretrained
from safework.models.rope import inv_frequencies, mrope_cos_sin
from tests import hf_reference as ref

GRIDS = [(1, 4, 6), (1, 10, 14)]


def _arrays():
  return dict(input_ids=np.array([ref.image_prompt(GRIDS, [10, 11, 12, 13, 14])]),
              pixel_values=ref.pixels(GRIDS, 3 * 2 * 14 * 14), image_grid_thw=np.array(GRIDS))


def test_bf16_forward_stays_close_to_fp32_and_to_transformers_bf16(hf_checkpoints):
  path, _ = hf_checkpoints(tied=False)
  fp32 = np.asarray(forward(*from_pretrained(path), **_arrays()))
  bf16 = np.asarray(forward(*from_pretrained(path, dtype=jnp.bfloat16), **_arrays())).astype(np.float32)
  hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.bfloat16,
                                                                       attn_implementation="eager").eval()
  hf_bf16 = ref.hf_forward(hf, **_arrays()).logits.float().numpy()
  scale = np.abs(fp32).max()
  # Measured on this tiny model: 4.3e-3 (0.7% of the largest logit) for ours and for transformers alike.
  assert np.abs(bf16 - fp32).max() < 0.02 * scale
  assert np.abs(bf16 - hf_bf16).max() < 0.02 * scale
  assert (bf16.argmax(-1) == fp32.argmax(-1)).mean() > 0.95


@pytest.mark.parametrize("theta,dim", [(1e6, 128), (1e4, 40), (1e4, 16), (1e6, 16)])
def test_inv_frequencies_are_correctly_rounded_and_within_two_ulp_of_torch(theta, dim):
  ours = inv_frequencies(theta, dim)
  assert ours.dtype == np.float32
  exponents = [float(np.float32(j) / np.float32(dim)) for j in range(0, dim, 2)]   # fp32, as transformers
  exact = [1 / float(theta) ** e for e in exponents]   # Python floats: fp64 pow, independent of numpy's kernels
  np.testing.assert_array_equal(ours, np.array(exact, dtype=np.float32))
  # torch's fp32 pow is not correctly rounded: its vectorised kernels are off by up to 2 ulp on some CPUs.
  torch_table = (1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))).numpy()
  assert np.all(np.abs(ours.view(np.int32) - torch_table.view(np.int32)) <= 2)


def test_mrope_reduces_to_1d_rope_for_text():
  positions = np.broadcast_to(np.arange(7), (3, 2, 7))
  cos, sin = mrope_cos_sin(jnp.asarray(positions), 1e4, 16, (2, 3, 3), jnp.float32)
  angles = np.arange(7)[:, None] * inv_frequencies(1e4, 16)[None]
  np.testing.assert_allclose(np.asarray(cos[0]), np.cos(np.concatenate([angles, angles], -1)), atol=1e-6)
  np.testing.assert_allclose(np.asarray(sin[1]), np.sin(np.concatenate([angles, angles], -1)), atol=1e-6)
