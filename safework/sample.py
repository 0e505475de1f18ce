r"""Try a checkpoint: prints the completion of one prompt on stdout (logs, steps and scores go to stderr).

  python -m safework.sample --checkpoint /path/to/Qwen2.5-VL-7B-Instruct --prompt "What is shown?" \
      --image cat.jpg --max_new_tokens 128 --temperature 0.7 --top_p 0.9

Inference-time intervention (`safework.intervention`): `--intervene rerank|mask|rerank+mask --judge KIND:CKPT`
searches the reasoning step by step (steps end at --delimiter), keeping the best of --candidates per step as the
judges score it, and prints each chosen step with its score; `--edit_step K --replace TEXT` rewrites step K of the
response and resumes generation after it; `--interactive` shows each step and lets a person keep it (enter) or
type its replacement (write a newline as \n).

A video is a directory of frame images (sorted by name) or a .npy array [F, H, W, 3] uint8, captured at
--video_fps frames per second.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from safework.data.example import Example
from safework.intervention.edits import edited_prefix, resume_after_edit
from safework.intervention.judges import load_guides, parse_guides
from safework.intervention.search import StepSearch
from safework.intervention.settings import MODES, SearchSettings
from safework.models import from_pretrained
from safework.models.checkpoint import load_config
from safework.processing import Processor, Video
from safework.processing.image import load_image, to_rgb
from safework.sampling import Sampler, SamplingSettings, bucket_length
from safework.sampling.masks import BannedSequences
from safework.sampling.text import decode_rows, stop_sequences

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Local Hugging Face checkpoint directory.", required=True)
_PROMPT = flags.DEFINE_string("prompt", None, "The user message.", required=True)
_IMAGES = flags.DEFINE_multi_string("image", [], "Image files, shown before the prompt in order.")
_VIDEOS = flags.DEFINE_multi_string("video", [], "Videos: a directory of frames or a .npy [F, H, W, 3] array.")
_VIDEO_FPS = flags.DEFINE_float("video_fps", 2.0, "Frame rate the video frames were captured at.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 is greedy.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Sample among the k most likely tokens.")
_STOP = flags.DEFINE_multi_string("stop", [], "Stop strings.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute and parameter dtype.")
_INTERVENE = flags.DEFINE_enum("intervene", None, list(MODES), "Verifier-guided step search.")
_JUDGES = flags.DEFINE_multi_string("judge", [], "KIND:CHECKPOINT verifiers guiding the search (equal weights).")
_CANDIDATES = flags.DEFINE_integer("candidates", None, "Candidates per step (rerank; default 4).")
_BEAM = flags.DEFINE_integer("beam", 1, "Steps kept per step (1: greedy step selection).")
_THRESHOLD = flags.DEFINE_float("threshold", None, "mask: resample a step whose candidates all score below this.")
_RESAMPLES = flags.DEFINE_integer("resamples", 2, "mask: resamples per step at most.")
_LOOKAHEAD = flags.DEFINE_bool("lookahead", False, "Score a candidate step by its greedy completion.")
_DELIMITERS = flags.DEFINE_multi_string("delimiter", ["\\n\\n"], "Step delimiters (\\n for a newline).")
_STEP_TOKENS = flags.DEFINE_integer("step_tokens", 64, "Tokens of one step at most.")
_BAN = flags.DEFINE_multi_string("ban", [], "Strings never to emit.")
_EDIT_STEP = flags.DEFINE_integer("edit_step", None, "Replace this step (0-based) of the response with --replace.")
_REPLACE = flags.DEFINE_string("replace", None, "The text of the edited step (\\n for a newline).")
_INTERACTIVE = flags.DEFINE_bool("interactive", False, "Show each step; keep it (enter) or type its replacement.")


def load_video(path: str, fps: float) -> Video:
  p = Path(path)
  if p.is_dir():
    frames = np.stack([np.asarray(to_rgb(load_image(f))) for f in sorted(p.iterdir()) if f.is_file()])
  elif p.suffix == ".npy":
    frames = np.load(p, allow_pickle=False)
  else:
    raise ValueError(f"--video {path}: give a directory of frame images or a .npy array (video files need a decoder "
                     "this project does not ship)")
  return Video(frames, fps)


def check_lengths(prompt_tokens: int, max_new_tokens: int, positions: int) -> None:
  """The prompt and the tokens to generate must fit the model's positions."""
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens}: generate at least one token")
  if prompt_tokens + max_new_tokens > positions:
    room = positions - prompt_tokens
    fix = f"lower --max_new_tokens to at most {room}" if room > 0 else "shorten the prompt or use fewer/smaller images"
    raise ValueError(f"the prompt has {prompt_tokens} tokens (images expanded) and --max_new_tokens={max_new_tokens}, "
                     f"more than the model's {positions} positions: {fix}")


def _unescape(text: str) -> str:
  return text.replace("\\n", "\n")


