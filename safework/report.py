"""The run report: `report.json` (machine-readable), `report.md` with plots (the AI-45° trajectory, the reward
curves per component, and where the test split asks search questions, accuracy and calibration with the search
tool per checkpoint) for people."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from safework.analysis.peaks import PeakStatistics  # noqa: E402
from safework.analysis.plots import plot_peak_words  # noqa: E402


SEARCH_METRICS = ("search_accuracy", "false_certain_rate", "ece", "searches_per_answer")


def _finite(value) -> bool:
  return isinstance(value, (int, float)) and math.isfinite(value)


def _name(checkpoint: dict) -> str:
  """A checkpoint's row name: its stage, and the inference-time intervention it was evaluated with, if any."""
  return checkpoint["stage"] + (f" + {checkpoint['intervention']}" if checkpoint.get("intervention") else "")


def plot_ai45(checkpoints: Sequence[dict], path: Path) -> None:
  """Capability (x) against safety (y) per checkpoint, in training order, with the 45° diagonal; evaluations with
  an inference-time intervention are stars, an arrow from the same checkpoint without it."""
  fig, ax = plt.subplots(figsize=(5, 5))
  trained = [c for c in checkpoints if not c.get("intervention")]
  xs = [c["capability"] for c in trained]
  ys = [c["safety"] for c in trained]
  ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="AI-45° diagonal")
  ax.plot(xs, ys, "-o", color="tab:blue", label="checkpoints")
  for i, (c, x, y) in enumerate(zip(trained, xs, ys)):
    ax.annotate(c["stage"], (x, y), textcoords="offset points", xytext=(6, 8 - 12 * (i % 2)), fontsize=8)
  plain = {c["stage"]: c for c in trained}
  intervened = [c for c in checkpoints if c.get("intervention")]
  for i, c in enumerate(intervened):
    ax.plot(c["capability"], c["safety"], "*", color="tab:orange", ms=12, label="with intervention" if i == 0 else None)
    if c["stage"] in plain:
      base = plain[c["stage"]]
      ax.annotate("", (c["capability"], c["safety"]), (base["capability"], base["safety"]),
                  arrowprops=dict(arrowstyle="->", color="tab:orange", lw=1))
    ax.annotate(_name(c), (c["capability"], c["safety"]), textcoords="offset points", xytext=(-4, 9), fontsize=8,
                color="tab:orange", ha="right" if c["capability"] > 0.5 else "left")
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="capability (test accuracy)", ylabel="safety (test)",
         title="Capability and safety per checkpoint")
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_rewards(curves: dict[str, list[dict]], path: Path) -> None:
  """Mean reward per component over the RL steps of every stage, stages side by side."""
  fig, ax = plt.subplots(figsize=(8, 4))
  offset, colours = 0, {}
  for stage, rows in curves.items():
    rows = [r for r in rows if any(k.startswith("reward/") for k in r)]
    if not rows:
      continue
    names = sorted({k for r in rows for k in r if k.startswith("reward/") and k != "reward/with_kl_penalty"})
    for name in names:
      points = [(offset + r["step"], r[name]) for r in rows if _finite(r.get(name))]
      if points:
        first = name not in colours
        colours.setdefault(name, f"C{len(colours) % 10}")
        ax.plot(*zip(*points), color=colours[name], lw=1, label=name[len("reward/"):] if first else None)
    last = max(r["step"] for r in rows)
    ax.text(offset + 0.5, 0.02, stage, transform=ax.get_xaxis_transform(), fontsize=7, color="grey")
    ax.axvline(offset + last, color="grey", lw=0.5)
    offset += last
  ax.set(xlabel="RL step (stages in order)", ylabel="mean reward", title="Reward components")
  if colours:
    ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_search(checkpoints: Sequence[dict], path: Path) -> None:
  """Search accuracy, false-certain rate, ECE and tool calls per answer of each checkpoint, in training order."""
  rows = [c for c in checkpoints if not c.get("intervention") and "search_accuracy" in c]
  fig, ax = plt.subplots(figsize=(6, 4))
  x = range(len(rows))
  for i, metric in enumerate(SEARCH_METRICS):
    ax.plot(x, [c[metric] for c in rows], "-o", color=f"C{i}", label=metric.replace("_", " "))
  ax.set_xticks(list(x), [c["stage"] for c in rows], rotation=20, fontsize=8)
  ax.set(ylabel="rate (calls per answer for searches)", title="Search questions, with the search tool at hand")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def write_report(workdir: str | Path, checkpoints: Sequence[dict], curves: dict[str, list[dict]],
                 aha: dict[str, dict] | None = None) -> Path:
  """report.json, report.md and the figures; `aha`: each analysed stage's MI-peak summary (`safework.analysis`)."""
  workdir = Path(workdir)
  aha = aha or {}
  (workdir / "report.json").write_text(json.dumps({"checkpoints": list(checkpoints), **({"aha": aha} if aha else {})},
                                                  indent=2) + "\n")
  plot_ai45(checkpoints, workdir / "ai45.png")
  plot_rewards(curves, workdir / "rewards.png")
  keys = [k for k in ("capability", "safety", "value", "format", "response_tokens") if k in checkpoints[0]]
  keys += [k for k in ("generated_tokens", "seconds_per_answer", *SEARCH_METRICS) if any(k in c for c in checkpoints)]
  lines = ["# SafeLadder run report", "", "| stage | step | " + " | ".join(keys) + " |",
           "|---|---|" + "---|" * len(keys)]
  for c in checkpoints:
    lines.append(f"| {_name(c)} | {c['step']} | " + " | ".join(f"{c.get(k, float('nan')):.3f}" for k in keys) + " |")
  tasks = sorted({k for c in checkpoints for k in c if k.startswith("task/")})
  if tasks:
    lines += ["", "Per task (accuracy):", "", "| stage | " + " | ".join(t[5:] for t in tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    for c in checkpoints:
      lines.append(f"| {_name(c)} | " + " | ".join(f"{c.get(t, float('nan')):.2f}" for t in tasks) + " |")
  lines += ["", "![AI-45° trajectory](ai45.png)", "", "![Reward components](rewards.png)", ""]
  if any("search_accuracy" in c for c in checkpoints):
    plot_search(checkpoints, workdir / "search.png")
    lines += ["![Search accuracy and calibration](search.png)", ""]
  if aha:
    plot_peak_words({stage: PeakStatistics(**{**s, "top_tokens": tuple(map(tuple, s["top_tokens"]))})
                     for stage, s in aha.items()}, workdir / "aha_peaks.png")
    lines += ["## Safety aha moment", "", "MI peaks of each token's hidden state against the refusal, on the test "
              "split's harmful prompts (`aha/<stage>/mi.json`, `mi_curves.png`):", "",
              "| stage | responses | peaks per response | safety words at peaks | top peak words |",
              "|---|---|---|---|---|"]
    for stage, s in aha.items():
      top = ", ".join(f"{w} ({c})" for w, c in s["top_tokens"][:5])
      lines.append(f"| {stage} | {s['responses']} | {s['mean_peaks_per_response']:.2f} | {s['safety_share']:.0%} | "
                   f"{top} |")
    lines += ["", "![Words at MI peaks](aha_peaks.png)", ""]
  (workdir / "report.md").write_text("\n".join(lines))
  return workdir / "report.json"
