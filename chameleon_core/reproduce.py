"""``reproduce``: every regime and ablation under both protocols, side by side, in one command.

Writes ``results.json``, ``results.md`` (the paper-style tables) and plotly learning curves.
Each run lives in ``runs/<protocol>/<row>/seed<N>/`` and is skipped when already complete, so
an interrupted ``reproduce`` picks up where it stopped. With a learning-rate grid each of its
values trains in ``seed<N>/lr<value>/`` and the seed reports the one with the lowest loss on the
selection rows (``--selection-rows``), never looking at the reported split. With ``--lr-seed`` only that seed
runs the grid, and the row's other seeds train at the learning rate it chose. ``--grid`` picks the rows: every
regime and ablation (``full``), the published head-only configuration and its controls (``head-only``), or the
full model's decisive comparison at the settings that give conditioning its best chance (``best-chance``).
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import replace
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from .paired import DELTA, describe, paired_difference, read_rows
from .protocols import PROTOCOLS
from .regimes import CONDITIONED, HEAD_ONLY
from .runs import finished_run
from .train import TrainConfig, TrainingDiverged, train

HEADLINE = {
    "base": {"regime": "base"},
    "lora-head": {"regime": "lora-head"},
    "chameleon-head": {"regime": "chameleon-head"},
    "lora": {"regime": "lora"},
    "chameleon": {"regime": "chameleon"},
}
ABLATIONS = {
    "lora-matched": {"regime": "lora-matched"},
    "chameleon-constant": {"regime": "chameleon-constant"},
    "lora-per-cluster": {"regime": "lora-per-cluster"},
    "chameleon, no hyper dropout": {"regime": "chameleon", "hyper_dropout": 0.0},
    "chameleon-constant, no hyper dropout": {"regime": "chameleon-constant", "hyper_dropout": 0.0},
    "chameleon, random batches": {"regime": "chameleon", "sampler": "random"},
    "chameleon, per-example conditioning": {"regime": "chameleon", "conditioning": "example"},
    "chameleon, centroid conditioning": {"regime": "chameleon", "conditioning": "centroid"},
}
# rows that only some datasets have: the hidden-condition control's ceiling reads the instruction it hides
DATASET_ROWS = {"alpaca-hidden": {"lora, instruction visible (ceiling)": {"regime": "lora", "dataset": "alpaca"}}}
# ``--grid head-only``: the published configuration (the hyper-LoRA head alone) and its controls, every arm head-only
# (so it trains on cached hidden states), at the published hyper-network settings and at those that give
# conditioning its best chance: no dropout, an output that starts as a working LoRA, the frozen model's hidden
# states as the condition (the constant twin shares them, so both see the same clusters and batches)
BEST_CHANCE = {"hyper_dropout": 0.0, "hyper_init": "lora", "condition_source": "hidden"}
BEST = "chameleon-head, best chance"
HEAD_GRID = {
    "base": {"regime": "base"},
    "lora-head": {"regime": "lora-head"},
    "lora-head-matched": {"regime": "lora-head-matched"},
    "lora-head-per-cluster": {"regime": "lora-head-per-cluster"},
    "chameleon-head": {"regime": "chameleon-head"},
    "chameleon-head-constant": {"regime": "chameleon-head-constant"},
    BEST: {"regime": "chameleon-head", **BEST_CHANCE},
    "chameleon-head-constant, best chance": {"regime": "chameleon-head-constant", **BEST_CHANCE},
}
HEAD_K_SWEPT = ("lora-head-per-cluster", BEST, "chameleon-head-constant, best chance")  # --k-sweep
# ``--grid best-chance``: the full model (static LoRA on every projection + the hyper-LoRA head) conditioned and with
# a constant input, both at the best-chance settings: does conditioning matter once the layers adapt too?
FULL_BEST = "chameleon, best chance"
BEST_GRID = {
    "base": {"regime": "base"},
    FULL_BEST: {"regime": "chameleon", **BEST_CHANCE},
    "chameleon-constant, best chance": {"regime": "chameleon-constant", **BEST_CHANCE},
}
GRIDS = ("full", "head-only", "best-chance")
SHUFFLED_SUFFIX = ", shuffled conditioning (eval only)"
SHUFFLED = "chameleon" + SHUFFLED_SUFFIX  # shuffled_row("chameleon")
SHUFFLED_ROWS = ("chameleon", "chameleon-head", "chameleon, no hyper dropout")  # each gets a shuffled twin


def shuffled_row(name: str) -> str:
    """The row of ``name``'s runs evaluated with another cluster's centroid as condition."""
    return name + SHUFFLED_SUFFIX


DESCRIPTIONS = {
    "base": "the unadapted model",
    "lora-head": "static LoRA on the head only (the published \"Traditional LoRA\")",
    "lora": "static LoRA on every transformer projection and the head (the paper's description)",
    "lora-matched": "static LoRA on projections and head at the rank that matches chameleon's parameter count",
    "chameleon-head": "the hyper-LoRA head alone, no layer LoRA: ChameleonLLM as the published code trains it "
                      "(the published \"ChameleonLLM\" row)",
    "chameleon": "static LoRA on projections + hyper-LoRA head conditioned on the batch mean (ChameleonLLM)",
    "chameleon-constant": "chameleon whose hyper-network reads one learned vector instead of the batch: the same "
                          "architecture (plus that vector) without conditioning, one adapter for every batch",
    "lora-per-cluster": "static LoRA on projections + one static head LoRA per training cluster, each row using its "
                        "nearest training centroid's",
    "chameleon, random batches": "chameleon trained and evaluated on random (not cluster-homogeneous) batches",
    "chameleon, per-example conditioning": "chameleon with one generated adapter per row",
    "chameleon, centroid conditioning": "chameleon conditioned on each row's training-cluster centroid",
    "chameleon, no hyper dropout": "chameleon with the hyper-network's dropout 0 instead of the published 0.5",
    "chameleon-constant, no hyper dropout": "chameleon-constant with the hyper-network's dropout 0",
    "lora, instruction visible (ceiling)": "lora on Alpaca with the instruction in the model's input, as usual",
    "lora-head-matched": "static LoRA on the head only, at the rank that matches chameleon-head's parameter count",
    "lora-head-per-cluster": "one static head LoRA per training cluster, no layer LoRA, each row using its nearest "
                             "training centroid's",
    "chameleon-head-constant": "chameleon-head whose hyper-network reads one learned vector instead of the batch",
    BEST: "chameleon-head at the settings that give conditioning its best chance: hyper-network dropout 0, its output "
          "starting as a working LoRA (`--hyper-init lora`), the frozen model's mean final hidden state over the "
          "condition as the condition (`--condition-source hidden`)",
    "chameleon-head-constant, best chance": "chameleon-head-constant at the best-chance settings (the same clusters "
                                            "and batches as chameleon-head, best chance)",
    FULL_BEST: "chameleon (static LoRA on every projection + the hyper-LoRA head) at the best-chance settings of "
               "chameleon-head, best chance",
    "chameleon-constant, best chance": "chameleon-constant at the best-chance settings (the same clusters and batches "
                                       "as chameleon, best chance)",
    SHUFFLED: "the trained chameleon evaluated with another cluster's centroid as condition (likewise for every "
              "conditioned row: `<row>, shuffled conditioning (eval only)`)",
}
# TrainConfig settings that ``--preset`` starts from (options given on the command line win). Not the notebooks'
# profiles (:mod:`.profiles`), which size a notebook's figures.
PRESETS = {
    "tiny": {"model": "random:tiny-gpt2", "dataset": "synthetic", "epochs": 2, "max_length": 128, "max_train_rows": 600},
    "paper": {"model": "gpt2", "dataset": "wikitext", "epochs": 10, "batch_size": 32, "lr": 5e-4, "rank": 4},
}


def preset_settings(name: str, dataset: str | None = None) -> dict:
    """A preset's settings for ``dataset`` (default: the preset's): published Alpaca rows are 512 tokens long."""
    settings = dict(PRESETS[name])
    if name == "paper" and (dataset or settings["dataset"]) == "alpaca":
        settings["max_length"] = 512
    return settings


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def planned_rows(
    seeds: list[int], ablation_seeds: list[int], k_sweep: list[int], dataset: str = "", grid: str = "full",
) -> dict[str, tuple[dict, list[int]]]:
    """row name -> (its TrainConfig settings, its seeds). The head-only and best-chance grids run every arm with
    ``seeds``."""
    if grid == "best-chance":
        return {name: (overrides, [0] if name == "base" else seeds) for name, overrides in BEST_GRID.items()}
    if grid == "head-only":
        rows = {name: (overrides, [0] if name == "base" else seeds) for name, overrides in HEAD_GRID.items()}
        rows.update({f"{name}, k={k}": ({**HEAD_GRID[name], "k": k}, seeds) for k in k_sweep for name in HEAD_K_SWEPT})
        return rows
    rows = {name: (overrides, [0] if name == "base" else seeds) for name, overrides in HEADLINE.items()}
    rows.update({name: (overrides, ablation_seeds) for name, overrides in ABLATIONS.items()})
    rows.update({name: (overrides, seeds) for name, overrides in DATASET_ROWS.get(dataset, {}).items()})
    rows.update({f"chameleon, k={k}": ({"regime": "chameleon", "k": k}, ablation_seeds) for k in k_sweep})
    return rows


def has_shuffled_twin(name: str, overrides: dict, grid: str) -> bool:
    """Whether ``name``'s runs are also reported evaluated with another cluster's condition: the full grid's
    :data:`SHUFFLED_ROWS`, and every conditioned row of the other grids."""
    return name in SHUFFLED_ROWS or (grid != "full" and overrides["regime"] in CONDITIONED)


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values)}


def lr_folder(lr: float) -> str:
    """The sub-folder of a seed's folder where the grid's learning rate ``lr`` trains: ``lr0.001``."""
    return f"lr{lr:g}"


def check_lr_grid(lr_grid: list[float] | None, base: TrainConfig) -> list[float] | None:
    """``lr_grid`` as floats, or a ValueError saying what is wrong with it (None: no grid)."""
    if lr_grid is None:
        return None
    values = [float(lr) for lr in lr_grid]
    if len(values) < 2:
        raise ValueError(f"--lr-grid needs at least 2 learning rates to choose from, got {len(values)}")
    if bad := [lr for lr in values if not (math.isfinite(lr) and lr > 0)]:
        raise ValueError(f"--lr-grid values must be finite numbers > 0, got {', '.join(map(str, bad))}")
    if len({lr_folder(lr) for lr in values}) < len(values):
        raise ValueError(f"--lr-grid names a learning rate twice: {', '.join(f'{lr:g}' for lr in values)}")
    if base.selection_rows is None:
        raise ValueError("--lr-grid chooses each run's learning rate on selection rows carved from the training rows; "
                         "pass --selection-rows (choosing on the reported split would be peeking at it)")
    return values


def selection_loss(run: dict) -> float:
    """The validation loss of a run's kept adapters, its best epoch's (early stopping) or else its last: the
    selection split's for a run with ``selection_rows``."""
    history = run["history"]
    kept = run.get("best_epoch", history[-1]["epoch"])
    return next(h["val_loss"] for h in history if h["epoch"] == kept)


