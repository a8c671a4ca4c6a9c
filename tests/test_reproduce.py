"""`reproduce --preset tiny` end to end, and the README tables staying in sync with committed results."""

import json
from dataclasses import replace
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from chameleon_core import reproduce as reproduce_module
from chameleon_core.report import findings_section, grid_edges, head_grid_choice, result_sets, write_readme
from chameleon_core.regimes import CONDITIONED, HEAD_ONLY
from chameleon_core.reproduce import (
    ABLATIONS, BEST, BEST_CHANCE, BEST_GRID, FULL_BEST, HEAD_GRID, HEAD_K_SWEPT, HEADLINE, SHUFFLED, SHUFFLED_ROWS, comparisons,
    paired_comparisons, planned_rows, reproduce, results_markdown, shuffled_row,
)
from chameleon_core.train import TrainConfig

ROOT = Path(__file__).resolve().parents[1]


# The tiny grid runs in a subprocess started when collection ends (conftest's early runs), beside the other tests.
tiny_grid = pytest.mark.early_run(
    "reproduce-tiny", lambda out: [sys.executable, "-m", "chameleon_core", "reproduce", "--preset", "tiny", "--out", str(out)],
    minutes=4.5)


@pytest.fixture
def tiny_results(early_run) -> Path:
    out, result = early_run
    assert result.returncode == 0, result.stderr[-3000:]
    return out


@tiny_grid
def test_reproduce_tiny_writes_both_tables_and_curves(tiny_results):
    results = json.loads((tiny_results / "results.json").read_text())
    assert set(results["protocols"]) == {"paper", "causal"}
    for protocol, block in results["protocols"].items():
        assert set(block["table"]) == set(HEADLINE) | set(ABLATIONS) | {shuffled_row(row) for row in SHUFFLED_ROWS}
        assert (tiny_results / f"curves-{protocol}.html").is_file()
    markdown = (tiny_results / "results.md").read_text()
    assert markdown.count("| lora-head |") == 2 and "of the scored targets are padding" in markdown


head_grid = pytest.mark.early_run(
    "reproduce-head-only", lambda out: [
        sys.executable, "-m", "chameleon_core", "reproduce", "--preset", "tiny", "--grid", "head-only", "--cached-features",
        "--protocols", "causal", "--seeds", "0,1", "--k-sweep", "2", "--epochs", "2", "--patience", "1",
        "--selection-rows", "24", "--lr-grid", "1e-3,1e-2", "--out", str(out)],
    minutes=0.5)


def test_the_head_only_grid_plans_head_only_arms_and_sweeps_the_cluster_dependent_ones():
    rows = planned_rows([0, 1, 2], [0], [8], grid="head-only")
    assert set(HEAD_GRID) < set(rows)
    assert {overrides["regime"] for overrides, _ in rows.values()} == {"base", *HEAD_ONLY}
    assert rows["base"][1] == [0] and all(seeds == [0, 1, 2] for name, (_, seeds) in rows.items() if name != "base")
    assert {name for name in rows if name.endswith(", k=8")} == {f"{name}, k=8" for name in HEAD_K_SWEPT}
    assert rows[f"{BEST}, k=8"][0] == {"regime": "chameleon-head", **BEST_CHANCE, "k": 8}
    assert set(planned_rows([0], [0], [], grid="full")) == set(HEADLINE) | set(ABLATIONS)  # the full grid unchanged


def test_reproduce_refuses_an_unknown_grid(tmp_path):
    with pytest.raises(ValueError, match="unknown grid 'heads' \\(--grid\\); choose from full, head-only, best-chance"):
        reproduce(TrainConfig(), tmp_path / "out", grid="heads")
    assert not (tmp_path / "out").exists()


def test_head_only_questions_are_asked_again_at_each_swept_k():
    table = {name: _row(3.0) for name in (BEST, f"{BEST}, k=8", "chameleon-head-constant, best chance, k=8",
                                          "lora-head-matched", shuffled_row(f"{BEST}, k=8"))}
    asked = {(found["row"], found["reference"]) for found in paired_comparisons(table, {})}
    assert asked == {(f"{BEST}, k=8", "chameleon-head-constant, best chance, k=8"), (f"{BEST}, k=8", "lora-head-matched"),
                     (BEST, "lora-head-matched"), (shuffled_row(f"{BEST}, k=8"), f"{BEST}, k=8"), (f"{BEST}, k=8", BEST)}


