r"""Evaluates a checkpoint on safety benchmarks, offline: generate, judge, score, write the tables.

  python -m safework.evaluate --checkpoint DIR --benchmark xstest,strongreject --data /bench/xstest,/bench/sr \
      --workdir OUT [--judge rules|KIND:JUDGE_CHECKPOINT] [--max_examples N] [--config.max_new_tokens=4096 ...]
  python -m safework.evaluate --benchmark xstest --completions FILE --workdir OUT [--judge ...]

Responses are generated greedily with the sharded on-device sampler (the checkpoint's chat template, the
benchmark's images), in batches appended to OUT/NAME/generations.jsonl, so a re-run resumes where it stopped.
With --intervention MODE --intervention_judge KIND:CKPT, responses come from the verifier-guided step search
(`safework.intervention`; its settings under --config.intervention.*). With --completions, the responses of
someone else's model are judged instead (the benchmark's prompt column plus `completion`; XSTest's `final_label`
adds the judge's agreement with the human labels). Every benchmark file is read and checked, and the judge checked
against each benchmark, before any model is loaded.
Writes OUT/NAME/{results.json, responses.jsonl, report.md} and OUT/report.md (one row per benchmark).
"""

from __future__ import annotations

import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from safework.benchmarks.pipeline import default_config, run

_BENCHMARK = flags.DEFINE_list("benchmark", None, "Benchmarks to evaluate (comma-separated).", required=True)
_DATA = flags.DEFINE_list("data", [], "Each benchmark's file or folder, in --benchmark's order.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "The policy: a local Hugging Face checkpoint directory.")
_COMPLETIONS = flags.DEFINE_list("completions", [], "Judge these responses instead of generating (one file per "
                                 "benchmark, in --benchmark's order).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the results go.", required=True)
_JUDGE = flags.DEFINE_string("judge", "rules", "rules, or KIND:CHECKPOINT (a benchmark judge prompt and a local "
                             "Qwen2.5-VL judge checkpoint).")
_INTERVENTION = flags.DEFINE_enum("intervention", None, ["rerank", "mask", "rerank+mask"],
                                  "Generate with the verifier-guided step search (--config.intervention.*).")
_INTERVENTION_JUDGES = flags.DEFINE_multi_string("intervention_judge", [], "KIND:CHECKPOINT verifiers guiding the "
                                                 "step search (a saved verifier or a judge asked the paper's prompt).")
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", None, "Evaluate only the first N items of each benchmark.")
_CONFIG = config_flags.DEFINE_config_dict("config", default_config())


def main(argv) -> None:
  del argv
  from safework import distributed
  distributed.initialize_from_env()
  try:
    run(_BENCHMARK.value, _DATA.value, _CHECKPOINT.value, _COMPLETIONS.value, Path(_WORKDIR.value),
        _JUDGE.value, _MAX_EXAMPLES.value, _CONFIG.value, _INTERVENTION.value, _INTERVENTION_JUDGES.value)
  except (ValueError, OSError) as e:   # a bad file, flag or checkpoint: one line that names it
    logging.error("%s: %s", type(e).__name__, e)
    sys.exit(1)


if __name__ == "__main__":
  logging.use_absl_handler()
  app.run(main)