def reproduce(
    base: TrainConfig, out: str | Path, protocols: tuple[str, ...] = ("paper", "causal"), seeds: list[int] = (0,),
    ablation_seeds: list[int] = (0,), k_sweep: list[int] = (), show_progress: bool = True, collect_only: bool = False,
    only: set[str] | None = None, lr_grid: list[float] | None = None, grid: str = "full", lr_seed: int | None = None,
) -> dict:
    """Run (or, with ``collect_only``, only gather the finished runs of) the whole grid.

    ``only`` names the rows to train as ``<protocol>/<row folder>`` (``causal/chameleon-random-batches``):
    the others are only gathered, so a few rows can get more seeds without rerunning the grid.
    Rows are reported with the seeds that finished; a row with none is listed as not run. Protocols
    outside ``protocols`` are gathered too, so training one protocol never drops the other's table.
    ``lr_grid`` (needs ``base.selection_rows``): every trained row and seed runs each of these learning
    rates and reports the run with the lowest :func:`selection_loss`; the base row trains nothing and runs once.
    ``grid``: ``full`` (every regime and ablation), ``head-only`` (:data:`HEAD_GRID`, with ``k_sweep`` repeating
    :data:`HEAD_K_SWEPT`) or ``best-chance`` (:data:`BEST_GRID`, at one k). ``lr_seed``: only this seed of each row
    runs the grid; the row's other seeds train once, at the learning rate it chose (a third of the runs for a grid
    of three; each seed still stops on its own epoch).
    """
    lrs = check_lr_grid(lr_grid, base)
    if lr_seed is not None and lrs is None:
        raise ValueError("--lr-seed names the seed whose learning-rate grid the others follow: pass --lr-grid too")
    if grid not in GRIDS:
        raise ValueError(f"unknown grid {grid!r} (--grid); choose from {', '.join(GRIDS)}")
    if grid == "best-chance" and k_sweep:
        raise ValueError("--k-sweep repeats rows of the full and head-only grids; the best-chance grid runs at one k "
                         "(--k)")
    rows = planned_rows(list(seeds), list(ablation_seeds), list(k_sweep), base.dataset, grid)
    if lr_seed is not None and (lacking := [name for name, (_, found) in rows.items() if name != "base" and lr_seed not in found]):
        raise ValueError(f"--lr-seed {lr_seed} is not among the seeds of {', '.join(lacking)}: every row it chooses for "
                         "must run it (--seeds, --ablation-seeds)")
    if only is not None and (unknown := only - {f"{p}/{_slug(name)}" for p in protocols for name in rows}):
        raise ValueError(f"--only names rows that are not in the grid: {', '.join(sorted(unknown))}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setup = {k: v for k, v in base.__dict__.items() if k not in ("regime", "protocol", "seed")
             and not (k == "selection_rows" and v is None)}  # unset: recorded as before the setting existed
    extra = {**({"lr_grid": lrs} if lrs else {}), **({"lr_seed": lr_seed} if lr_seed is not None else {}),
             **({"grid": grid} if grid != "full" else {})}
    results = {"setup": {**setup, **extra}, "protocols": {}}
    for protocol in PROTOCOLS:
        table, curves, diversity, not_run, first = {}, {}, {}, [], None  # first: a finished run, for the split's facts
        per_row = {}  # row -> seed -> that run's per-row losses (runs that saved them)
        timed = []  # every finished run's wall time (runs recorded before it was measured have none)
        for name, (overrides, row_seeds) in rows.items():
            runs = []
            gather = collect_only or protocol not in protocols or (
                only is not None and f"{protocol}/{_slug(name)}" not in only)
            # cached features serve the head-only rows; the others adapt the transformer and run it every step
            head_only = overrides.get("regime", base.regime) in HEAD_ONLY
            cached = base.cached_features and head_only
            row = out / "runs" / protocol / _slug(name)
            if gather:  # every seed that finished, so a command naming fewer seeds never shrinks a table
                row_seeds = sorted({*row_seeds, *(int(f.name[4:]) for f in row.glob("seed*") if f.name[4:].isdigit())})
            folders, chosen = {}, []  # seed -> the folder of its reported run; with a grid, what each seed chose
            for seed in sorted(row_seeds, key=lambda s: s != lr_seed):  # the seed that chooses for the others first
                config = replace(base, protocol=protocol, seed=seed, **{**overrides, "cached_features": cached})
                folder, label = row / f"seed{seed}", f"[{protocol}] {name} seed {seed}"
                if lrs and config.regime != "base":
                    follows = lr_seed not in (None, seed)  # trains once, at the rate the lr seed chose
                    values = [c["lr"] for c in chosen if c["seed"] == lr_seed] if follows else lrs
                    done, folder, choice, swept = _sweep(config, folder, values, gather, head_only, show_progress, label)
                    followed = {"chosen_on_seed": lr_seed} if follows else {}
                    chosen += [{"seed": seed, **choice, **followed}] if done else []
                    timed += [r.get("wall_seconds") for r in swept]  # every grid value's run took its time
                else:
                    done = _run_or_gather(config, folder, gather, head_only, show_progress, label)
                    timed += [done.get("wall_seconds")] if done else []
                if done:
                    runs.append(done)
                    folders[seed] = folder
            if not runs:
                not_run.append(name)
                continue
            first = first or runs[0]
            table[name] = {**_row(runs), **({"chosen": chosen} if chosen else {})}
            curves[name] = runs[0]["history"]
            per_row[name] = _saved_rows(folders, "eval")
            if has_shuffled_twin(name, overrides, grid):
                table[shuffled_row(name)] = {**_row(runs, "eval_shuffled_condition"), **({"chosen": chosen} if chosen else {})}
                per_row[shuffled_row(name)] = _saved_rows(folders, "eval_shuffled_condition")
            if found := [r["adapter_diversity"] for r in runs if "adapter_diversity" in r]:
                diversity[name] = _diversity(found)
        if first is None:
            continue
        results["protocols"][protocol] = {
            "eval_split": first["eval_split"], "rows": first["rows"], "eval_targets": first["eval"].get("targets"),
            "dropped_rows": first["dropped_rows"],
            "k": first["k"], "padding_share": first["padding_share"], "table": table, "curves": curves, "not_run": not_run,
            "adapter_diversity": diversity, "run_seconds": timed if None not in timed else None,
            "paired": paired_comparisons(table, per_row),
        }
        if "base" in table:
            results["model_parameters"] = table["base"]["total_parameters"]
        _plot_curves(curves, protocol, out / f"curves-{protocol}.html")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(results_markdown(results))
    return results