@head_grid
def test_reproduce_head_only_grid_trains_every_arm_on_cached_states(early_run, tmp_path):
    out, result = early_run
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["setup"]["grid"] == "head-only" and list(results["protocols"]) == ["causal"]
    table = results["protocols"]["causal"]["table"]
    planned = planned_rows([0, 1], [0], [2], grid="head-only")
    conditioned = {name for name, (overrides, _) in planned.items() if overrides["regime"] in CONDITIONED}
    assert set(table) == set(planned) | {shuffled_row(name) for name in conditioned}
    for name, (overrides, _) in planned.items():
        for seed in table[name]["seeds"]:
            folder = out / "runs" / "causal" / reproduce_module._slug(name) / f"seed{seed}"
            if name != "base":  # the base row trains nothing, so it runs once, on the model
                folder = next(folder.glob("lr*"))  # every grid value ran: any one tells the settings
            config = json.loads((folder / "metrics.json").read_text())["config"]
            assert config["cached_features"] == (name != "base") and {key: config[key] for key in overrides} == overrides
    assert all(len(row["chosen"]) == 2 for name, row in table.items() if name != "base")
    asked = {found["question"] for found in results["protocols"]["causal"]["paired"]}
    assert {"best chance: the conditioned head vs its constant-input twin",
            "best chance: the conditioned head vs its constant-input twin (k=2)",
            "published ChameleonLLM vs head-only LoRA with as many parameters"} <= asked
    assert all(found["paired"] for found in results["protocols"]["causal"]["paired"])  # every run saved its rows
    # report words the grid in its own paragraph, not as a row of the full grids' table
    root = tmp_path / "results"
    (root / "grid").mkdir(parents=True)
    for name in ("results.json", "results.md"):
        shutil.copy(out / name, root / "grid" / name)
    findings = findings_section(result_sets(root))
    assert "**Conditioning's best chance (`random:tiny-gpt2`, synthetic, head-only grid" in findings
    assert "In words: `chameleon-head` " in findings and "`chameleon-head, best chance, k=2` " in findings
    assert findings.count("its constant-input twin (given another cluster's condition: ") == 3  # published, best, k=2
    assert "| `random:tiny-gpt2`, synthetic |" not in findings
    # gathering the finished runs again writes the same results
    written = (out / "results.json").read_text()
    setup = {key: value for key, value in results["setup"].items() if key in TrainConfig.__dataclass_fields__}
    reproduce(TrainConfig(**setup), out, ("causal",), [0, 1], [0], [2], show_progress=False, collect_only=True,
              lr_grid=results["setup"]["lr_grid"], grid="head-only")
    assert (out / "results.json").read_text() == written


def test_report_names_the_rows_whose_learning_rate_sits_at_an_end_of_the_grid():
    chose = lambda *lrs: {"chosen": [{"seed": seed, "lr": lr} for seed, lr in enumerate(lrs)]}
    table = {"base": {}, "lora-head": chose(3e-3, 3e-3), "chameleon-head": chose(1e-3),
             "chameleon-head-constant": chose(1e-4, 1e-3)}
    said = grid_edges(table, [1e-4, 1e-3, 3e-3])
    assert said == ("Chosen at an end of the grid (0.0001 to 0.003), where a wider grid might choose otherwise: "
                    "`lora-head` 0.003; `chameleon-head-constant` 0.0001, 0.001 (2 of 3 rows).")
    assert grid_edges({"chameleon-head": chose(1e-3)}, [1e-4, 1e-3, 1e-2]) == (
        "Every row chose a learning rate inside the grid (0.0001 to 0.01).")


def test_the_full_best_chance_paragraph_says_whether_it_ran_at_the_rate_the_head_only_grid_chose():
    same = {"model": "smollm2", "dataset": "wikitext", "max_train_rows": 800}
    head = {"setup": {**same, "grid": "head-only"},
            "protocols": {"causal": {"table": {BEST: {"chosen": [{"seed": 0, "lr": 0.01}, {"seed": 1, "lr": 0.01}]}}}}}
    full = lambda lr: {"setup": {**same, "grid": "best-chance", "lr": lr}, "protocols": {}}
    sets = [(Path("head"), head), (Path("full"), full(0.01))]
    assert head_grid_choice(full(0.01), sets) == f" (the head-only grid chose 0.01 for `{BEST}`)"
    assert head_grid_choice(full(0.003), sets) == f" (the head-only grid chose 0.01 for `{BEST}`, not this rate)"
    other_data = {**head, "setup": {**head["setup"], "dataset": "alpaca"}}
    assert head_grid_choice(full(0.003), [(Path("head"), other_data)]) == ""


@tiny_grid
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


