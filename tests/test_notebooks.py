"""Notebooks are valid nbformat-4 JSON, their code compiles, and the configs they ablate build."""

import ast
import json
from pathlib import Path

import pytest

from experiments import toy_rl

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_well_formed(path):
  notebook = json.loads(path.read_text())
  assert notebook["nbformat"] == 4 and notebook["cells"]
  for cell in notebook["cells"]:
    if cell["cell_type"] == "code":
      source = "".join(cell["source"])
      ast.parse("\n".join(line for line in source.splitlines() if not line.lstrip().startswith("!")))


def test_ablated_configs_build():
  assert NOTEBOOKS
  for loss in ("cpgd", "ppo", "gspo"):
    assert toy_rl.get_config(f"runlocal,loss={loss}").loss.policy_loss == loss
