"""The bench command: its quick mode checks every timed path and reports a complete, well-formed result.

Timings are never asserted: they depend on the machine; only what the bench computes and records is.
"""

import json
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from chameleon_core import AdapterConfig, apply_regime, conditioned, default_k, hyper_head, load_model, mean_embedding
from chameleon_core.bench import SWEEP_TARGETS, TARGETS, BenchSettings, run_bench
from chameleon_core.report import bench_markdown, format_report
from chameleon_core.variants import (
    BenchCheckError, DenseHead, Variant, adapter_name, build_variants, check_paths, dense, score, sweep_variants,
)
from chameleon_core.cli import build_parser, main
from chameleon_core.hyper_head import ConditionedHead, conditioned_head
from conftest import make_bundle_set

SECTIONS = ("scoring", "generation", "training")
SCORED = ("base", "lora", "lora-merged", "chameleon")
GENERATED = (*SCORED, "chameleon-merged", "chameleon-mixed", "naive", "naive-mixed")
SWEPT = ("chameleon-mixed", "lora-per-cluster", "peft-mixed", "naive-mixed")
QUICK = BenchSettings.quick_settings()
POINTS = [1, 4, 16, QUICK.batch]  # distinct clusters in a batch; the last: every row its own


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick run through the command line, shared by the tests that read its result."""
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    assert main(["bench", "--quick", "--json", str(path)]) == 0
    return json.loads(path.read_text())


def test_quick_mode_passes_every_correctness_check(quick):
    assert list(quick["shapes"]) == ["random:tiny-gpt2", "random:tiny-llama"]
    for shape in quick["shapes"].values():
        checks = {check["name"]: check for check in shape["checks"]}
        assert len(checks) == len(shape["checks"]) and all(check["passed"] for check in checks.values())  # names unique
        assert "factored head equals dense W + dW head" in checks
        assert "mixed batch equals cluster 3 run alone (greedy tokens)" in checks
        for name in SWEPT:
            assert all(f"{name}: {n} clusters in a batch equal each cluster run alone" in checks for n in POINTS)
        non_vacuous = [c for c in checks.values() if c["kind"] == ">="]
        assert len(non_vacuous) == 5 and all(c["max_abs_diff"] >= 1e-2 for c in non_vacuous)


def test_quick_result_is_complete(quick):
    settings = quick["settings"]
    assert settings["quick"] and settings["models"] == ["random:tiny-gpt2", "random:tiny-llama"]
    assert {"cpu", "cores", "torch", "device"} <= set(quick["machine"])
    repeats, work = settings["repeats"], settings["batch"] * settings["seq"]
    for shape in quick["shapes"].values():
        assert shape["shape"]["layers"] == 2 and shape["shape"]["parameters"] > 0
        assert list(shape["scoring"]["variants"]) == list(SCORED)
        assert list(shape["generation"]["variants"]) == list(GENERATED)
        assert list(shape["training"]["variants"]) == ["lora", "chameleon"]
        for section in SECTIONS:
            table = shape[section]
            assert table["variants"][table["reference"]]["ratio"] == 1.0
            for row in table["variants"].values():
                assert len(row["seconds"]) == repeats and row["throughput"] > 0
                assert row["throughput"] == pytest.approx(table["work_per_call"] / row["median_s"])
                assert row["weights_mib"] > 0
                assert quick["memory_method"] is None or row["peak_memory_mib"] is not None
        assert shape["scoring"]["work_per_call"] == work
        assert shape["generation"]["work_per_call"] == settings["batch"] * settings["new_tokens"]
        clustering = shape["clustering"]
        assert clustering["rows"] == settings["cluster_rows"]
        assert clustering["k"] == default_k(settings["cluster_rows"], 32)
        parts = clustering["embed_s"] + clustering["fit_s"] + clustering["assign_s"]
        assert clustering["total_s"] == pytest.approx(parts)
        assert [(t["section"], t["variant"], t.get("clusters")) for t in shape["targets"]] == [
            *((section, variant, None) for section, variant, _, _ in TARGETS),
            *(("sweep", variant, n) for variant, _, _ in SWEEP_TARGETS for n in POINTS),
            ("clustering", "k-means fit + assignment", None),
        ]
        assert all(isinstance(t["met"], bool) for t in shape["targets"])


def test_the_sweep_times_every_variant_at_every_point_beside_base(quick):
    for shape in quick["shapes"].values():
        sweep, base = shape["sweep"], shape["scoring"]["variants"]["base"]
        assert sweep["clusters"] == POINTS and list(sweep["variants"]) == list(SWEPT)
        assert sweep["work_per_call"] == quick["settings"]["batch"] * quick["settings"]["seq"]
        for row in sweep["variants"].values():
            assert [point["clusters"] for point in row["points"]] == POINTS and row["weights_mib"] > 0
            for point in row["points"]:
                assert len(point["seconds"]) == quick["settings"]["repeats"] and point["throughput"] > 0
                assert point["throughput"] == pytest.approx(sweep["work_per_call"] / point["median_s"])
                ratios = (b / t for b, t in zip(base["seconds"], point["seconds"]))  # base timed in the same rounds
                assert point["ratio"] == pytest.approx(statistics.median(ratios))
        # chameleon-mixed vs PEFT at each point: with one repeat, the quotient of their ratios to base
        versus_peft = [t["value"] for t in shape["targets"] if (t["variant"], t["reference"]) == SWEEP_TARGETS[1][:2]]
        chameleon, peft = (sweep["variants"][name]["points"] for name in SWEEP_TARGETS[1][:2])
        assert versus_peft == pytest.approx([c["ratio"] / p["ratio"] for c, p in zip(chameleon, peft)])


def test_reports_show_the_sweep_and_whether_each_target_is_met(quick):
    markdown, report = bench_markdown(quick), format_report(quick)
    assert markdown.count("| Variant | What it runs | 1 | 4 | 16 | 20 (every row) | Peak MiB at 20 |") == 2
    for model, shape in quick["shapes"].items():
        assert f"### `{model}`: {shape['shape']['architecture']}, 2 layers" in markdown and f"== {model}:" in report
        for name, row in shape["sweep"]["variants"].items():
            assert f"| {name} | {row['about']} | " + " | ".join(f"{p['ratio']:.3f}" for p in row["points"]) in markdown
        for variant, reference, minimum in SWEEP_TARGETS:
            points = [t for t in shape["targets"] if (t["variant"], t["reference"]) == (variant, reference)]
            missed = ", ".join(str(t["clusters"]) for t in points if not t["met"])
            met = f"**no at {missed}**" if missed else "yes"
            values = " | ".join(f"{t['value']:.3f}" for t in points)
            assert f"| {variant} >= {minimum:g} x {reference} | {values} | {met} |" in markdown
    assert all(name in report for name in (*GENERATED, *SWEPT)) and "clustering: 1,024 rows" in report
    per_shape = len(SWEEP_TARGETS) + len(TARGETS) + 1  # the sweep's, the other ratios', the clustering's
    missed = sum(not all(t["met"] for t in points) for shape in quick["shapes"].values()
                 for points in ([t for t in shape["targets"] if (t["variant"], t["reference"]) == (v, r)]
                                for v, r, _ in SWEEP_TARGETS))
    missed += sum(not t["met"] for shape in quick["shapes"].values() for t in shape["targets"] if t["section"] != "sweep")
    assert markdown.startswith(f"**Targets: {2 * per_shape - missed} of {2 * per_shape} met.**")


def cluster_alone(variant: Variant, cluster: int, ids: torch.Tensor) -> torch.Tensor:
    """``cluster``'s adapter on ``ids`` in a batch of their own, through each head's single-adapter path."""
    if variant.named_adapters:  # PEFT: the adapter made active, no adapter_names
        variant.model.set_adapter(adapter_name(cluster))
        return variant.model(input_ids=ids).logits
    cluster_ids = torch.full((len(ids),), cluster)
    with conditioned(variant.model, mean_embedding(variant.model, ids), "centroid", cluster_ids, variant.centroids):
        return variant.model(input_ids=ids).logits


@torch.inference_mode()
def test_mixed_batches_equal_per_cluster_runs_at_every_sweep_point(tiny):
    """Each row of a mixed batch gets what its cluster's adapter gives it alone, for GPT-2's and Llama's heads."""
    base, _ = tiny
    sweep = sweep_variants(base, build_variants(base, QUICK), QUICK)
    ids = torch.randint(base.config.vocab_size, (QUICK.batch, QUICK.seq))
    for name in SWEPT:
        assert list(sweep[name]) == POINTS
        logits = {}
        for n, variant in sweep[name].items():
            clusters = torch.arange(QUICK.batch) % n
            assert torch.equal(variant.cluster_ids, clusters)
            logits[n] = score(variant, ids, torch.ones_like(ids))
            for cluster in range(n):
                rows = clusters == cluster
                torch.testing.assert_close(logits[n][rows], cluster_alone(variant, cluster, ids[rows]),
                                           rtol=1e-5, atol=1e-5)
        # Not vacuous: every row its own cluster vs every row in cluster 0 differ on every row but row 0.
        per_row = (logits[QUICK.batch] - logits[1]).abs().flatten(1).amax(1)
        assert per_row[0] < 1e-5 and (per_row[1:] > 1e-2).all(), name