@tiny_grid
def test_reproduce_tiny_measures_how_much_the_cluster_adapters_differ(tiny_results):
    results = json.loads((tiny_results / "results.json").read_text())
    conditioned_heads = {"chameleon", "chameleon-head", "lora-per-cluster"} | {
        name for name in ABLATIONS if name.startswith(("chameleon, ", "chameleon-constant"))
    }
    for block in results["protocols"].values():
        diversity = block["adapter_diversity"]
        assert set(diversity) == conditioned_heads  # and no static-head row
        assert all(row["clusters"] == block["k"] for row in diversity.values())
        constant = diversity["chameleon-constant"]
        assert constant["min_cosine"]["mean"] == pytest.approx(1, abs=1e-9) and constant["relative_spread"]["mean"] < 1e-6
        assert diversity["lora-per-cluster"]["mean_cosine"]["mean"] < 0.99  # each trained on its own cluster
        assert diversity["chameleon"]["relative_spread"]["mean"] > constant["relative_spread"]["mean"]
    markdown = (tiny_results / "results.md").read_text()
    assert markdown.count("| Regime | Clusters | Mean cosine | Min cosine (lowest over seeds) |") == 2
    for block in results["protocols"].values():
        assert f"| chameleon-constant | {block['k']} | 1.000000 | 1.000000 | 0.0000 |" in markdown


def test_readme_figures_are_generated_from_the_committed_results(tmp_path):
    if not list((ROOT / "assets" / "results").glob("**/results.json")):
        pytest.skip("no committed results yet")
    copy = tmp_path / "README.md"
    shutil.copy(ROOT / "README.md", copy)
    write_readme(copy, ROOT / "assets" / "results", ROOT / "assets" / "bundles")
    assert copy.read_text() == (ROOT / "README.md").read_text(), "run `python -m chameleon_core report`"


def test_report_refuses_a_readme_without_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("# no generated sections here\n")
    with pytest.raises(ValueError, match="findings:start"):
        write_readme(readme, ROOT / "assets" / "results")
    assert readme.read_text() == "# no generated sections here\n"  # nothing lost


def _row(mean: float, std: float = 0.0, n: int = 1, params: int = 10) -> dict:
    return {"val_loss": {"mean": mean, "std": std, "n": n}, "trainable_parameters": params}


def _rows(shift: float, n: int = 100) -> dict:
    """Per-row losses of one run: the same rows for every arm, moved by ``shift`` (plus seeded noise)."""
    losses = np.random.default_rng(7).uniform(1, 3, n) + shift + np.random.default_rng(int(shift * 1e4) % 97).normal(0, 1e-3, n)
    return {"keys": [f"r{i}" for i in range(n)], "loss": losses.tolist(), "targets": [1] * n}


def _block(table: dict, saved: dict[str, float]) -> dict:
    """A causal block whose rows named in ``saved`` saved per-row losses (3 seeds) moved by the given shift."""
    per_row = {name: {seed: _rows(shift) for seed in (0, 1, 2)} for name, shift in saved.items()}
    return {"table": table, "adapter_diversity": {}, "paired": paired_comparisons(table, per_row)}


def test_comparisons_pair_the_rows_that_saved_losses_and_say_which_did_not():
    table = {"base": _row(4.0), "lora": _row(3.30, 0.02, 3), "chameleon": _row(3.29, 0.03, 3, params=40),
             "lora-matched": _row(3.10), SHUFFLED: _row(3.50, 0.01, 3, params=40)}
    block = _block(table, {"lora": 0.0, "chameleon": -0.01, SHUFFLED: -0.008})
    lines = {line.split(":")[0][2:]: line for line in comparisons(table, block["paired"])}
    assert "difference of means -0.7100, not paired: these runs saved no per-row losses" in lines["ChameleonLLM vs the unadapted model"]
    same_rank = lines["ChameleonLLM vs static LoRA at the same rank"]
    assert "paired difference -0.010" in same_rank and "]: better (3 seeds x 100 rows, paired by seed and row)" in same_rank
    assert "40 vs 10 trainable" in same_rank
    assert "]: equivalent within ±0.005" in lines["another cluster's adapter vs the batch's own"]
    assert "the cluster's centroid vs the batch mean as condition" not in lines  # that row did not run


def _results(model: str, block: dict, params: int) -> dict:
    return {"setup": {"model": model, "dataset": "alpaca"}, "model_parameters": params, "protocols": {"causal": block}}


