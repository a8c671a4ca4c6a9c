"""``python -m chameleon_core params``: the trainable parameters of each regime, consistent across regimes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_core import REGIMES
from chameleon_core.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_params_at_gpt2_small_shape_in_a_subprocess():
    done = subprocess.run(
        [sys.executable, "-m", "chameleon_core", "params", "--model", "random:gpt2", "--rank", "4"],
        cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=120, check=True,
    )
    result = json.loads(done.stdout)
    assert result["base_parameters"] == 124_439_808
    assert result["regimes"]["chameleon"]["head"] == 6_786_596
    assert result["regimes"]["lora-head"]["trainable"] == 204_100
    per_block = (768 + 2304) + (768 + 768) + (768 + 3072) + (3072 + 768)  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert result["regimes"]["lora"]["layers"] == 4 * 12 * per_block == 589_824


@pytest.mark.parametrize("model", ["random:tiny-gpt2", "random:tiny-llama"])
def test_params_are_consistent_across_regimes(model, capsys):
    assert main(["params", "--model", model, "--rank", "4"]) == 0
    regimes = json.loads(capsys.readouterr().out)["regimes"]
    assert list(regimes) == list(REGIMES)
    assert regimes["base"] == {"trainable": 0}
    head, layers = regimes["lora-head"]["head"], regimes["lora"]["layers"]
    assert regimes["lora-head"] == {"trainable": head, "head": head, "layers": 0, "lora_rank": 4}
    assert regimes["lora"]["trainable"] == layers + head and regimes["lora"]["head"] == head
    assert regimes["chameleon"]["layers"] == layers
    d = 64  # both tiny models; hyper d -> 64 -> 32 -> r (d + V): 32 weights + 1 bias per static-head parameter
    assert regimes["chameleon"]["head"] == (d * 64 + 64) + (64 * 32 + 32) + 33 * head
    unit = (layers + head) // 4  # trainable parameters per unit of static rank
    matched = regimes["lora-matched"]
    assert matched["trainable"] == matched["lora_rank"] * unit
    assert abs(matched["trainable"] - regimes["chameleon"]["trainable"]) <= unit / 2  # the closest rank
