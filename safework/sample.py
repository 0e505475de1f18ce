r"""Try a checkpoint: prints the completion of one prompt on stdout (logs go to stderr).

  python -m safework.sample --checkpoint /path/to/Qwen2.5-VL-7B-Instruct --prompt "What is shown?" \
      --image cat.jpg --max_new_tokens 128 --temperature 0.7 --top_p 0.9

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

from safework.models import from_pretrained
from safework.models.checkpoint import load_config
from safework.processing import Processor, Video
from safework.processing.image import load_image, to_rgb
from safework.sampling import Sampler, SamplingSettings
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


def main(argv):
  del argv
  processor = Processor.from_pretrained(_CHECKPOINT.value)   # the cheap checks come before the weights
  positions = load_config(_CHECKPOINT.value).text.max_position_embeddings
  content = ([{"type": "image"}] * len(_IMAGES.value) + [{"type": "video"}] * len(_VIDEOS.value) +
             [{"type": "text", "text": _PROMPT.value}])
  text = processor.render([{"role": "user", "content": content}])
  batch = processor([text], images=_IMAGES.value, videos=[load_video(v, _VIDEO_FPS.value) for v in _VIDEOS.value])
  check_lengths(batch["input_ids"].shape[1], _MAX_NEW.value, positions)
  logging.info("loading %s", _CHECKPOINT.value)
  model, params = from_pretrained(_CHECKPOINT.value, dtype=jnp.dtype(_DTYPE.value))
  tokenizer = processor.tokenizer
  eos = model.config.eos_token_id
  eos_ids = tuple(eos) if isinstance(eos, tuple) else (eos,) if eos is not None else ()
  settings = SamplingSettings(
      max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_p=_TOP_P.value, top_k=_TOP_K.value,
      eos_ids=tuple(sorted({*eos_ids, tokenizer.eos_token_id} - {None})),
      stop_sequences=stop_sequences(tokenizer, _STOP.value), pad_id=tokenizer.pad_token_id,
      vocab_limit=len(tokenizer)).validate()
  logging.info("prompt of %d tokens; generating up to %d", batch["input_ids"].shape[1], settings.max_new_tokens)
  output = Sampler(model).generate(params, batch, jax.random.key(_SEED.value), settings)
  sys.stdout.write(decode_rows(tokenizer, output.tokens, output.lengths, _STOP.value)[0] + "\n")


def _main(argv):
  try:
    main(argv)
  except (ValueError, OSError) as e:   # a bad prompt, length, image or checkpoint: one line with the fix
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)


if __name__ == "__main__":
  logging.use_absl_handler()
  app.run(_main)