@pytest.mark.parametrize(
    "constant, per_cluster, words",
    [(0.02, 0.02, "ChameleonLLM beats the constant-input hyper-network and beats one static head LoRA per cluster"),
     (0.0, -0.02, "ChameleonLLM is equivalent to the constant-input hyper-network and loses to one static head LoRA"),
     (0.004, 0.0, "ChameleonLLM is equivalent to the constant-input hyper-network and is equivalent to one static")],
)
def test_findings_answer_the_conditioning_question_from_the_paired_verdicts(tmp_path, constant, per_cluster, words):
    table = {"base": _row(4.0), "lora": _row(3.3, 0.02, 3), "chameleon": _row(3.0, 0.01, 3, params=40),
             "chameleon-constant": _row(3.0 + constant, 0.01, 3, params=41), "lora-per-cluster": _row(3.0 + per_cluster, 0.01, 3),
             "lora-matched": _row(2.9, 0.01, 3, params=40)}
    saved = {"chameleon": 0.0, "chameleon-constant": constant, "lora-per-cluster": per_cluster, "lora-matched": -0.1}
    for name, results in (("a-tiny", _results("tiny", _block({"base": _row(5.0), "chameleon": _row(4.0)}, {}), params=10)),
                          ("b-big", _results("big", _block(table, saved), params=1000)),
                          ("c-started", _results("started", _block({"base": _row(5.0)}, {}), params=10))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    text = findings_section(result_sets(tmp_path))
    assert words in text and "; it loses to static LoRA with as many parameters (paired 95 % intervals" in text
    assert "5 of 5 trained rows score below" in text
    assert text.index("`big`") < text.index("`tiny`")  # the larger model first
    assert "The conditioning question waits for rows that have not run yet" in text  # the small set lacks them
    assert "- **`started`, alpaca:** only the unadapted model has run so far." in text


def test_findings_say_runs_without_per_row_losses_are_not_judged(tmp_path):
    table = {"base": _row(4.0), "chameleon": _row(3.0, 0.01, 3, params=40), "chameleon-constant": _row(3.01, 0.01, 3),
             "lora-per-cluster": _row(2.5, 0.01, 3)}
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "results.json").write_text(json.dumps(_results("one", _block(table, {}), params=10)))
    text = findings_section(result_sets(tmp_path))
    assert "No paired verdict on conditioning: these runs saved no per-row losses (*)." in text
    assert "| -0.0100 (not paired*) |" in text and text.endswith("rerunning them gives the paired interval.\n")
    assert "beats" not in text and "within the seed spread" not in text


def test_published_protocol_line_gives_the_padding_share_and_the_shuffled_condition(tmp_path):
    table = {"base": _row(6.0), "chameleon": _row(0.5, 0.01, 3), SHUFFLED: _row(1.0, 0.02, 3), "lora-matched": _row(0.03),
             "lora-head": _row(2.0), "chameleon-head": _row(1.5, params=6_786_596), shuffled_row("chameleon-head"): _row(1.6)}
    results = _results("big", _block({}, {}), params=10)
    paper = _block(table, {"chameleon": 0.0, SHUFFLED: 0.5, "lora-head": 0.0, "chameleon-head": -0.5,
                           shuffled_row("chameleon-head"): -0.4})
    results["protocols"]["paper"] = {**paper, "padding_share": {"test": 0.615}, "eval_split": "test"}
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "results.json").write_text(json.dumps(results))
    text = findings_section(result_sets(tmp_path))
    assert ("- Published protocol, `big`, alpaca: **61.5% of the scored targets are padding**; validation loss base "
            "6.0000, chameleon 0.5000, lora-matched 0.0300; another cluster's adapter: +0.5000 [") in text
    assert ("The published configuration (ChameleonLLM = the hyper-LoRA head alone, 6,786,596 parameters, vs head-only "
            "LoRA, 10): 1.5000 vs 2.0000, -0.5000 [") in text


def _fake_run(config) -> dict:
    result = {"loss": 3.0 + config.seed / 10, "ppl": 20.0}
    return {"config": {"seed": config.seed}, "trainable_parameters": 1, "total_parameters": 2, "train_loss": 3.5,
            "eval": result, "eval_shuffled_condition": result, "history": [], "eval_split": "test", "rows": {"train": 8, "test": 4},
            "dropped_rows": {}, "k": 2, "padding_share": None}