def test_head_training_is_timed_through_the_whole_model_and_on_cached_states(quick):
    for shape in quick["shapes"].values():
        table = shape["head training"]
        assert list(table["variants"]) == ["chameleon-head", "chameleon-head, cached"]
        assert table["reference"] == "chameleon-head" and table["variants"]["chameleon-head"]["ratio"] == 1.0
        assert table["variants"]["chameleon-head, cached"]["throughput"] > 0
    assert "chameleon-head, cached" in format_report(quick) and "| head training | chameleon-head, cached |" in bench_markdown(quick)


def test_dense_head_equals_factored_head(tiny_gpt2):
    model, _ = tiny_gpt2
    apply_regime(model, AdapterConfig("chameleon", rank=4))
    with torch.no_grad():
        hyper_head(model).hyper.net[-1].weight.normal_(std=0.2)
    naive = dense(model)
    assert isinstance(conditioned_head(naive), DenseHead) and conditioned_head(naive).head is not hyper_head(model)
    ids = torch.randint(model.config.vocab_size, (4, 7))
    embeddings = mean_embedding(model, ids)
    for conditioning in ("batch", "example"):
        with torch.no_grad(), conditioned(model, embeddings, conditioning):
            with conditioned(naive, embeddings, conditioning):
                torch.testing.assert_close(naive(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def _first_adapter_for_every_row(original):
    """A routing bug: ``ConditionedHead.condition`` that sends every row to the first group's adapter."""
    def condition(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self._groups = torch.zeros_like(self._groups)
    return condition


@pytest.mark.parametrize("breakage", ["dense head without its update", "rows routed to the first adapter"])
def test_a_wrong_path_fails_the_checks(breakage, monkeypatch):
    """Breaking a timed path must raise, naming what broke, not pass silently."""
    base, _ = load_model("random:tiny-gpt2")
    variants = build_variants(base, QUICK)
    if breakage == "dense head without its update":
        broken = dense(variants["chameleon-merged"].model)
        conditioned_head(broken).scale = 0.0
        variants["naive"] = Variant(broken, "broken")
        expected = ["factored head equals dense"]
    else:
        monkeypatch.setattr(ConditionedHead, "condition", _first_adapter_for_every_row(ConditionedHead.condition))
        expected = [f"{name}: {n} clusters in a batch equal" for name in ("chameleon-mixed", "lora-per-cluster")
                    for n in POINTS[1:]]
    ids = torch.randint(base.config.vocab_size, (QUICK.batch, QUICK.seq))
    with pytest.raises(BenchCheckError) as raised:
        check_paths(base, variants, sweep_variants(base, variants, QUICK), QUICK, ids, torch.ones_like(ids), ids[:, :4])
    assert all(text in str(raised.value) for text in expected)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"repeats": 0}, "--repeats must be >= 1"),
        ({"batch": 8}, "--batch must be >= 16"),
        ({"seq": 2}, "--seq must be >= 4"),
        ({"models": ()}, "--models must name one or more different models"),
        ({"models": ("random:tiny-gpt2", "random:tiny-gpt2")}, "--models must name one or more different models"),
    ],
)
def test_bad_settings_are_rejected(changes, message):
    with pytest.raises(ValueError, match=message):
        run_bench(replace(QUICK, **changes))


