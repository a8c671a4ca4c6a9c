"""Paired comparisons of two rows of a results grid, from the per-row losses every run saves.

Arms that share a seed share its clusters, batch order and initialisation, and every arm scores the
same rows, so the right test of "is A better than B" is the difference of the two on the same seed
and row. :func:`paired_difference` gives it with a bootstrap 95 % interval that resamples rows and
seeds together; :func:`verdict` turns the interval into one of four words.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .runs import ROWS_FILE

DELTA = 0.005  # nats: a smaller difference in mean validation loss counts as none (equivalence margin)
RESAMPLES = 2000
VERDICTS = ("better", "worse", "equivalent", "inconclusive")


def read_rows(folder: Path, key: str = "eval") -> dict | None:
    """The per-row losses one run saved under ``key`` (``eval`` or ``eval_shuffled_condition``), or None for a
    run recorded before they were saved."""
    path = Path(folder) / ROWS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get(key)


def _aligned(a: dict, b: dict) -> tuple[np.ndarray, ...]:
    """The rows both runs scored, matched by key: (loss_a, targets_a, loss_b, targets_b), each (R,)."""
    index_b = {k: i for i, k in enumerate(b["keys"])}
    pairs = [(i, index_b[k]) for i, k in enumerate(a["keys"]) if k in index_b]
    ia, ib = (np.array(side, dtype=int) for side in zip(*pairs)) if pairs else (np.array([], int),) * 2
    arrays = (np.asarray(a["loss"])[ia], np.asarray(a["targets"])[ia], np.asarray(b["loss"])[ib], np.asarray(b["targets"])[ib])
    scored = (arrays[1] > 0) & (arrays[3] > 0)
    return tuple(x[scored] for x in arrays)


def paired_difference(runs_a: dict[int, dict], runs_b: dict[int, dict], resamples: int = RESAMPLES, seed: int = 0) -> dict | None:
    """Mean loss of A minus B (token-weighted over the rows both scored), paired by seed and row.

    ``runs_a`` / ``runs_b``: seed -> that run's per-row losses (:func:`read_rows`). Seeds present in both
    are paired; a side with a single run (``base``, which no seed changes) pairs with every seed of the
    other, and the pairing is then by row alone. The interval is the 2.5-97.5 % percentile range of
    ``resamples`` bootstrap replicates, each drawing seeds and rows with replacement (the same rows for
    every seed: they are the same records). None when no seed pairs or no row is shared.
    """
    if not runs_a or not runs_b:
        return None
    if common := sorted(set(runs_a) & set(runs_b)):
        pairs, by = [(runs_a[s], runs_b[s]) for s in common], "seed and row"
    elif len(runs_b) == 1:
        pairs, by = [(runs_a[s], next(iter(runs_b.values()))) for s in sorted(runs_a)], "row"
    elif len(runs_a) == 1:
        pairs, by = [(next(iter(runs_a.values())), runs_b[s]) for s in sorted(runs_b)], "row"
    else:
        return None
    aligned = [_aligned(a, b) for a, b in pairs]
    rows = min(len(x[0]) for x in aligned)
    if rows == 0 or any(len(x[0]) != rows for x in aligned):
        return None  # seeds that scored different rows cannot share one row resample
    rng = np.random.default_rng(seed)
    row_weights = rng.multinomial(rows, np.full(rows, 1 / rows), size=resamples)  # (B, R)
    seed_weights = rng.multinomial(len(pairs), np.full(len(pairs), 1 / len(pairs)), size=resamples)  # (B, S)
    point, replicates = [], []
    for loss_a, n_a, loss_b, n_b in aligned:
        point.append(loss_a.sum() / n_a.sum() - loss_b.sum() / n_b.sum())
        replicates.append(row_weights @ loss_a / (row_weights @ n_a) - row_weights @ loss_b / (row_weights @ n_b))  # (B,)
    boot = (seed_weights * np.stack(replicates, 1)).sum(1) / len(pairs)  # (B,)
    low, high = np.percentile(boot, [2.5, 97.5])
    return {"diff": float(np.mean(point)), "low": float(low), "high": float(high), "per_seed": [float(p) for p in point],
            "rows": rows, "seeds": len(pairs), "paired_by": by}


def verdict(low: float, high: float, delta: float = DELTA) -> str:
    """``equivalent`` when the whole interval lies within ±delta, else ``better`` (A lower, the interval
    below 0) or ``worse`` (above 0), else ``inconclusive``."""
    if -delta < low and high < delta:
        return "equivalent"
    if high < 0:
        return "better"
    return "worse" if low > 0 else "inconclusive"


def describe(result: dict, delta: float = DELTA) -> str:
    """``-0.0017 [-0.0031, -0.0004]: equivalent within ±0.005 (3 seeds x 200 rows, paired by seed and row)``."""
    said = verdict(result["low"], result["high"], delta)
    if said == "equivalent":
        said = f"equivalent within ±{delta:g}"
        if result["high"] < 0 or result["low"] > 0:
            said += f" (yet {'lower' if result['high'] < 0 else 'higher'}: the interval excludes 0)"
    shape = f"{result['seeds']} seed{'s' if result['seeds'] > 1 else ''} x {result['rows']:,} rows"
    return f"{result['diff']:+.4f} [{result['low']:+.4f}, {result['high']:+.4f}]: {said} ({shape}, paired by {result['paired_by']})"