def _run_or_gather(config: TrainConfig, folder: Path, gather: bool, head_only: bool, show_progress: bool,
                   label: str) -> dict | None:
    """The finished run of ``config`` in ``folder``: trained (or resumed) there, or with ``gather`` only read, if any."""
    if gather:  # a head-only run counts whether or not it ran on cached states (the same losses)
        return finished_run(folder, config) or (
            head_only and finished_run(folder, replace(config, cached_features=not config.cached_features))) or None
    if show_progress:
        tqdm.write(label)  # on its own line, not after a bar
    return train(config, folder, resume=True, show_progress=show_progress)


def _sweep(
    config: TrainConfig, folder: Path, lrs: list[float], gather: bool, head_only: bool, show_progress: bool, label: str,
) -> tuple[dict | None, Path | None, dict | None, list[dict]]:
    """One seed's learning-rate grid, each value in its own sub-folder: (the run with the lowest selection loss, its
    folder, what was chosen and every value's selection loss, every finished run of the grid), the first three None
    where no value finished. A value whose loss diverged, or (gathering) that has not finished, is recorded with no
    loss and cannot be chosen."""
    tried = []  # (lr, its finished run or None)
    for lr in lrs:
        try:
            done = _run_or_gather(replace(config, lr=lr), folder / lr_folder(lr), gather, head_only, show_progress,
                                  f"{label} lr {lr:g}")
        except TrainingDiverged as err:
            if show_progress:
                tqdm.write(f"{label} lr {lr:g}: {err}")
            done = None
        tried.append((lr, done))
    losses = [(lr, run, selection_loss(run)) for lr, run in tried if run]
    if not losses:
        return None, None, None, []
    # the first of the lowest (grid order breaks ties); a non-finite loss is never chosen over a finite one
    lr, run, loss = min(losses, key=lambda found: found[2] if math.isfinite(found[2]) else math.inf)
    history = run["history"]
    choice = {"lr": lr, "epoch": run.get("best_epoch", history[-1]["epoch"]), "epochs_run": history[-1]["epoch"],
              "selection_loss": loss, "grid": [{"lr": value, "selection_loss": selection_loss(done) if done else None}
                                               for value, done in tried]}
    return run, folder / lr_folder(lr), choice, [run for _, run, _ in losses]