def test_the_command_line_names_a_bad_option(capsys):
    assert main(["bench", "--quick", "--batch", "8"]) == 2
    assert "--batch must be >= 16" in capsys.readouterr().err
    assert main(["bench", "--quick", "--models", "random:tiny-gpt2,random:nope"]) == 2
    assert "unknown random model 'random:nope'; choose from" in capsys.readouterr().err


def test_models_option_takes_several_shapes():
    parse = build_parser().parse_args
    assert parse(["bench", "--models", "random:gpt2,random:smollm2"]).models == ["random:gpt2", "random:smollm2"]
    assert parse(["bench", "--model", "random:smollm2"]).models == ["random:smollm2"]
    assert parse(["bench"]).models is None and BenchSettings().models == ("random:gpt2",)


def test_random_smollm2_has_smollm2_135m_shape():
    with torch.device("meta"):  # the shape without the weights
        model, _ = load_model("random:smollm2", device="meta")
    c = model.config
    assert (c.model_type, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == (
        "llama", 49152, 576, 1536, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings) == (9, 3, 8192)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # SmolLM2-135M's count


def test_the_committed_full_run_holds_the_sweep_for_both_shapes():
    """README: the sweep at GPT-2 small's and SmolLM2-135M's shapes; the naive head pays for distinct clusters."""
    path = Path(__file__).resolve().parents[1] / "assets" / "results" / "bench.json"
    if not path.is_file():
        pytest.skip("no committed bench run")
    result = json.loads(path.read_text())
    settings = result["settings"]
    assert settings["models"] == ["random:gpt2", "random:smollm2"] and not settings["quick"]
    for shape in result["shapes"].values():
        sweep = shape["sweep"]
        assert sweep["clusters"] == [1, 4, 16, settings["batch"]] and list(sweep["variants"]) == list(SWEPT)
        naive, chameleon = (sweep["variants"][name]["points"][-1] for name in ("naive-mixed", "chameleon-mixed"))
        assert naive["ratio"] < chameleon["ratio"] and naive["peak_memory_mib"] > chameleon["peak_memory_mib"]
        assert shape["clustering"]["reference"]["inertia_ratio"] < 1.002  # clustering.fit_clusters' docstring: 0.2 %


def test_the_committed_serving_run_served_real_prompts_and_kept_every_answer():
    """README: 1, 8 and 24 clients on SmolLM2's demo set, merging on and off and through the page's API."""
    path = Path(__file__).resolve().parents[1] / "assets" / "results" / "bench.json"
    if not path.is_file():
        pytest.skip("no committed bench run")
    serving = json.loads(path.read_text())["serving"]
    assert serving["settings"]["model"] == "smollm2" and serving["settings"]["clients"] == [1, 8, 24]
    runs = {(run["mode"], run["clients"]): run for run in serving["runs"]}
    assert set(runs) == {(mode, n) for mode in ("one at a time", "merged", "http") for n in (1, 8, 24)}
    for (mode, n), run in runs.items():
        assert run["requests"] == 2 * n
        if mode != "one at a time":
            assert run["same_as_alone"] == run["requests"]
    assert runs["merged", 24]["batches"] < runs["one at a time", 24]["batches"]  # merging happened


# ---------------------------------------------------------------- serving section
@pytest.fixture(scope="module")
def serving(tmp_path_factory):
    """``bench --sections serving`` on a tiny bundle set, written into a file that already holds shapes."""
    bundle = make_bundle_set(tmp_path_factory.mktemp("bundles") / "tiny")
    path = tmp_path_factory.mktemp("bench") / "bench.json"
    earlier = {"machine": {"cpu": "earlier"}, "settings": {"repeats": 5}, "memory_method": None, "shapes": {"x": {}}}
    path.write_text(json.dumps(earlier))
    assert main(["bench", "--quick", "--sections", "serving", "--serving-set", str(bundle), "--json", str(path)]) == 0
    return json.loads(path.read_text()), earlier


def test_serving_section_measures_each_mode_and_checks_every_answer(serving):
    result, _ = serving
    runs = result["serving"]["runs"]
    assert [(r["mode"], r["clients"]) for r in runs] == [
        ("one at a time", 1), ("merged", 1), ("one at a time", 2), ("merged", 2), ("http", 1), ("http", 2)]
    for run in runs:
        assert run["requests"] == 2 * run["clients"] and run["latency_p95_s"] >= run["latency_p50_s"] > 0
        if run["mode"] != "one at a time":
            assert run["same_as_alone"] == run["requests"]  # merged or through HTTP, every answer as alone
    assert not any("target" in run for run in runs)  # the target is stated at 24 clients, not measured here
    assert result["serving"]["settings"]["max_new_tokens"] == QUICK.new_tokens


def test_a_section_measured_alone_keeps_the_others_of_the_file(serving):
    result, earlier = serving
    assert {key: result[key] for key in earlier} == earlier  # shapes, with the machine and settings they had
    assert result["serving"]["machine"]["cpu"] != "earlier"


def test_serving_reports_name_modes_and_answers(serving):
    result, _ = serving
    text = format_report({"serving": result["serving"]})
    assert text.startswith("== serving tiny") and "   4/4" in text
    markdown = bench_markdown({"serving": result["serving"]})
    assert markdown.startswith("### Serving `tiny`") and "Targets" not in markdown and "| 2 | http |" in markdown and "| 4 / 4 |" in markdown


def test_serving_refuses_a_file_it_cannot_keep_from_and_a_set_that_is_not_one(tmp_path, capsys):
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    assert main(["bench", "--sections", "serving", "--json", str(notes)]) == 2
    assert "holds no bench sections (shapes, serving)" in capsys.readouterr().err
    assert notes.read_text() == '{"mine": 1}'
    assert main(["bench", "--sections", "serving", "--serving-set", str(tmp_path)]) == 2
    assert f"--serving-set {tmp_path} is not a bundle set" in capsys.readouterr().err


def test_without_peft_the_shapes_section_says_what_to_install(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "peft" else find_spec(name, *rest))
    with pytest.raises(ValueError, match=r"pip install peft \(or chameleon-llm\[bench\]\)"):
        run_bench(QUICK)
