"""An analysis on disk: mi.json (every response's tokens, MI and peaks; a summary per layer) and its figures."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from safework.analysis.peaks import PeakStatistics, peak_statistics
from safework.analysis.plots import plot_curves, plot_peak_words
from safework.analysis.responses import AnalysisSettings, ResponseMI


def summary(responses: list[ResponseMI], layer: int) -> PeakStatistics:
  return peak_statistics([r.peak_tokens(layer) for r in responses])


def write_analysis(workdir: Path, checkpoint: str, responses: list[ResponseMI], settings: AnalysisSettings
                   ) -> dict:
  """mi.json and the two figures (of the first analysed layer); returns the JSON's summary."""
  workdir.mkdir(parents=True, exist_ok=True)
  layers = sorted(responses[0].mi) if responses else []
  stats = {layer: summary(responses, layer) for layer in layers}
  result = {"checkpoint": checkpoint, "settings": dataclasses.asdict(settings),
            "summary": {str(layer): dataclasses.asdict(s) for layer, s in stats.items()},
            "responses": [{"question": r.question, "response": r.response, "tokens": list(r.tokens),
                           "mi": {str(k): list(v) for k, v in r.mi.items()},
                           "peaks": {str(k): list(v) for k, v in r.peaks.items()}} for r in responses]}
  (workdir / "mi.json").write_text(json.dumps(result, indent=1))
  if layers:
    plot_curves(responses, layers[0], workdir / "mi_curves.png")
    plot_peak_words({f"layer {layer}": s for layer, s in stats.items()}, workdir / "peak_words.png")
  return result["summary"]