def _saved_rows(folders: dict[int, Path], key: str) -> dict[int, dict]:
    """seed -> the per-row losses its run saved under ``key``; runs recorded before they were saved are left out."""
    return {seed: rows for seed, folder in folders.items() if (rows := read_rows(folder, key)) is not None}


def _row(runs: list[dict], eval_key: str = "eval") -> dict:
    return {
        "trainable_parameters": runs[0]["trainable_parameters"],
        "total_parameters": runs[0]["total_parameters"],
        "steps": _stats([sum(len(h.get("step_losses", [])) for h in r["history"]) for r in runs]),
        "train_rows": runs[0]["rows"].get("train"),
        "train_loss": _stats([r["train_loss"] for r in runs]),
        "val_loss": _stats([r[eval_key]["loss"] for r in runs]),
        "val_ppl": _stats([r[eval_key]["ppl"] for r in runs]),
        "seeds": [r["config"]["seed"] for r in runs],
    }


DIVERSITY = ("mean_cosine", "min_cosine", "relative_spread", "mean_norm")


def _diversity(found: list[dict]) -> dict:
    """:func:`~chameleon_core.hyper_head.adapter_diversity` of each seed's run, as mean ± std over seeds."""
    stats = {key: _stats(values) for key in DIVERSITY if (values := [d[key] for d in found if d[key] is not None])}
    if "min_cosine" in stats:  # the lowest cosine of any two clusters in any seed
        stats["min_cosine"] = {**stats["min_cosine"], "lowest": min(d["min_cosine"] for d in found if d["min_cosine"] is not None)}
    return {"clusters": found[0]["clusters"], **stats}


