"""Safety benchmarks read in their published formats, judged and scored (`python -m safework.evaluate`)."""

from safework.benchmarks.base import Benchmark, BenchmarkFileError, Item, Judgement
from safework.benchmarks.multimodal import FLAMES, MSSBench, MMSafetyBench, SIUO
from safework.benchmarks.text_suites import AdvBench, DoNotAnswer, HarmBench, StrongREJECT, XSTest

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (
    XSTest(), AdvBench(), HarmBench(), StrongREJECT(), DoNotAnswer(), MMSafetyBench(), MSSBench(), SIUO(), FLAMES())}


def get_benchmark(name: str) -> Benchmark:
  if name not in BENCHMARKS:
    raise ValueError(f"unknown benchmark {name!r}; choose from {', '.join(sorted(BENCHMARKS))}")
  return BENCHMARKS[name]


__all__ = ["BENCHMARKS", "Benchmark", "BenchmarkFileError", "Item", "Judgement", "get_benchmark"]
