"""Paired comparisons: the bootstrap interval, its verdict words, and README's intervals recomputed from the
committed per-row losses."""

import json
from pathlib import Path

import numpy as np
import pytest

from chameleon_core.paired import DELTA, describe, paired_difference, read_rows, verdict

ROOT = Path(__file__).resolve().parents[1]


def rows(losses, targets=None, keys=None) -> dict:
    targets = targets or [1] * len(losses)
    return {"keys": keys or [f"k{i}" for i in range(len(losses))], "loss": list(losses), "targets": list(targets)}


def test_a_constant_shift_on_every_row_gives_that_shift_with_a_zero_width_interval():
    rng = np.random.default_rng(0)
    base = rng.uniform(1, 3, 200)
    found = paired_difference({s: rows(base - 0.01) for s in (0, 1, 2)}, {s: rows(base) for s in (0, 1, 2)})
    assert found["diff"] == pytest.approx(-0.01) and found["low"] == pytest.approx(-0.01) and found["high"] == pytest.approx(-0.01)
    assert (found["seeds"], found["rows"], found["paired_by"]) == (3, 200, "seed and row")


def test_pairing_removes_what_rows_share_so_a_small_shift_is_found_under_large_row_to_row_variation():
    rng = np.random.default_rng(1)
    base = rng.uniform(0, 10, 300)  # rows differ by nats; the arms differ by 0.02 +- 0.01 on each row
    shifted = base - 0.02 + rng.normal(0, 0.01, 300)
    found = paired_difference({0: rows(shifted)}, {0: rows(base)})
    assert found["high"] < 0 and verdict(found["low"], found["high"]) == "better"
    assert found["low"] == pytest.approx(-0.02, abs=0.003)


def test_rows_pair_by_key_and_token_weighting_follows_each_arms_targets():
    a = rows([2.0, 6.0, 9.0], [1, 3, 1], ["x-0", "y-0", "z-0"])  # per token: row y has 2 nats per token
    b = rows([3.0, 1.0], [3, 1], ["y-0", "x-0"])  # b dropped row z; the order differs
    found = paired_difference({0: a}, {0: b})
    assert found["rows"] == 2 and found["diff"] == pytest.approx(8 / 4 - 4 / 4)


def test_one_run_of_the_reference_pairs_with_every_seed_by_row():
    found = paired_difference({0: rows([1.0, 2.0]), 1: rows([1.2, 2.2])}, {0: rows([1.5, 2.5])})
    assert found["paired_by"] == "seed and row" and found["seeds"] == 1
    found = paired_difference({1: rows([1.0, 2.0]), 2: rows([1.2, 2.2])}, {0: rows([1.5, 2.5])})
    assert found["paired_by"] == "row" and found["seeds"] == 2 and found["diff"] == pytest.approx(-0.4)
    assert paired_difference({1: rows([1.0])}, {}) is None


@pytest.mark.parametrize(("low", "high", "word"), [
    (-0.004, 0.004, "equivalent"), (-0.004, -0.001, "equivalent"), (-0.02, -0.001, "better"),
    (0.001, 0.02, "worse"), (-0.006, 0.001, "inconclusive"), (-0.005, 0.0, "inconclusive"),
])
def test_verdict_words(low, high, word):
    assert verdict(low, high, DELTA) == word


def test_an_equivalent_difference_that_excludes_zero_says_so():
    text = describe({"diff": -0.0017, "low": -0.003, "high": -0.0004, "rows": 199, "seeds": 3, "paired_by": "seed and row"})
    assert text == ("-0.0017 [-0.0030, -0.0004]: equivalent within ±0.005 (yet lower: the interval excludes 0) "
                    "(3 seeds x 199 rows, paired by seed and row)")


def _committed_pairs() -> list[tuple[Path, dict]]:
    """Every paired comparison recorded in a committed results.json, with its result folder."""
    found = []
    for path in (ROOT / "assets" / "results").glob("**/results.json"):
        for protocol, block in json.loads(path.read_text())["protocols"].items():
            found += [(path.parent / "runs" / protocol, pair) for pair in block.get("paired", []) if pair["paired"]]
    return found


def test_readme_interval_is_recomputed_from_the_committed_per_row_losses():
    pairs = _committed_pairs()
    if not pairs:
        pytest.skip("no committed run has per-row losses yet")
    runs, pair = pairs[0]
    from chameleon_core.reproduce import SHUFFLED_ROWS, _slug, shuffled_row

    def per_seed(row: str) -> dict[int, dict]:
        parent = next((name for name in SHUFFLED_ROWS if shuffled_row(name) == row), None)
        folder, key = (runs / _slug(parent), "eval_shuffled_condition") if parent else (runs / _slug(row), "eval")
        saved = {int(seed.name[4:]): read_rows(seed, key) for seed in sorted(folder.glob("seed*"))}
        return {seed: found for seed, found in saved.items() if found is not None}

    again = paired_difference(per_seed(pair["row"]), per_seed(pair["reference"]))
    assert again == pair["paired"]
    assert describe(again) in (ROOT / "README.md").read_text()