# (row, reference, question): the comparisons that say whether batch-aware adaptation earns its parameters.
COMPARISONS = (
    ("chameleon", "base", "ChameleonLLM vs the unadapted model"),
    ("chameleon", "lora", "ChameleonLLM vs static LoRA at the same rank"),
    ("chameleon", "lora-matched", "ChameleonLLM vs static LoRA with as many parameters"),
    ("chameleon", "chameleon-constant", "the conditioned hyper-network vs the same one with a constant input"),
    ("chameleon", "lora-per-cluster", "generated adapters vs one static head LoRA per training cluster"),
    (SHUFFLED, "chameleon", "another cluster's adapter vs the batch's own"),
    ("chameleon, random batches", "chameleon", "random batches vs cluster-homogeneous batches"),
    ("chameleon, per-example conditioning", "chameleon", "one adapter per row vs one per batch"),
    ("chameleon, centroid conditioning", "chameleon", "the cluster's centroid vs the batch mean as condition"),
    ("chameleon-head", "lora-head", "the published ChameleonLLM (hyper-LoRA head alone) vs the published head-only LoRA"),
    (shuffled_row("chameleon-head"), "chameleon-head", "published ChameleonLLM: another cluster's adapter vs its own"),
    ("chameleon, no hyper dropout", "chameleon", "hyper-network dropout 0 vs the published 0.5"),
    ("chameleon, no hyper dropout", "chameleon-constant, no hyper dropout",
     "without dropout: the conditioned hyper-network vs the same one with a constant input"),
    ("chameleon, no hyper dropout", "lora-per-cluster", "without dropout: generated adapters vs one static head LoRA per cluster"),
    (shuffled_row("chameleon, no hyper dropout"), "chameleon, no hyper dropout",
     "without dropout: another cluster's adapter vs the batch's own"),
    ("chameleon", "lora, instruction visible (ceiling)", "ChameleonLLM, instruction hidden, vs static LoRA reading it"),
    ("chameleon, no hyper dropout", "base", "without dropout: ChameleonLLM vs the unadapted model"),
    ("chameleon, no hyper dropout", "lora, instruction visible (ceiling)",
     "without dropout: ChameleonLLM, instruction hidden, vs static LoRA reading it"),
)


