"""The demo app, served in-process on a tiny bundle set and driven through gradio_client."""

from __future__ import annotations

import copy
import json
import socket
import sys
from pathlib import Path

import gradio as gr
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from chameleon_core import AdapterConfig, Points, apply_regime, embed_texts, fit_clusters, load_model, load_synthetic, save_bundle
from chameleon_core.hyper_head import hyper_head
from chameleon_core.inference import embed_prompts, find_bundle_set
from chameleon_core.lora import lora_layers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # app.py sits at the repository root
import app  # noqa: E402

MODEL = "random:tiny-gpt2"
SIX_DOMAINS = app.EXAMPLES["Six domains"].splitlines()


def make_bundle_set(out: Path) -> Path:
    """A lora/ + chameleon/ set on random:tiny-gpt2 with synthetic-corpus clusters and points.

    The adapters are random rather than trained (fast), and large enough that each cluster's
    generated head update changes what the model writes.
    """
    model, tokenizer = load_model(MODEL)
    texts = [record.condition for record in load_synthetic()["train"][:300]]
    embeddings = embed_texts(model, tokenizer, texts, max_length=32)
    clusters, labels = fit_clusters(embeddings, k=6, seed=0)
    torch.manual_seed(0)
    for regime in ("lora", "chameleon"):
        adapted = copy.deepcopy(model)
        config = apply_regime(adapted, AdapterConfig(regime=regime)).config
        with torch.no_grad():
            for layer in lora_layers(adapted).values():
                layer.lora_B.normal_(std=0.05)
            if (head := hyper_head(adapted)) is not None:
                head.hyper.net[-1].weight.normal_(std=0.5)
        metadata = {"dataset": "synthetic", "embedding": {"max_length": 32}}
        save_bundle(out / regime, adapted, tokenizer, config, clusters, metadata, MODEL, Points(embeddings, labels, texts))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(engine, url) of the app running in a background thread; closed after the module."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CHAMELEON_CACHE", str(tmp_path_factory.mktemp("cache")))
        bundle = make_bundle_set(tmp_path_factory.mktemp("bundles") / "tiny")
        engine = app.Engine(model_name=MODEL, bundle=bundle).start()
        assert engine.wait(120) and engine.bundle_set is not None, engine.status()
        port = free_port()
        demo = app.serve(app.build_demo(engine), prevent_thread_lock=True, server_port=port, quiet=True)
        try:
            yield engine, f"http://127.0.0.1:{port}/"
        finally:
            demo.close()


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[1], verbose=False)


def compare(client: Client, prompts: str, mode="centroids", k=3, max_new_tokens=8, decoding="greedy", seed=0):
    """The /compare endpoint: (figure dict, assignments rows, generations rows, adapter rows, status)."""
    plot, assignments, generations, adapters, status = client.predict(
        prompts, mode, k, max_new_tokens, decoding, seed, api_name="/compare"
    )
    return json.loads(plot["plot"]), assignments["data"], generations, adapters["data"], status


def test_compare_returns_map_tables_and_three_generations(served, client):
    bundle_set = served[0].bundle_set
    figure, assignments, generations, adapters, status = compare(client, "\n".join(SIX_DOMAINS))
    assert status.startswith("**Ready.**")

    labels, distances = bundle_set.clusters.assign(embed_prompts(bundle_set.chameleon, SIX_DOMAINS))
    assert [row[1] for row in assignments] == SIX_DOMAINS
    assert [row[2] for row in assignments] == labels.tolist()
    assert [row[3] for row in assignments] == pytest.approx(distances.tolist(), abs=1e-4)

    assert generations["headers"] == ["#", "Prompt", "Base", "Static LoRA", "ChameleonLLM"]
    rows = generations["data"]
    assert [row[1] for row in rows] == SIX_DOMAINS
    assert all(isinstance(text, str) for row in rows for text in row[2:])
    assert any(row[4] != row[2] for row in rows), "the generated adapters should change some continuation"

    assert sorted(row[0] for row in adapters) == sorted(set(labels.tolist()))
    assert sum(row[1] for row in adapters) == len(SIX_DOMAINS)
    assert all(row[2] > 0 and row[3] for row in adapters)

    *training, stars = figure["data"]
    assert len(training) == bundle_set.clusters.k
    assert sum(len(trace["x"]) for trace in training) == len(bundle_set.points.texts)
    assert stars["name"] == "your prompts" and stars["text"] == [f"P{i}" for i in range(1, 7)]
    assert len(stars["x"]) == len(stars["y"]) == 6


