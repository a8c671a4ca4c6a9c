"""The bench command: its quick mode checks every timed path and reports a complete, well-formed result.

Timings are never asserted: they depend on the machine; only what the bench computes and records is.
"""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chameleon_core import AdapterConfig, apply_regime, conditioned, default_k, hyper_head, load_model, mean_embedding
from chameleon_core.bench import (
    TARGETS, BenchCheckError, BenchSettings, DenseHyperLoRAHead, Variant, build_variants, check_paths, dense,
    format_report, run_bench,
)
from chameleon_core.cli import main

SECTIONS = ("scoring", "generation", "training")
VARIANTS = ("base", "lora", "lora-merged", "chameleon", "chameleon-merged", "chameleon-mixed", "naive", "naive-mixed")


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run through the command line, shared by the tests that read its result."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--quick", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_quick_mode_passes_every_correctness_check(quick):
    names = [check["name"] for check in quick["checks"]]
    assert len(names) == 16 and all(check["passed"] for check in quick["checks"])
    assert "factored head equals dense W + dW head" in names
    assert "mixed batch equals cluster 3 run alone (greedy tokens)" in names
    non_vacuous = [c for c in quick["checks"] if c["kind"] == ">="]
    assert len(non_vacuous) == 2 and all(c["max_abs_diff"] >= 1e-2 for c in non_vacuous)


def test_quick_result_is_complete(quick):
    assert quick["settings"]["quick"] and quick["settings"]["model"] == "random:tiny-gpt2"
    assert {"cpu", "cores", "torch", "device"} <= set(quick["machine"])
    assert set(quick["scoring"]["variants"]) == set(quick["generation"]["variants"]) == set(VARIANTS)
    assert set(quick["training"]["variants"]) == {"lora", "chameleon"}
    repeats = quick["settings"]["repeats"]
    for section in SECTIONS:
        table = quick[section]
        assert table["variants"][table["reference"]]["ratio"] == 1.0
        for row in table["variants"].values():
            assert len(row["seconds"]) == repeats and row["throughput"] > 0
            assert row["throughput"] == pytest.approx(table["work_per_call"] / row["median_s"])
            assert row["weights_mib"] > 0
            assert quick["memory_method"] is None or row["peak_memory_mib"] is not None
    settings = quick["settings"]
    assert quick["scoring"]["work_per_call"] == settings["batch"] * settings["seq"]
    assert quick["generation"]["work_per_call"] == settings["batch"] * settings["new_tokens"]
    clustering = quick["clustering"]
    assert clustering["rows"] == settings["cluster_rows"] and clustering["k"] == default_k(settings["cluster_rows"], 32)
    assert clustering["total_s"] == pytest.approx(clustering["embed_s"] + clustering["fit_s"] + clustering["assign_s"])
    assert [(t["section"], t["variant"]) for t in quick["targets"]] == [
        *((section, variant) for section, variant, _, _ in TARGETS), ("clustering", "k-means fit + assignment")
    ]
    assert all(isinstance(t["met"], bool) for t in quick["targets"])


def test_report_names_every_variant_and_target(quick):
    report = format_report(quick)
    assert all(name in report for name in VARIANTS)
    assert report.count(">= 0.95 x base") == 2 and "clustering: 1,024 rows" in report


def test_dense_head_equals_factored_head(tiny_gpt2):
    model, _ = tiny_gpt2
    apply_regime(model, AdapterConfig("chameleon", rank=4))
    with torch.no_grad():
        hyper_head(model).hyper.net[-1].weight.normal_(std=0.2)
    naive = dense(model)
    assert isinstance(hyper_head(naive), DenseHyperLoRAHead) and not isinstance(hyper_head(model), DenseHyperLoRAHead)
    ids = torch.randint(model.config.vocab_size, (4, 7))
    embeddings = mean_embedding(model, ids)
    for mode in ("batch", "example"):
        with torch.no_grad(), conditioned(model, embeddings, mode), conditioned(naive, embeddings, mode):
            torch.testing.assert_close(naive(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_a_wrong_path_fails_the_checks():
    """Breaking the dense reference (its update dropped) must raise, not pass silently."""
    settings = BenchSettings.quick_settings()
    base, _ = load_model(settings.model)
    variants = build_variants(base, settings)
    broken = dense(variants["chameleon-merged"].model)
    hyper_head(broken).scale = 0.0
    variants["naive"] = Variant(broken, "broken")
    ids = torch.randint(base.config.vocab_size, (settings.batch, settings.seq))
    with pytest.raises(BenchCheckError, match="factored head equals dense"):
        check_paths(base, variants, settings, ids, torch.ones_like(ids), ids[:, :4])


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"repeats": 0}, "--repeats must be >= 1"),
        ({"batch": 2}, "must hold the mixed batch's 4 clusters"),
        ({"seq": 2}, "--seq must be >= 4"),
    ],
)
def test_bad_settings_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        run_bench(replace(BenchSettings.quick_settings(), **changes))


def test_the_committed_full_run_says_what_the_readme_says():
    """README: every target met at GPT-2 small's shape; the naive head pays for a mixed batch in time and memory."""
    path = Path(__file__).resolve().parents[1] / "assets" / "results" / "bench.json"
    if not path.is_file():
        pytest.skip("no committed bench run")
    result = json.loads(path.read_text())
    assert result["settings"]["model"] == "random:gpt2" and not result["settings"]["quick"]
    assert all(target["met"] for target in result["targets"])
    scoring = result["scoring"]["variants"]
    assert scoring["naive-mixed"]["ratio"] < scoring["chameleon-mixed"]["ratio"]
    assert scoring["naive-mixed"]["peak_memory_mib"] > scoring["chameleon-mixed"]["peak_memory_mib"]
    assert result["clustering"]["reference"]["inertia_ratio"] < 1.002  # clustering.fit_clusters' docstring: 0.2 %