# the head-only grid's (:data:`HEAD_GRID`) own questions; each is asked again of its ``, k=<k>`` rows
HEAD_COMPARISONS = (
    ("chameleon-head", "chameleon-head-constant", "published ChameleonLLM: the conditioned head vs its constant-input twin"),
    ("chameleon-head", "lora-head-matched", "published ChameleonLLM vs head-only LoRA with as many parameters"),
    ("chameleon-head", "lora-head-per-cluster", "published ChameleonLLM vs one head LoRA per training cluster"),
    (BEST, "chameleon-head-constant, best chance", "best chance: the conditioned head vs its constant-input twin"),
    (shuffled_row(BEST), BEST, "best chance: another cluster's condition vs its own"),
    (BEST, "lora-head-matched", "best chance vs head-only LoRA with as many parameters"),
    (BEST, "lora-head-per-cluster", "best chance vs one head LoRA per training cluster"),
    (BEST, "lora-head", "best chance vs the published head-only LoRA"),
    (BEST, "chameleon-head", "the best-chance settings vs the published ones"),
)
# the best-chance grid's (:data:`BEST_GRID`) questions
FULL_BEST_COMPARISONS = (
    (FULL_BEST, "chameleon-constant, best chance",
     "full model at the best-chance settings: the conditioned hyper-network vs the same one with a constant input"),
    (shuffled_row(FULL_BEST), FULL_BEST, "full model at the best-chance settings: another cluster's condition vs its own"),
    (FULL_BEST, "base", "full model at the best-chance settings: ChameleonLLM vs the unadapted model"),
)


def _questions(table: dict) -> list[tuple[str, str, str]]:
    """:data:`COMPARISONS`, :data:`HEAD_COMPARISONS`, :data:`FULL_BEST_COMPARISONS`, and the second for every
    ``, k=<k>`` the table holds (against the reference's row at that k where there is one), plus each such row
    against its published-rule twin."""
    questions = [*COMPARISONS, *HEAD_COMPARISONS, *FULL_BEST_COMPARISONS]
    for k in sorted({int(found[1]) for name in table if (found := re.search(r", k=(\d+)$", name))}):
        suffix = f", k={k}"
        for row, reference, question in HEAD_COMPARISONS:
            if row.endswith(SHUFFLED_SUFFIX):
                row, reference = shuffled_row(reference + suffix), reference + suffix
            else:
                row, reference = row + suffix, reference + suffix if reference + suffix in table else reference
            questions.append((row, reference, f"{question} (k={k})"))
        questions += [(name + suffix, name, f"{name}: k={k} vs k by the published rule") for name in HEAD_K_SWEPT]
    return questions


def paired_comparisons(table: dict, per_row: dict[str, dict[int, dict]]) -> list[dict]:
    """Every comparison whose two rows ran: the difference of mean losses and, where both rows saved per-row
    losses, its paired bootstrap interval (``paired``; None where they did not)."""
    found = []
    for row, reference, question in _questions(table):
        if row not in table or reference not in table:
            continue
        paired = paired_difference(per_row.get(row, {}), per_row.get(reference, {}))
        found.append({"row": row, "reference": reference, "question": question,
                      "diff": table[row]["val_loss"]["mean"] - table[reference]["val_loss"]["mean"], "paired": paired})
    return found


def comparisons(table: dict, paired: list[dict]) -> list[str]:
    """One line per comparison of :func:`paired_comparisons`: the two mean losses and the paired difference
    with its 95 % interval and verdict, or, for runs that saved no per-row losses, the plain difference."""
    lines = []
    for found in paired:
        row, reference = found["row"], found["reference"]
        a, b = table[row]["val_loss"], table[reference]["val_loss"]
        said = f"paired difference {describe(found['paired'])}" if found["paired"] else (
            f"difference of means {found['diff']:+.4f}, not paired: these runs saved no per-row losses")
        params = f"{table[row]['trainable_parameters']:,} vs {table[reference]['trainable_parameters']:,} trainable"
        lines.append(f"- {found['question']}: val loss {a['mean']:.4f} vs {b['mean']:.4f}; {said}; {params}")
    return lines