def test_greedy_repeats_and_sampling_follows_the_seed(client):
    prompts = "\n".join(SIX_DOMAINS[:3])
    generations = lambda **kw: compare(client, prompts, max_new_tokens=12, **kw)[2]["data"]  # noqa: E731
    assert generations() == generations()
    assert generations(decoding="sample", seed=1) == generations(decoding="sample", seed=1)
    assert generations(decoding="sample", seed=1) != generations(decoding="sample", seed=2)


def test_batch_mode_clusters_the_prompts_themselves(client):
    _, assignments, _, adapters, _ = compare(client, "\n".join(SIX_DOMAINS[:4]), mode="batch", k=2)
    assert {row[2] for row in assignments} == {0, 1}
    assert len(adapters) == 2
    _, assignments, _, adapters, _ = compare(client, "\n".join(SIX_DOMAINS[:3]), mode="batch", k=8)
    assert {row[2] for row in assignments} == {0, 1, 2}  # k capped at the number of prompts


@pytest.mark.parametrize(
    "prompts, settings, message",
    [
        ("", {}, "input is empty"),
        ("  \n\t \n   ", {}, "input is empty"),
        ("\n".join(f"prompt {i}" for i in range(33)), {}, "33 prompts given; at most 32"),
        ("short\n" + "x" * 2001, {}, "Prompt 2 is 2,001 characters long; the limit is 2,000"),
        ("fine\nring the \x07 bell", {}, "Prompt 2 contains the control character U\\+0007"),
        ("nul \x00 byte", {}, "U\\+0000"),
        ("hello", {"max_new_tokens": 129}, "greater than maximum value 128"),
        ("hello", {"decoding": "beam"}, "not in the list of choices"),
    ],
    ids=["empty", "whitespace", "too-many", "too-long", "bell", "nul", "tokens", "decoding"],
)
def test_bad_input_gets_a_specific_message(client, prompts, settings, message):
    with pytest.raises(AppError, match=message):
        compare(client, prompts, **settings)


def test_app_keeps_serving_after_bad_input(client):
    with pytest.raises(AppError):
        compare(client, "\x1b[31m")
    assert len(compare(client, "still here")[2]["data"]) == 1


def test_markup_is_used_and_shown_as_plain_text(client):
    prompt = "<b>bold</b> & <script>alert(1)</script>"
    figure, assignments, generations, _, status = compare(client, prompt)
    assert assignments[0][1] == generations["data"][0][1] == prompt
    assert "Markup in prompt(s) 1 is used and shown as plain text" in status
    stars = figure["data"][-1]
    assert stars["customdata"][0][0] == "&lt;b&gt;bold&lt;/b&gt; &amp; &lt;script&gt;alert(1)&lt;/script&gt;"


def test_eight_simultaneous_calls_all_complete_correctly(served, client):
    bundle_set = served[0].bundle_set
    batches = [SIX_DOMAINS[i % 6 :] + SIX_DOMAINS[: i % 6] for i in range(8)]
    batches = [batch[: 1 + i % 6] for i, batch in enumerate(batches)]
    jobs = [client.submit("\n".join(batch), "centroids", 3, 6, "greedy", 0, api_name="/compare") for batch in batches]
    for batch, job in zip(batches, jobs):
        rows = job.result(timeout=120)[2]["data"]
        expected = bundle_set.compare(batch, max_new_tokens=6).rows()
        assert [row[1:] for row in rows] == [[e["prompt"], e["base"], e["lora"], e["chameleon"]] for e in expected]


def test_compare_is_a_named_api_endpoint(client):
    endpoint = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/compare"]
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == ["prompts", "cluster_mode", "k", "max_new_tokens", "decoding", "seed"]
    assert len(endpoint["returns"]) == 5


def test_bundle_set_for_another_model_is_refused(served):
    engine = app.Engine(model_name="random:tiny-llama", bundle=served[0].bundle_set.path).start()
    assert engine.wait(60)
    assert "not a bundle set for random:tiny-llama" in engine.status()
    with pytest.raises(gr.Error, match="not a bundle set for random:tiny-llama"):
        engine.ready()


def test_demo_set_is_built_with_progress_when_none_fits(tmp_path, monkeypatch):
    monkeypatch.setenv("CHAMELEON_CACHE", str(tmp_path / "cache"))
    engine = app.Engine(model_name=MODEL, root=tmp_path / "bundles", max_train_rows=64).start()
    seen = []
    while not engine.wait(0.1):
        seen.append(engine.status())
    assert engine.bundle_set is not None, engine.status()
    assert any(s.startswith("**Preparing the adapters:") and "training ChameleonLLM" in s for s in seen)
    built = tmp_path / "bundles" / "random-tiny-gpt2-synthetic"
    assert engine.bundle_set.path == built and engine.status().startswith("**Ready.**")
    assert find_bundle_set(tmp_path / "bundles", load_model(MODEL)[0]) == built  # cached: the next start reuses it