def test_only_trains_the_named_rows_and_gathers_the_rest(tmp_path, monkeypatch):
    trained = []
    monkeypatch.setattr(reproduce_module, "train", lambda config, folder, **_: trained.append(folder) or _fake_run(config))
    results = reproduce_module.reproduce(TrainConfig(), tmp_path, seeds=[0], ablation_seeds=[0, 1, 2], show_progress=False,
                                         only={"causal/chameleon-random-batches"})
    assert [folder.relative_to(tmp_path).as_posix() for folder in trained] == [
        f"runs/causal/chameleon-random-batches/seed{seed}" for seed in (0, 1, 2)
    ]
    block = results["protocols"]["causal"]
    assert list(block["table"]) == ["chameleon, random batches"] and block["table"]["chameleon, random batches"]["seeds"] == [0, 1, 2]
    assert "chameleon" in block["not_run"] and "paper" not in results["protocols"]  # nothing finished there


def test_training_one_protocol_keeps_the_other_protocols_finished_table(tmp_path, monkeypatch):
    finished = {}  # folder -> its run, as train would have left it
    monkeypatch.setattr(reproduce_module, "train",
                        lambda config, folder, **_: finished.setdefault(folder, _fake_run(config)))
    monkeypatch.setattr(reproduce_module, "finished_run", lambda folder, config: finished.get(folder))
    reproduce_module.reproduce(TrainConfig(), tmp_path, protocols=("paper",), show_progress=False)
    trained_for_paper = set(finished)
    results = reproduce_module.reproduce(TrainConfig(), tmp_path, protocols=("causal",), show_progress=False,
                                         only={"causal/chameleon"})
    assert set(results["protocols"]) == {"paper", "causal"}  # the paper table is gathered, not dropped
    assert set(finished) - trained_for_paper == {tmp_path / "runs" / "causal" / "chameleon" / "seed0"}
    assert list(results["protocols"]["causal"]["table"]) == ["chameleon", shuffled_row("chameleon")]
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["protocols"]["paper"]["table"] == results["protocols"]["paper"]["table"]


def test_gathering_keeps_every_finished_seed_and_head_only_runs_with_or_without_cached_states(tmp_path, monkeypatch):
    finished = {}

    def fake_train(config, folder, **_):
        folder.mkdir(parents=True)
        return finished.setdefault(folder, {**_fake_run(config), "cached": config.cached_features})

    monkeypatch.setattr(reproduce_module, "train", fake_train)
    monkeypatch.setattr(reproduce_module, "finished_run",
                        lambda folder, config: (run := finished.get(folder)) and run["cached"] == config.cached_features
                        and run or None)
    reproduce_module.reproduce(TrainConfig(), tmp_path, protocols=("causal",), seeds=[0, 1, 2], show_progress=False)
    results = reproduce_module.reproduce(replace(TrainConfig(), cached_features=True), tmp_path, protocols=("causal",),
                                         seeds=[0], show_progress=False, collect_only=True)
    table = results["protocols"]["causal"]["table"]
    assert table["chameleon"]["seeds"] == [0, 1, 2]  # not only the seed this command names
    assert table["chameleon-head"]["seeds"] == [0, 1, 2]  # trained on the whole model, gathered with cached states


def test_adapter_diversity_is_aggregated_over_seeds(tmp_path, monkeypatch):
    def fake(config, folder, **_):
        run = _fake_run(config)
        run["adapter_diversity"] = {"clusters": 2, "mean_cosine": 0.5 + config.seed / 10, "min_cosine": None,
                                    "relative_spread": 0.25, "mean_norm": 2.0}
        return run

    monkeypatch.setattr(reproduce_module, "train", fake)
    results = reproduce_module.reproduce(TrainConfig(), tmp_path, ablation_seeds=[0, 1], show_progress=False,
                                         only={"causal/lora-per-cluster"})
    row = results["protocols"]["causal"]["adapter_diversity"]["lora-per-cluster"]
    assert row["mean_cosine"] == {"mean": pytest.approx(0.55), "std": pytest.approx(math.sqrt(0.005)), "n": 2}
    assert "min_cosine" not in row and row["relative_spread"] == {"mean": 0.25, "std": 0.0, "n": 2}
    assert "| lora-per-cluster | 2 | 0.550000 ± 0.070711 | - | 0.2500 ± 0.0000 | 2.0000 ± 0.0000 | 2 |" in results_markdown(results)


def test_measured_time_gives_the_total_and_what_one_run_costs(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce_module, "train",
                        lambda config, folder, **_: {**_fake_run(config), "wall_seconds": 600.0 * (config.seed + 1)})
    results = reproduce_module.reproduce(TrainConfig(), tmp_path, seeds=[0, 1, 2], show_progress=False,
                                         only={"causal/chameleon"})
    assert results["protocols"]["causal"]["run_seconds"] == [600.0, 1200.0, 1800.0]
    assert ("Measured time: 3 runs took 1.0 h of wall time in all (loading, clustering, training and evaluation); "
            "per run, median 20.0 min, longest 30.0 min.") in results_markdown(results)
    results["protocols"]["causal"]["run_seconds"] = [600.0]
    assert "Measured time: 1 run took 0.2 h" in results_markdown(results)
    results["protocols"]["causal"]["run_seconds"] = None  # a run recorded before times were kept: no partial total
    assert "Measured time" not in results_markdown(results)


def test_learning_curves_are_the_same_bytes_for_the_same_runs(tmp_path):
    curves = {"lora": [{"epoch": 1, "val_loss": 2.5, "step_losses": [3.0, 2.8]}]}
    for name in ("a.html", "b.html"):
        reproduce_module._plot_curves(curves, "causal", tmp_path / name)
    assert (tmp_path / "a.html").read_bytes() == (tmp_path / "b.html").read_bytes()


def test_only_refuses_a_row_outside_the_grid_before_writing_anything(tmp_path):
    with pytest.raises(ValueError, match="causal/chameleon-randm-batches"):
        reproduce_module.reproduce(TrainConfig(), tmp_path / "out", only={"causal/chameleon-randm-batches"})
    assert not (tmp_path / "out").exists()


# seed -> lr -> (selection loss of each epoch, the best epoch, the reported loss): the reported split would choose
# 3e-4 everywhere, the last epoch 1e-3 for seed 0; the best epoch's selection loss chooses otherwise
SWEPT = {
    0: {3e-4: ([2.9, 2.8, 2.7], 3, 1.0), 1e-3: ([2.6, 2.5, 0.1], 2, 2.0), 3e-3: ([2.7, 2.55, 2.6], 2, 3.0)},
    1: {3e-4: ([2.9, 2.8, 2.7], 3, 1.0), 1e-3: ([2.6, 2.5, 2.6], 2, 2.0), 3e-3: ([2.4, 2.3, 2.2], 3, 3.0)},
    2: {3e-4: ([2.9, 2.8, 2.7], 3, 1.0), 1e-3: ([2.6, 2.5, 2.6], 2, 2.0), 3e-3: None},  # 3e-3 diverges
}


def _swept_run(config, folder) -> dict:
    """A finished run of ``config`` as ``SWEPT`` scripts it, with per-row losses saved as train saves them."""
    if config.regime == "base":
        epochs, best, loss = [3.5], None, 3.5
    elif (scripted := SWEPT[config.seed][config.lr]) is None:
        raise reproduce_module.TrainingDiverged("training stopped at epoch 1: the loss became nan")
    else:
        epochs, best, loss = scripted
    run = {**_fake_run(config), "config": {"seed": config.seed, "lr": config.lr, "regime": config.regime},
           "eval": {"loss": loss, "ppl": 2.0}, "history": [{"epoch": i + 1, "val_loss": v} for i, v in enumerate(epochs)],
           "selection": True, "wall_seconds": 60.0, **({"best_epoch": best} if best else {})}
    folder.mkdir(parents=True, exist_ok=True)
    saved = 0.5 if config.regime == "lora" else loss  # every lora run's rows alike: a pairing reads chameleon's choice
    rows = {"keys": ["a", "b"], "loss": [saved, saved], "targets": [1, 1]}
    (folder / "rows.json").write_text(json.dumps({"eval": rows, "eval_shuffled_condition": rows}))
    return run


def _train_as_swept(tmp_path, monkeypatch) -> list[str]:
    """Make ``reproduce`` train as :data:`SWEPT` scripts (a folder trains once, then is found finished); returns
    the list each training call appends its folder to."""
    finished, trained = {}, []

    def fake_train(config, folder, **_):
        trained.append(folder.relative_to(tmp_path).as_posix())
        return finished.setdefault(folder, _swept_run(config, folder))

    monkeypatch.setattr(reproduce_module, "train", fake_train)
    monkeypatch.setattr(reproduce_module, "finished_run",
                        lambda folder, config: (run := finished.get(folder)) and run["config"]["lr"] == config.lr and run or None)
    return trained


