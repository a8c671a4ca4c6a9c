"""`reproduce --profile tiny` end to end, and the README tables staying in sync with committed results."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chameleon_core import reproduce as reproduce_module
from chameleon_core.report import findings_section, result_sets, write_readme
from chameleon_core.reproduce import ABLATIONS, HEADLINE, SHUFFLED, comparisons, judge, results_markdown, verdict
from chameleon_core.train import TrainConfig

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


def test_reproduce_tiny_measures_how_much_the_cluster_adapters_differ(tiny_results):
    results = json.loads((tiny_results / "results.json").read_text())
    conditioned_heads = {"chameleon", "chameleon-constant", "lora-per-cluster"} | {
        name for name in ABLATIONS if name.startswith("chameleon, ")
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
    assert markdown.count("| Regime | Clusters | Mean cosine | Min cosine |") == 2
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


def test_comparisons_give_the_sign_and_flag_differences_the_seeds_explain():
    table = {
        "base": _row(4.0), "lora": _row(3.30, 0.02, 3), "chameleon": _row(3.29, 0.03, 3, params=40),
        "lora-matched": _row(3.10), SHUFFLED: _row(3.50, 0.01, 3, params=40),
        "chameleon, per-example conditioning": _row(3.31, params=40), "chameleon, random batches": _row(3.60),
    }
    lines = {line.split(":")[0][2:]: line for line in comparisons(table)}
    assert "-0.7100 (lower)" in lines["ChameleonLLM vs the unadapted model"]
    assert "-0.0100 (within the seed spread of ± 0.0300)" in lines["ChameleonLLM vs static LoRA at the same rank"]
    assert "40 vs 10 trainable" in lines["ChameleonLLM vs static LoRA at the same rank"]
    # a one-seed row is judged by the spread of the row it is compared with
    assert "+0.1900 (higher)" in lines["ChameleonLLM vs static LoRA with as many parameters"]
    assert "+0.0200 (within the seed spread of ± 0.0300)" in lines["one adapter per row vs one per batch"]
    assert "+0.2100 (higher)" in lines["another cluster's adapter vs the batch's own"]
    assert "+0.3100 (higher)" in lines["random batches vs cluster-homogeneous batches"]
    assert "the cluster's centroid vs the batch mean as condition" not in lines  # that row did not run
    # two one-seed rows: no spread to judge by, so the sign is reported as it is
    assert comparisons({"chameleon": _row(3.0), "base": _row(3.001)})[0].endswith("-0.0010 (lower); 10 vs 10 trainable")


def test_verdict_counts_a_difference_equal_to_the_spread_as_within():
    assert [verdict(d, 0.03) for d in (-0.031, -0.03, 0.0, 0.03, 0.031)] == ["lower", "within", "within", "within", "higher"]
    assert [verdict(d, None) for d in (-1e-6, 1e-6)] == ["lower", "higher"]  # one seed each: only the direction
    table = {"chameleon": _row(3.0, 0.01, 3), "lora": _row(3.02), "lora-head": _row(3.005), "base": _row(4.0)}
    assert [judge(table, "chameleon", ref) for ref in ("lora", "lora-head", "lora-matched")] == ["lower", "within", None]
    assert judge(table, "lora", "base") is None  # one seed each: no spread to judge by


def _results(model: str, table: dict, params: int) -> dict:
    return {"setup": {"model": model, "dataset": "alpaca"}, "model_parameters": params,
            "protocols": {"causal": {"table": table, "adapter_diversity": {}}}}


@pytest.mark.parametrize(
    "constant, per_cluster, words",
    [(3.10, 3.10, "Batch-aware conditioning helps here: ChameleonLLM beats both"),
     (3.00, 2.95, "Batch-aware conditioning does not help here: ChameleonLLM beats neither"),
     (3.10, 2.95, "ChameleonLLM beats the constant-input hyper-network by more than the seed spread, but not one static"),
     (3.005, 3.10, "ChameleonLLM beats one static head LoRA per cluster by more than the seed spread, but not the constant")],
)
def test_findings_answer_the_conditioning_question_from_the_numbers(tmp_path, constant, per_cluster, words):
    table = {"base": _row(4.0), "lora": _row(3.3, 0.02, 3), "chameleon": _row(3.0, 0.01, 3, params=40),
             "chameleon-constant": _row(constant, 0.01, 3, params=41), "lora-per-cluster": _row(per_cluster, 0.01, 3),
             "lora-matched": _row(2.9, 0.01, 3, params=40)}
    for name, results in (("a-tiny", _results("tiny", {"base": _row(5.0), "chameleon": _row(4.0)}, params=10)),
                          ("b-big", _results("big", table, params=1000)),
                          ("c-started", _results("started", {"base": _row(5.0)}, params=10))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(results))
    text = findings_section(result_sets(tmp_path))
    assert words in text and "; static LoRA with as many parameters beats it by more than the seed spread." in text
    assert "4 of 5 trained rows score below" not in text and "5 of 5 trained rows score below" in text
    assert text.index("`big`") < text.index("`tiny`")  # the larger model first
    assert "The conditioning question waits for rows that have not run yet" in text  # the small set lacks them
    assert "- **`started`, alpaca:** only the unadapted model has run so far." in text
    assert "0.3000 lower (beyond the seed spread ± 0.0200)" in text  # chameleon vs same-rank lora
    for matched, expected in ((3.005, "; it is within the seed spread of static LoRA with as many parameters."),
                              (3.1, "; it beats static LoRA with as many parameters by more than the seed spread.")):
        table["lora-matched"] = _row(matched, 0.01, 3, params=40)
        (tmp_path / "b-big" / "results.json").write_text(json.dumps(_results("big", table, params=1000)))
        assert expected in findings_section(result_sets(tmp_path))


def test_findings_call_nothing_from_one_seed_each(tmp_path):
    table = {"base": _row(4.0), "chameleon": _row(3.0, params=40), "chameleon-constant": _row(3.01, params=41),
             "lora-per-cluster": _row(2.5), "lora-matched": _row(3.02, params=40)}
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "results.json").write_text(json.dumps(_results("one", table, params=10)))
    text = findings_section(result_sets(tmp_path))
    assert ("With one seed of each row there is no seed spread to judge by yet; ChameleonLLM's validation loss "
            "differs by -0.0100 vs the constant-input hyper-network, +0.5000 vs one static head LoRA per cluster, "
            "-0.0200 vs static LoRA with as many parameters.") in text
    assert "beats" not in text and "0.0100 lower (1 seed each)" in text


def test_published_protocol_line_gives_the_padding_share_and_the_shuffled_condition(tmp_path):
    table = {"base": _row(6.0), "chameleon": _row(0.5, 0.01, 3), SHUFFLED: _row(1.0, 0.02, 3), "lora-matched": _row(0.03)}
    results = _results("big", {}, params=10)
    results["protocols"]["paper"] = {"table": table, "padding_share": {"test": 0.615}, "eval_split": "test"}
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "results.json").write_text(json.dumps(results))
    assert ("- Published protocol, `big`, alpaca: **61.5% of the scored targets are padding**; validation loss base "
            "6.0000, chameleon 0.5000, lora-matched 0.0300; another cluster's adapter: 0.5000 higher (beyond the seed "
            "spread ± 0.0200).") in findings_section(result_sets(tmp_path))


def _fake_run(config) -> dict:
    result = {"loss": 3.0 + config.seed / 10, "ppl": 20.0}
    return {"config": {"seed": config.seed}, "trainable_parameters": 1, "total_parameters": 2, "train_loss": 3.5,
            "eval": result, "eval_shuffled_condition": result, "history": [], "eval_split": "test", "rows": {"test": 4},
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