def _fmt(stat: dict, digits: int = 4) -> str:
    text = f"{stat['mean']:,.{digits}f}"
    return text + (f" ± {stat['std']:,.{digits}f}" if stat["n"] > 1 else "")


def results_markdown(results: dict) -> str:
    """The paper-style tables, one per protocol, with the facts needed to read them."""
    setup = results["setup"]
    epochs = _count(setup["epochs"], "epoch")
    validated = "selection" if setup.get("selection_rows") else "validation"
    if setup.get("patience"):
        epochs = (f"up to {epochs}, stopped once the {validated} loss had not improved for "
                  f"{_count(setup['patience'], 'epoch')} (the best epoch's adapters are kept)")
    lr = f"lr {setup['lr']}"
    if setup.get("lr_grid"):
        values = ", ".join(f"{value:g}" for value in setup["lr_grid"])
        lr = (f"lr chosen per run from {values}" if setup.get("lr_seed") is None else f"lr chosen per row from "
              f"{values} by seed {setup['lr_seed']}'s runs (the row's other seeds train at the rate it chose)")
    # the other grids set the hyper-network per row (the rows' descriptions say how)
    hyper = (f"hyper-network dropout {setup['hyper_dropout']:g}" if setup.get("grid", "full") == "full"
             else "hyper-network settings per row (below)")
    lines = [
        f"Model `{setup['model']}`, dataset `{setup['dataset']}`, {epochs}, batch {setup['batch_size']}, "
        f"rank {setup['rank']}, alpha {setup['alpha']:g} (scale alpha / rank = {setup['alpha'] / setup['rank']:g}), "
        f"{hyper}, {lr}; rows of at most {setup['max_length']} tokens. "
        "Mean ± std over seeds where n > 1; steps: optimizer steps per run.",
        "",
    ]
    if setup.get("selection_rows"):
        chosen = "Each run's epochs" + (" and learning rate were" if setup.get("lr_grid") else " were")
        lines += [f"{chosen} chosen on {setup['selection_rows']:,} selection rows carved from the training rows "
                  "(seeded by the data seed, never trained on); the reported split was scored once, at the end, with "
                  "the kept adapters.", ""]
    timed = [b["run_seconds"] for b in results["protocols"].values() if b.get("run_seconds") is not None]
    if seconds := sorted(s for block in timed for s in block):
        # the median says what one run costs on a quiet machine; the total includes runs that shared the CPU
        lines += [f"Measured time: {_count(len(seconds), 'run')} took {sum(seconds) / 3600:.1f} h of wall time in all "
                  f"(loading, clustering, training and evaluation); per run, median {statistics.median(seconds) / 60:.1f} "
                  f"min, longest {seconds[-1] / 60:.1f} min.", ""]
    titles = {"paper": "Published protocol (`paper`): last position, no shift, padding scored",
              "causal": "Correct protocol (`causal`): next-token loss, padding masked, no target leakage"}
    for protocol, block in results["protocols"].items():
        lines += [f"### {titles.get(protocol, protocol)}", ""]
        selection = f" ({block['rows']['selection']:,} more held out for selection)" if "selection" in block["rows"] else ""
        facts = (f"Trained on {block['rows']['train']:,} rows{selection}, evaluated on the `{block['eval_split']}` split "
                 f"({block['rows'][block['eval_split']]:,} rows); {block['k']} training clusters.")
        if block["padding_share"]:
            share = block["padding_share"][block["eval_split"]]
            facts += f" **{share:.1%} of the scored targets are padding** (EOS predicted from EOS)."
        if any(block["dropped_rows"].values()):
            facts += " Rows too short to score were dropped: " + ", ".join(f"{k} {v:,}" for k, v in block["dropped_rows"].items()) + "."
        swept = any("chosen" in row for row in block["table"].values())
        lines += [facts, "", "| Regime | Trainable params | Steps | Train loss | Val loss | Val ppl | Seeds |"
                  + (" lr (chosen) | Epoch (chosen) |" if swept else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if swept else "")]
        for name, row in block["table"].items():
            ppl_digits = 2 if row["val_ppl"]["mean"] < 1e5 else 0
            steps = _fmt(row["steps"], 0) if "steps" in row else "-"
            lines.append(
                f"| {name} | {row['trainable_parameters']:,} | {steps} | {_fmt(row['train_loss'])} | {_fmt(row['val_loss'])} | "
                f"{_fmt(row['val_ppl'], ppl_digits)} | {len(row['seeds'])} |" + (_chosen_cells(row) if swept else "")
            )
        if swept:
            lines += ["", "lr (chosen), epoch (chosen): per seed, the grid's learning rate whose run had the lowest "
                      "loss on the selection rows, and that run's kept epoch / epochs run (* chosen among the grid "
                      "values that finished: the others diverged or have not run)."]
        if odd := {name: row["train_rows"] for name, row in block["table"].items()
                   if row.get("train_rows", block["rows"]["train"]) != block["rows"]["train"]}:
            lines += ["", "Trained on other rows: " + "; ".join(f"{name} {rows:,}" for name, rows in odd.items()) + "."]
        if block.get("not_run"):
            lines += ["", "Not run (no finished seed): " + "; ".join(block["not_run"]) + "."]
        if block.get("adapter_diversity"):
            lines += ["", *diversity_markdown(block["adapter_diversity"])]
        if found := comparisons(block["table"], block.get("paired", [])):
            statistic = ("the mean loss over the rows whose last position is scored (the table's figure is a mean "
                         "of per-batch means)" if protocol == "paper" else "the mean loss per scored token")
            lines += ["", f"Comparisons (lower is better). The paired difference is that of {statistic}, row by row "
                      f"and seed by seed, with a bootstrap 95 % interval over rows and seeds; *equivalent* means the "
                      f"whole interval lies within ±{DELTA:g} nats:", "", *found]
        lines.append("")
    shown = {name for block in results["protocols"].values() for name in block["table"]} | {SHUFFLED}
    lines += ["Rows:", ""] + [f"- **{name}**: {text}" for name, text in DESCRIPTIONS.items() if name in shown]
    return "\n".join(lines) + "\n"


