"""Notebooks run top to bottom (nbclient, their `runlocal` sizes), and their Colab set-up cell works on a runtime
that has nothing but the notebook: it clones the repository, installs it and makes it importable."""

import json
import os
import subprocess
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _execute(notebook, cwd: Path, timeout: int = 900):
  NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                 resources={"metadata": {"path": str(cwd)}}).execute()
  return notebook


def _printed(notebook) -> str:
  return "".join(o.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs)


# These read a tiny SafeLadder's work directory: the ladder tests run them on their own (`run_notebook`).
LADDER_NOTEBOOKS = ("intervene.ipynb", "safety_aha.ipynb")


def run_notebook(name: str):
  """Executes notebooks/NAME top to bottom and returns its printed text."""
  path = ROOT / "notebooks" / name
  return _printed(_execute(nbformat.read(path, as_version=4), cwd=path.parent))


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name not in LADDER_NOTEBOOKS], ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path, monkeypatch):
  monkeypatch.setenv("SAFEWORK_NOTEBOOK_ROLLOUTS", "2")   # the ablation's runs, short: they run, the toy test learns
  notebook = _execute(nbformat.read(path, as_version=4), cwd=path.parent)
  if path.name == "ablate_losses.ipynb":
    assert all(f"{loss}: mean reward" in _printed(notebook) for loss in ("cpgd", "ppo", "gspo"))
  if path.name == "safety_eval.ipynb":   # no checkpoint given: XSTest's GPT-4 completions, judged by the rules
    assert "judge vs humans: binary 98.2%" in _printed(notebook) and "categories drawn: 18" in _printed(notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_colab_set_up_cell_clones_installs_and_imports(path, tmp_path, monkeypatch):
  if not (ROOT / ".git").exists():
    pytest.skip("the set-up cell clones the repository: this checkout is not a git repository")
  first = next(c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
  fake_bin = tmp_path / "bin"
  fake_bin.mkdir()
  (fake_bin / "pip").write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'pip.log'}\n")   # no network on CI
  (fake_bin / "pip").chmod(0o755)
  monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
  monkeypatch.setenv("SAFEWORK_REPO", str(ROOT))
  colab = ("import sys, types\n"   # what a Colab runtime has and a checkout does not
           "sys.modules['google.colab'] = types.ModuleType('google.colab')")
  check = ("import os, safework, experiments\n"
           "print('cwd', os.getcwd()); print('package', safework.__file__)\n"
           "print('experiments', list(experiments.__path__)[0])")
  notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(colab), nbformat.v4.new_code_cell(
      "".join(first["source"])), nbformat.v4.new_code_cell(check)])
  printed = _printed(_execute(notebook, cwd=tmp_path, timeout=300))
  clone = tmp_path / "safework-jax"
  assert f"cwd {clone}" in printed and f"package {clone / 'safework'}" in printed
  assert f"experiments {clone / 'experiments'}" in printed
  assert (tmp_path / "pip.log").read_text().split() == ["install", "-q", "-e", "safework-jax"]
  head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
  assert head == subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout
