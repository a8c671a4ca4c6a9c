"""`reproduce --profile tiny` end to end, and the README tables staying in sync with committed results."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_core.reproduce import ABLATIONS, HEADLINE, SHUFFLED, write_readme_results

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("reproduce")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny models: a second thread only adds synchronisation
    subprocess.run([sys.executable, "-m", "chameleon_core", "reproduce", "--profile", "tiny", "--out", str(out)],
                   check=True, capture_output=True, text=True, env=env)
    return out


def test_reproduce_tiny_writes_both_tables_and_curves(tiny_results):
    results = json.loads((tiny_results / "results.json").read_text())
    assert set(results["protocols"]) == {"paper", "causal"}
    for protocol, block in results["protocols"].items():
        assert set(block["table"]) == set(HEADLINE) | set(ABLATIONS) | {SHUFFLED}
        assert (tiny_results / f"curves-{protocol}.html").is_file()
    markdown = (tiny_results / "results.md").read_text()
    assert markdown.count("| lora-head |") == 2 and "of the scored targets are padding" in markdown


def test_reproduce_tiny_shows_the_copy_task_and_a_real_gain(tiny_results):
    results = json.loads((tiny_results / "results.json").read_text())
    paper, causal = results["protocols"]["paper"], results["protocols"]["causal"]
    assert paper["padding_share"]["test"] > 0.9
    # under the published protocol a head adapter learns to copy EOS almost at once
    assert paper["table"]["lora-head"]["val_loss"]["mean"] < paper["table"]["base"]["val_loss"]["mean"] - 0.5
    # under the correct protocol both adapted regimes beat the base model on held-out text
    for regime in ("lora", "chameleon"):
        assert causal["table"][regime]["val_loss"]["mean"] < causal["table"]["base"]["val_loss"]["mean"]
    assert causal["table"]["chameleon"]["trainable_parameters"] > causal["table"]["lora"]["trainable_parameters"]


def test_readme_results_are_generated_from_the_committed_results(tmp_path):
    folders = sorted(p.parent for p in (ROOT / "assets" / "results").glob("*/results.md"))
    if not folders:
        pytest.skip("no committed results yet")
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    write_readme_results(copy, folders)
    assert copy.read_text() == (ROOT / "README.md").read_text(), "run `python -m chameleon_core report assets/results/*/`"
