r"""The safety "aha moment" of a checkpoint: per-token mutual information of its responses, and the MI peaks.

  python -m safework.analyze --checkpoint /runs/efficient_7b/policy --data prompts.jsonl --workdir /tmp/aha \
      [--layers -1 --layers 14] [--max_new_tokens 256] [--harmful_only]

Generates greedily on the prompts of --data (JSONL rows {"question", "reference"?, "harmful"?, "images"?}),
scores each response token's hidden state at each --layers against the reference answer's (normalised HSIC,
`safework.analysis`), finds the peaks, and writes to --workdir: mi.json (every response's tokens, MI and peaks; a
summary per layer), mi_curves.png (MI over positions for the first responses, peak words marked) and
peak_words.png (the most frequent words at peaks).
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from absl import app, flags, logging

from safework.analysis.data import read_prompts
from safework.analysis.output import write_analysis
from safework.analysis.responses import AnalysisSettings, analyze

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Local Hugging Face checkpoint directory.", required=True)
_DATA = flags.DEFINE_string("data", None, "JSONL prompts: question, reference?, harmful?, images?.", required=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where mi.json and the figures go.", required=True)
_LAYERS = flags.DEFINE_multi_integer("layers", [-1], "Decoder layers to analyse (negative: from the last).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Response tokens at most.")
_BATCH = flags.DEFINE_integer("batch_size", 16, "Prompts per generation and hidden-state pass.")
_THRESHOLD = flags.DEFINE_float("threshold", 2.0, "A peak exceeds the response's mean MI by this many stds.")
_HARMFUL_ONLY = flags.DEFINE_bool("harmful_only", False, "Analyse only the rows not marked harmful=false.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "Compute and parameter dtype.")


def main(argv) -> None:
  del argv
  from safework.models import from_pretrained
  from safework.processing import Processor
  prompts = read_prompts(_DATA.value, _HARMFUL_ONLY.value)   # every row checked before the weights load
  processor = Processor.from_pretrained(_CHECKPOINT.value)
  model, params = from_pretrained(_CHECKPOINT.value, dtype=jnp.dtype(_DTYPE.value))
  settings = AnalysisSettings(layers=tuple(_LAYERS.value), max_new_tokens=_MAX_NEW.value,
                              batch_size=_BATCH.value, threshold=_THRESHOLD.value)
  responses = analyze(model, params, processor, [p.example for p in prompts], [p.reference for p in prompts],
                      settings)
  stats = write_analysis(Path(_WORKDIR.value), _CHECKPOINT.value, responses, settings)
  for layer, s in stats.items():
    logging.info("layer %s: %.2f peaks per response, %.0f%% of peak words are safety words; top: %s", layer,
                 s["mean_peaks_per_response"], 100 * s["safety_share"], s["top_tokens"][:8])


if __name__ == "__main__":
  app.run(main)