def test_a_learning_rate_grid_reports_the_run_with_the_lowest_selection_loss(tmp_path, monkeypatch):
    trained = _train_as_swept(tmp_path, monkeypatch)
    base = TrainConfig(selection_rows=8)
    results = reproduce_module.reproduce(base, tmp_path, protocols=("causal",), seeds=[0, 1, 2], show_progress=False,
                                         only={"causal/base", "causal/lora", "causal/chameleon"}, lr_grid=[3e-4, 1e-3, 3e-3])
    assert trained[0] == "runs/causal/base/seed0"  # nothing to train: not swept
    assert trained[-9:] == [f"runs/causal/chameleon/seed{seed}/lr{lr}" for seed in (0, 1, 2) for lr in ("0.0003", "0.001", "0.003")]
    table = results["protocols"]["causal"]["table"]
    chosen = table["chameleon"]["chosen"]
    assert [(c["seed"], c["lr"], c["epoch"], c["epochs_run"], c["selection_loss"]) for c in chosen] == [
        (0, 1e-3, 2, 3, 2.5), (1, 3e-3, 3, 3, 2.2), (2, 1e-3, 2, 3, 2.5)]
    assert chosen[2]["grid"] == [{"lr": 3e-4, "selection_loss": 2.7}, {"lr": 1e-3, "selection_loss": 2.5},
                                 {"lr": 3e-3, "selection_loss": None}]
    assert table["chameleon"]["val_loss"]["mean"] == pytest.approx((2.0 + 3.0 + 2.0) / 3)  # the chosen runs' reported loss
    assert table[shuffled_row("chameleon")]["chosen"] == chosen and "chosen" not in table["base"]
    paired = next(p for p in results["protocols"]["causal"]["paired"] if (p["row"], p["reference"]) == ("chameleon", "lora"))
    assert paired["paired"]["per_seed"] == pytest.approx([2.0 - 0.5, 3.0 - 0.5, 2.0 - 0.5])  # the chosen runs' rows.json
    assert results["setup"]["lr_grid"] == [3e-4, 1e-3, 3e-3] and results["setup"]["selection_rows"] == 8
    assert len(results["protocols"]["causal"]["run_seconds"]) == 1 + 8 + 8  # base, then every finished grid value

    markdown = (tmp_path / "results.md").read_text()
    assert "| Regime | Trainable params | Steps | Train loss | Val loss | Val ppl | Seeds | lr (chosen) | Epoch (chosen) |" in markdown
    assert "| 3 | 0.001, 0.003, 0.001* | 2/3, 3/3, 2/3 |" in markdown.split("| chameleon |")[1].splitlines()[0]
    assert "| base |" in markdown and markdown.split("| base |")[1].splitlines()[0].endswith("| 1 | - | - |")
    assert "lr chosen per run from 0.0003, 0.001, 0.003" in markdown
    assert "chosen on 8 selection rows carved from the training rows" in markdown

    gathered = reproduce_module.reproduce(base, tmp_path, protocols=("causal",), seeds=[0], show_progress=False,
                                          collect_only=True, lr_grid=[3e-4, 1e-3, 3e-3])
    assert gathered["protocols"]["causal"]["table"]["chameleon"] == table["chameleon"]  # resumable: gathered the same
    assert len(trained) == 19  # and nothing trained again


def test_with_an_lr_seed_the_other_seeds_train_once_at_the_rate_it_chose(tmp_path, monkeypatch):
    trained = _train_as_swept(tmp_path, monkeypatch)
    base, grid = TrainConfig(selection_rows=8), [3e-4, 1e-3, 3e-3]
    results = reproduce_module.reproduce(base, tmp_path, protocols=("causal",), seeds=[0, 1, 2], show_progress=False,
                                         only={"causal/chameleon"}, lr_grid=grid, lr_seed=0)
    assert trained == [f"runs/causal/chameleon/seed0/lr{lr}" for lr in ("0.0003", "0.001", "0.003")] + [
        "runs/causal/chameleon/seed1/lr0.001", "runs/causal/chameleon/seed2/lr0.001"]  # seed 0 chose 1e-3
    chosen = results["protocols"]["causal"]["table"]["chameleon"]["chosen"]
    assert [(c["seed"], c["lr"], c["epoch"], c.get("chosen_on_seed")) for c in chosen] == [
        (0, 1e-3, 2, None), (1, 1e-3, 2, 0), (2, 1e-3, 2, 0)]
    assert chosen[1]["grid"] == [{"lr": 1e-3, "selection_loss": 2.5}]
    assert results["setup"]["lr_seed"] == 0
    assert "lr chosen per row from 0.0003, 0.001, 0.003 by seed 0's runs" in (tmp_path / "results.md").read_text()
    gathered = reproduce_module.reproduce(base, tmp_path, protocols=("causal",), seeds=[0], show_progress=False,
                                          collect_only=True, lr_grid=grid, lr_seed=0)
    assert gathered["protocols"]["causal"]["table"]["chameleon"] == results["protocols"]["causal"]["table"]["chameleon"]
    assert len(trained) == 5  # nothing trained again