def _search_settings(temperature: float, top_p: float) -> SearchSettings | None:
  """The step search the flags ask for (None: plain decoding); checked before anything is loaded."""
  delimiters = tuple(_unescape(d) for d in _DELIMITERS.value)
  if (_EDIT_STEP.value is None) != (_REPLACE.value is None):
    raise ValueError("--edit_step and --replace go together: the step to rewrite and its new text")
  if _INTERVENE.value is None:
    if _JUDGES.value:
      raise ValueError("--judge guides a step search: add --intervene rerank|mask|rerank+mask")
    if not _INTERACTIVE.value:
      return None
    return SearchSettings(candidates=1, delimiters=delimiters, step_tokens=_STEP_TOKENS.value, recipes=(),
                          temperature=temperature, top_p=top_p, banned=tuple(_BAN.value)).validate()
  if not _JUDGES.value:
    raise ValueError(f"--intervene {_INTERVENE.value} needs a verifier: --judge KIND:CHECKPOINT")
  recipe = tuple((kind, 1.0) for kind in parse_guides(_JUDGES.value))
  return SearchSettings.for_mode(
      _INTERVENE.value, candidates=_CANDIDATES.value, threshold=_THRESHOLD.value, beam=_BEAM.value,
      delimiters=delimiters, step_tokens=_STEP_TOKENS.value, resamples=_RESAMPLES.value, lookahead=_LOOKAHEAD.value,
      recipes=(("*", recipe),), temperature=temperature if temperature > 0 else 1.0, top_p=top_p,
      banned=tuple(_BAN.value))


def _scored(score: float) -> str:
  return f"score {score:.3f}" if _JUDGES.value else "not judged"


def _ask(prompt: int, step: int, text: str, score: float) -> str | None:
  """A person's review at the terminal: enter keeps the step, a line of text replaces it."""
  sys.stderr.write(f"step {step} ({_scored(score)}): {text!r}\n[enter] keep, or type the replacement: ")
  sys.stderr.flush()
  line = sys.stdin.readline()
  return _unescape(line.rstrip("\n")) if line.strip() else None


def _show(result) -> None:
  for i, step in enumerate(result.steps):
    note = " (edited)" if step.edited else f" (best of {len(step.candidates)}" + (
        f", resampled {step.resampled}x)" if step.resampled else ")")
    sys.stderr.write(f"step {i}: {_scored(step.score)}{note}: {step.text!r}\n")
  sys.stderr.write(f"{result.generated_tokens} tokens sampled for a response of {len(result.tokens)}\n")


def main(argv):
  del argv
  search_settings = _search_settings(_TEMPERATURE.value, _TOP_P.value)   # the cheap checks come before the weights
  guides = parse_guides(_JUDGES.value)
  processor = Processor.from_pretrained(_CHECKPOINT.value)
  positions = load_config(_CHECKPOINT.value).text.max_position_embeddings
  content = ([{"type": "image"}] * len(_IMAGES.value) + [{"type": "video"}] * len(_VIDEOS.value) +
             [{"type": "text", "text": _PROMPT.value}])
  text = processor.render([{"role": "user", "content": content}])
  batch = processor([text], images=_IMAGES.value, videos=[load_video(v, _VIDEO_FPS.value) for v in _VIDEOS.value])
  check_lengths(batch["input_ids"].shape[1], _MAX_NEW.value, positions)
  logging.info("loading %s", _CHECKPOINT.value)
  dtype = jnp.dtype(_DTYPE.value)
  model, params = from_pretrained(_CHECKPOINT.value, dtype=dtype)
  tokenizer = processor.tokenizer
  eos = model.config.eos_token_id
  eos_ids = tuple(eos) if isinstance(eos, tuple) else (eos,) if eos is not None else ()
  banned = stop_sequences(tokenizer, _BAN.value)
  settings = SamplingSettings(
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
      eos_ids=tuple(sorted({*eos_ids, tokenizer.eos_token_id} - {None})),
      stop_sequences=stop_sequences(tokenizer, _STOP.value), pad_id=tokenizer.pad_token_id,
      vocab_limit=len(tokenizer),
      logits_processor=BannedSequences(banned) if banned and search_settings is None else None).validate()
  logging.info("prompt of %d tokens; generating up to %d", batch["input_ids"].shape[1], settings.max_new_tokens)
  sampler, rng = Sampler(model), jax.random.key(_SEED.value)
  edit_slots = bucket_length(_MAX_NEW.value, minimum=1) if _EDIT_STEP.value is not None or _INTERACTIVE.value else 0
  if search_settings is None:
    output = sampler.generate(params, batch, rng, settings)
    response = decode_rows(tokenizer, output.tokens, output.lengths, _STOP.value)[0]
  else:
    example = Example(question=_PROMPT.value, images=tuple(_IMAGES.value), videos=tuple(
        load_video(v, _VIDEO_FPS.value) for v in _VIDEOS.value))
    search = StepSearch(sampler, tokenizer, load_guides(guides, dtype=dtype), search_settings, settings)
    (result,) = search.run(params, batch, [example], rng, _ask if _INTERACTIVE.value else None, edit_slots)
    _show(result)
    response = result.response
  if _EDIT_STEP.value is not None:
    edited = edited_prefix(response, _EDIT_STEP.value, _unescape(_REPLACE.value),
                           tuple(_unescape(d) for d in _DELIMITERS.value))
    sys.stderr.write(f"before the edit: {response!r}\n")
    prompt = sampler.prefill(params, batch, settings.max_new_tokens, extra_slots=edit_slots)
    resumed = resume_after_edit(sampler, params, prompt, tokenizer, [edited], settings.replace(
        max_new_tokens=max(1, settings.max_new_tokens - len(tokenizer.encode(edited, add_special_tokens=False)))),
        rng)
    response = edited + decode_rows(tokenizer, resumed.tokens, resumed.lengths, _STOP.value)[0]
  sys.stdout.write(response + "\n")


def _main(argv):
  try:
    main(argv)
  except (ValueError, OSError) as e:   # a bad prompt, length, image or checkpoint: one line with the fix
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)


if __name__ == "__main__":
  logging.use_absl_handler()
  app.run(_main)