def _chosen_cells(row: dict) -> str:
    """`` 0.001, 0.003 | 2/3, 3/3 |``: each seed's chosen learning rate and epoch, or ``-`` for a row not swept."""
    if "chosen" not in row:
        return " - | - |"
    partial = ["*" if any(value["selection_loss"] is None for value in c["grid"]) else "" for c in row["chosen"]]
    lrs = ", ".join(f"{c['lr']:g}{mark}" for c, mark in zip(row["chosen"], partial))
    epochs = ", ".join(f"{c['epoch']}/{c['epochs_run']}" for c in row["chosen"])
    return f" {lrs} | {epochs} |"


def diversity_markdown(diversity: dict) -> list[str]:
    """How much the head adapters of different training clusters differ, per row (see ``adapter_diversity``)."""
    lines = [
        "Head adapters across the training clusters: cosine similarity of the updates `dW_c = scale B_c A_c` of the "
        "clusters (each conditioned on its centroid), and their spread `sqrt(mean_c ||dW_c - mean dW||^2) / "
        "mean_c ||dW_c||`. Cosine 1 and spread 0: the same adapter for every cluster.",
        "",
        "| Regime | Clusters | Mean cosine | Min cosine (lowest over seeds) | Spread / mean norm | Mean norm | Seeds |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in diversity.items():
        # cosines near 1 differ in the 5th digit and beyond: 6 digits tell a near-constant adapter from a constant one
        cells = [_fmt(row[key], 6 if key.endswith("cosine") else 4) if key in row else "-" for key in DIVERSITY]
        if "min_cosine" in row:
            cells[1] = f"{row['min_cosine'].get('lowest', row['min_cosine']['mean']):.6f}"
        lines.append(f"| {name} | {row['clusters']:,} | {' | '.join(cells)} | {row['mean_norm']['n']} |")
    return lines


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _plot_curves(curves: dict[str, list[dict]], protocol: str, path: Path) -> None:
    fig = make_subplots(rows=1, cols=2, subplot_titles=("training loss per step", "validation loss per epoch"))
    for i, (name, history) in enumerate(curves.items()):
        steps = [loss for epoch in history for loss in epoch.get("step_losses", [])]
        color = f"hsl({(i * 47) % 360},65%,45%)"
        if steps:
            fig.add_trace(go.Scatter(y=steps, name=name, legendgroup=name, line={"color": color}), row=1, col=1)
        fig.add_trace(
            go.Scatter(x=[h["epoch"] for h in history], y=[h["val_loss"] for h in history], name=name, legendgroup=name,
                       showlegend=not steps, mode="lines+markers", line={"color": color}),
            row=1, col=2,
        )
    fig.update_layout(title=f"Learning curves, {protocol} protocol (seed of the first run)", height=480)
    fig.write_html(path, include_plotlyjs="cdn", div_id=f"curves-{protocol}")  # a fixed id: same runs, same bytes
