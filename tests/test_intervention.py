"""Inference-time intervention: steps of the reasoning, and resuming after a human edit."""

import jax
import numpy as np
import PIL.Image
import pytest

from safework.intervention.edits import edited_prefix, resume_after_edit, split_steps
from safework.models import from_pretrained
from safework.processing import Processor
from safework.sampling import Sampler, SamplingSettings


def test_steps_split_at_delimiters_and_an_edit_drops_what_followed():
  text = "<think>first step.\n\nsecond step.\n\nthird"
  assert split_steps(text) == ["<think>first step.\n\n", "second step.\n\n", "third"]
  assert "".join(split_steps(text, ("\n\n", ". "))) == text
  assert split_steps("a. b\n\nc", ("\n\n", ". ")) == ["a. ", "b\n\n", "c"]
  assert edited_prefix(text, 1, "a safer second step.\n\n") == "<think>first step.\n\na safer second step.\n\n"
  assert edited_prefix(text, 3, " more") == text + " more"   # after the last step: a continuation
  with pytest.raises(ValueError, match="the response has 3 steps; step 4 cannot be replaced"):
    edited_prefix(text, 4, "x")


def test_resuming_after_an_edit_equals_generating_from_the_edited_text(chat_checkpoint, tmp_path):
  """Two rows (one with an image) with edits of different lengths: prefill once, extend by the edits, decode; the
  tokens equal a fresh prefill of prompt + edit."""
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  image = tmp_path / "image.png"
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(image)
  texts = [processor.render([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe"}]}]),
           processor.render([{"role": "user", "content": [{"type": "text", "text": "what colour is the square?"}]}])]
  batch = processor(texts, images=[image])
  edits = ["<think>let me think", "<think>the answer is 4</think> the"]
  settings = SamplingSettings(max_new_tokens=6, temperature=0.0, eos_ids=())
  sampler = Sampler(model)
  prompt = sampler.prefill(params, batch, settings.max_new_tokens, extra_slots=16)
  resumed = resume_after_edit(sampler, params, prompt, processor.tokenizer, edits, settings, jax.random.key(0))

  rows = [np.asarray(ids)[np.asarray(mask) > 0].tolist() + processor.tokenizer.encode(edit, add_special_tokens=False)
          for ids, mask, edit in zip(batch["input_ids"], batch["attention_mask"], edits)]
  width = max(map(len, rows))
  fresh = dict(batch, input_ids=np.array([[0] * (width - len(r)) + r for r in rows], np.int32),
               attention_mask=np.array([[0] * (width - len(r)) + [1] * len(r) for r in rows], np.int32))
  expected = sampler.generate(params, fresh, jax.random.key(0), settings)
  np.testing.assert_array_equal(np.asarray(resumed.tokens), np.asarray(expected.tokens))
  np.testing.assert_allclose(np.asarray(resumed.logprobs), np.asarray(expected.logprobs), atol=1e-4)
  again = resume_after_edit(sampler, params, prompt, processor.tokenizer, edits, settings, jax.random.key(0))
  np.testing.assert_array_equal(np.asarray(again.tokens), np.asarray(resumed.tokens))   # the prompt was kept
  other = resume_after_edit(sampler, params, prompt, processor.tokenizer, ["a cat", "a mat on"], settings,
                            jax.random.key(0))
  assert not np.array_equal(np.asarray(other.logprobs), np.asarray(resumed.logprobs))   # the edit is what it reads
