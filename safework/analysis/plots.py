"""Figures of the aha-moment analysis: MI over a response's tokens with its peaks named, and the words at peaks.

No backend is chosen here, so a notebook keeps its inline one; headless, matplotlib falls back to Agg."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt

from safework.analysis.peaks import PeakStatistics, word
from safework.analysis.responses import ResponseMI


def draw_curve(ax, response: ResponseMI, layer: int, title: str) -> None:
  """One response's MI over its tokens on `ax`, each peak marked with its word."""
  mi = response.mi[layer]
  ax.plot(range(len(mi)), mi, lw=1.2)
  for position in response.peaks[layer]:
    ax.plot(position, mi[position], "o", color="crimson")
    ax.annotate(word(response.tokens[position]) or response.tokens[position], (position, mi[position]),
                textcoords="offset points", xytext=(0, 4), ha="center", fontsize=8, color="crimson")
  ax.set_ylabel("MI")
  ax.set_title(title[:90], fontsize=9)


def plot_curves(responses: Sequence[ResponseMI], layer: int, path: Path, count: int = 4) -> None:
  """MI over positions for the first `count` responses, one panel each, titled by their questions."""
  shown = list(responses)[:count]
  fig, axes = plt.subplots(len(shown), 1, figsize=(9, 2.2 * max(len(shown), 1)), squeeze=False)
  for ax, response in zip(axes[:, 0], shown):
    draw_curve(ax, response, layer, response.question)
  axes[-1, 0].set_xlabel(f"response token (layer {layer})")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def plot_peak_words(stats: dict[str, PeakStatistics], path: Path) -> None:
  """The most frequent words at MI peaks, one bar chart per named set of responses (e.g. per checkpoint)."""
  fig, axes = plt.subplots(1, len(stats), figsize=(4.5 * len(stats), 3.2), squeeze=False)
  for ax, (name, s) in zip(axes[0], stats.items()):
    words = [w for w, _ in s.top_tokens][:12]
    ax.barh(words[::-1], [c for _, c in s.top_tokens][:12][::-1], color="steelblue")
    ax.set_title(f"{name}: {s.mean_peaks_per_response:.2f} peaks/response, {s.safety_share:.0%} safety words",
                 fontsize=9)
    ax.set_xlabel("count at peaks")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
