"""The tiny SafeLadder (runlocal) end to end: data, judges, SFT, three RL stages, evaluation and the report."""

import json

from experiments import tiny_safeladder
from safework.ladder import run_ladder


def test_runlocal_ladder_improves_safety_and_capability_over_sft(tmp_path):
  report = json.loads(run_ladder(tiny_safeladder.get_config("runlocal"), tmp_path).read_text())
  stages = [c["stage"] for c in report["checkpoints"]]
  assert stages == ["sft", "m3rl_kg", "m3rl_svkg", "efficient_rl"]
  sft, final = report["checkpoints"][0], report["checkpoints"][-1]
  assert final["capability"] > sft["capability"], report
  assert final["safety"] > sft["safety"], report
  for name in ("report.md", "ai45.png", "rewards.png"):
    assert (tmp_path / name).stat().st_size > 0
  assert (tmp_path / "stages" / "efficient_rl" / "policy" / "config.json").is_file()
  assert json.loads((tmp_path / "verifiers" / "safety" / "eval.json").read_text())["accuracy"] > 0.8
