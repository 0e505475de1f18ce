"""The `python -m safework.sample` entry point and the text helpers it uses."""

import ast
import re
import subprocess
import sys

import jax
import numpy as np
import PIL.Image

from safework.models import from_pretrained
from safework.processing import Processor
from safework.sampling import Sampler, SamplingSettings
from safework.sampling.text import cut_at_stop, decode_rows, stop_sequences


def test_stop_strings_become_token_sequences(tiny_tokenizer):
  sequences = stop_sequences(tiny_tokenizer, ["</think>", "answer"])
  assert sequences and all(isinstance(t, int) for s in sequences for t in s)
  assert tiny_tokenizer.decode(list(sequences[0])) == "</think>"
  assert cut_at_stop("abc</think> tail", ["</think>"]) == ("abc</think>", True)
  assert cut_at_stop("no stop", ["</think>"]) == ("no stop", False)


def test_cli_prints_the_greedy_completion(chat_checkpoint, tmp_path):
  image = tmp_path / "image.png"
  PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(image)
  result = subprocess.run(
      [sys.executable, "-m", "safework.sample", f"--checkpoint={chat_checkpoint}", "--prompt=describe the picture",
       f"--image={image}", "--max_new_tokens=6", "--temperature=0", "--dtype=float32"],
      capture_output=True, timeout=300, check=True)
  model, params = from_pretrained(chat_checkpoint)
  processor = Processor.from_pretrained(chat_checkpoint)
  text = processor.render([{"role": "user", "content": [{"type": "image"},
                                                       {"type": "text", "text": "describe the picture"}]}])
  settings = SamplingSettings(max_new_tokens=6, temperature=0.0, eos_ids=(2,), pad_id=0)
  output = Sampler(model).generate(params, processor([text], images=[image]), jax.random.key(0), settings)
  assert result.stdout == (decode_rows(processor.tokenizer, output.tokens, output.lengths)[0] + "\n").encode()


def _sample(checkpoint, *flags, stdin=None):
  return subprocess.run([sys.executable, "-m", "safework.sample", f"--checkpoint={checkpoint}", "--prompt=a cat",
                         "--dtype=float32", *flags], input=stdin, capture_output=True, text=True, timeout=300)


def test_cli_searches_lets_a_person_review_each_step_then_resumes_after_an_edit(chat_checkpoint):
  """--intervene prints each chosen step with its score (the checkpoint judging itself with the paper's safety
  prompt); --interactive takes scripted input (keep step 0, rewrite step 1, then end of input: the rest kept);
  --edit_step then rewrites step 0 of the response and generation resumes from the person's text."""
  result = _sample(chat_checkpoint, "--intervene=rerank", f"--judge=safety:{chat_checkpoint}", "--candidates=3",
                   "--step_tokens=2", "--max_new_tokens=6", "--interactive", "--edit_step=0", "--replace=a mat",
                   stdin="\na cat\n")
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stderr.count("[enter] keep, or type the replacement") >= 3
  steps = re.findall(r"step (\d): score [0-9.]+ \((best of 3|edited)\)", result.stderr)
  assert steps[:2] == [("0", "best of 3"), ("1", "edited")], result.stderr[-2000:]
  before = re.search(r"before the edit: (.*)", result.stderr).group(1)
  assert "a cat" in ast.literal_eval(before) and "tokens sampled for a response of" in result.stderr
  assert result.stdout.startswith("a mat")