@pytest.mark.parametrize("settings, message", [({"lr_seed": 0}, "pass --lr-grid too"),
                                               ({"lr_seed": 3, "lr_grid": [1e-3, 3e-3]}, "--lr-seed 3 is not among the seeds of lora-head")])
def test_an_lr_seed_without_a_grid_or_outside_the_seeds_is_refused(tmp_path, settings, message):
    with pytest.raises(ValueError, match=message):
        reproduce_module.reproduce(TrainConfig(selection_rows=8), tmp_path / "out", seeds=[0, 1], **settings)
    assert not (tmp_path / "out").exists()


def test_without_a_grid_the_table_has_no_chosen_columns_and_the_setup_no_new_settings(tmp_path, monkeypatch):
    monkeypatch.setattr(reproduce_module, "train", lambda config, folder, **_: _fake_run(config))
    results = reproduce_module.reproduce(TrainConfig(), tmp_path, protocols=("causal",), show_progress=False,
                                         only={"causal/chameleon"})
    assert "selection_rows" not in results["setup"] and "lr_grid" not in results["setup"]
    assert "chosen" not in results["protocols"]["causal"]["table"]["chameleon"]
    markdown = results_markdown(results)
    assert "| Regime | Trainable params | Steps | Train loss | Val loss | Val ppl | Seeds |\n" in markdown
    assert "chosen" not in markdown and "selection" not in markdown


def test_the_best_chance_grid_trains_the_full_model_conditioned_and_constant_at_the_best_chance_settings(tmp_path, monkeypatch):
    configs = {}  # folder -> the config it trained

    def fake_train(config, folder, **_):
        configs[folder.relative_to(tmp_path).as_posix()] = config
        loss = {"base": 3.5, "chameleon": 3.0}.get(config.regime, 3.2) + config.seed / 100
        folder.mkdir(parents=True)
        rows = {"keys": ["a", "b"], "loss": [loss, loss + 0.1], "targets": [1, 1]}
        (folder / "rows.json").write_text(json.dumps({"eval": rows, "eval_shuffled_condition": rows}))
        return {**_fake_run(config), "eval": {"loss": loss, "ppl": 2.0}}

    monkeypatch.setattr(reproduce_module, "train", fake_train)
    results = reproduce_module.reproduce(TrainConfig(selection_rows=8, patience=1), tmp_path / "set", protocols=("causal",),
                                         seeds=[0, 1], ablation_seeds=[0], show_progress=False, grid="best-chance")
    assert sorted(configs) == sorted(["set/runs/causal/base/seed0", *(f"set/runs/causal/{row}/seed{seed}" for seed in (0, 1)
                                      for row in ("chameleon-best-chance", "chameleon-constant-best-chance"))])
    assert {(c.regime, c.hyper_dropout, c.hyper_init, c.condition_source) for c in configs.values() if c.regime != "base"} == {
        (regime, 0.0, "lora", "hidden") for regime in ("chameleon", "chameleon-constant")}
    block = results["protocols"]["causal"]
    assert set(block["table"]) == {*BEST_GRID, shuffled_row(FULL_BEST)} and results["setup"]["grid"] == "best-chance"
    twin = next(p for p in block["paired"] if (p["row"], p["reference"]) == (FULL_BEST, "chameleon-constant, best chance"))
    assert twin["paired"]["per_seed"] == pytest.approx([-0.2, -0.2])
    assert "hyper-network settings per row (below)" in (tmp_path / "set" / "results.md").read_text()
    findings = findings_section(result_sets(tmp_path))
    assert "**The full model at the best-chance settings (`random:tiny-gpt2`, synthetic: static LoRA on every projection" in findings
    assert "In words: `chameleon, best chance` beats its constant-input twin, and another cluster's condition is " in findings
    assert "| `random:tiny-gpt2`, synthetic |" not in findings  # its own paragraph, not a row of the full grids' table
    with pytest.raises(ValueError, match="the best-chance grid runs at one k"):
        reproduce_module.reproduce(TrainConfig(), tmp_path / "other", grid="best-chance", k_sweep=[8])
    assert not (tmp_path / "other").exists()


def test_a_grid_without_selection_rows_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="pass --selection-rows"):
        reproduce_module.reproduce(TrainConfig(), tmp_path / "out", lr_grid=[1e-3, 3e-3])
    assert not (tmp_path / "out").exists()
