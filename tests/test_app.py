"""The demo app, served in-process on a tiny bundle set and driven through gradio_client."""

from __future__ import annotations

import copy
import json
import os
import re
import time
import unicodedata
from pathlib import Path

import gradio as gr
import httpx
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

from chameleon_core import bundle_set as bundle_sets, inference, load_model
from chameleon_core.bundle import BundleError
from chameleon_core.bundle_set import COMPARED, find_bundle_set
from chameleon_core.inference import MAX_REQUEST_TOKENS, Request, adapter_summary, embed_prompts, generate_rows
from chameleon_core.serving import measure_serving

import app
from conftest import LONG, MODEL, SIX_DOMAINS, loaded_modules, make_bundle_set

ACCENTED = SIX_DOMAINS[0].replace("golden", "doré")  # NFC: é is one code point


@pytest.fixture(scope="module")
def client(served) -> Client:
    return Client(served[1], verbose=False)


def call_raw(url: str, data: list) -> str:
    """/compare called over plain HTTP with ``data`` as given (JSON with escapes, so lone surrogates pass): the
    event stream's text."""
    post = httpx.post(f"{url.rstrip('/')}/gradio_api/call/compare", content=json.dumps({"data": data}),
                      headers={"Content-Type": "application/json"}, timeout=30)
    return httpx.get(f"{url.rstrip('/')}/gradio_api/call/compare/{post.json()['event_id']}", timeout=60).text


def compare(client: Client, prompts: str, cluster_source="trained", k=3, max_new_tokens=8, decoding="greedy", seed=0):
    """The /compare endpoint: (figure dict, assignments rows, generations rows, adapter rows, status)."""
    plot, assignments, generations, adapters, status = client.predict(
        prompts, cluster_source, k, max_new_tokens, decoding, seed, api_name="/compare"
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


def test_prompt_clusters_come_from_k_means_on_the_prompts(client):
    _, assignments, _, adapters, _ = compare(client, "\n".join(SIX_DOMAINS[:4]), cluster_source="prompts", k=2)
    assert {row[2] for row in assignments} == {0, 1}
    assert len(adapters) == 2
    _, assignments, _, adapters, _ = compare(client, "\n".join(SIX_DOMAINS[:3]), cluster_source="prompts", k=8)
    assert {row[2] for row in assignments} == {0, 1, 2}  # k capped at the number of prompts


SEED_RANGE = re.escape("Seed must be an integer from 0 to 2**32 - 1 (4,294,967,295); got ")


@pytest.mark.parametrize(
    "prompts, settings, message",
    [
        ("", {}, "input is empty"),
        ("  \n\t \n   ", {}, "input is empty"),
        (None, {}, "input is empty"),
        (7, {}, "Prompts must be text, one prompt per line; got int 7"),
        ("\n".join(f"prompt {i}" for i in range(33)), {}, "33 prompts given; at most 32"),
        ("short\n" + "x" * 2001, {}, "Prompt 2 is 2,001 characters long; the limit is 2,000"),
        ("fine\nring the \x07 bell", {}, "Prompt 2 contains the control character U\\+0007"),
        ("nul \x00 byte", {}, "U\\+0000"),
        ("hello", {"seed": -5}, SEED_RANGE + "-5"),
        ("hello", {"seed": 2**32}, SEED_RANGE + "4294967296"),
        ("hello", {"seed": 2**64}, SEED_RANGE + "18446744073709551616"),
        ("hello", {"seed": 10**30}, SEED_RANGE + "1" + "0" * 30),
        ("hello", {"seed": 1e300}, SEED_RANGE + re.escape("1e+300")),
        ("hello", {"seed": 0.5}, SEED_RANGE + "0.5"),
        ("hello", {"seed": "7"}, SEED_RANGE + "'7'"),
        ("hello", {"k": 0}, re.escape("k (clusters among the prompts) must be an integer from 1 to 32; got 0.")),
        ("hello", {"k": 33}, re.escape("k (clusters among the prompts) must be an integer from 1 to 32; got 33.")),
        ("hello", {"k": "three"}, re.escape("k (clusters among the prompts) must be an integer from 1 to 32; got 'three'.")),
        ("hello", {"k": None}, re.escape("k (clusters among the prompts) must be an integer from 1 to 32; got None.")),
        ("hello", {"max_new_tokens": 0}, "Max new tokens must be an integer from 1 to 128; got 0"),
        ("hello", {"max_new_tokens": 129}, "Max new tokens must be an integer from 1 to 128; got 129"),
        ("hello", {"max_new_tokens": "8"}, "Max new tokens must be an integer from 1 to 128; got '8'"),
        ("hello", {"max_new_tokens": None}, "Max new tokens must be an integer from 1 to 128; got None"),
        ("hello", {"cluster_source": "nearest"}, "Cluster source must be one of 'trained' or 'prompts'; got 'nearest'"),
        ("hello", {"decoding": "beam"}, "Decoding must be one of 'greedy' or 'sample'; got 'beam'"),
    ],
    ids=["empty", "whitespace", "none", "number", "too-many", "too-long", "bell", "nul", "seed-negative", "seed-2**32",
         "seed-2**64", "seed-10**30", "seed-1e300", "seed-fraction", "seed-string", "k-0", "k-33", "k-string", "k-none",
         "tokens-0", "tokens-129", "tokens-string", "tokens-none", "cluster-source", "decoding"],
)
def test_bad_input_gets_a_specific_message(client, capfd, prompts, settings, message):
    with pytest.raises(AppError, match=message) as raised:
        compare(client, prompts, **settings)
    assert "upstream Gradio app" not in str(raised.value)
    assert "Traceback" not in capfd.readouterr().err  # expected errors are answers, not crashes


def test_an_unexpected_error_is_not_passed_off_as_bad_input(client, capfd, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(bundle_sets, "fit_prompts", broken)  # a module function: the shared bundle set stays untouched
    with pytest.raises(AppError) as raised:
        compare(client, "hello")
    assert "an internal bug" not in str(raised.value)  # not shown as if the input were wrong
    log = capfd.readouterr().err
    assert "Traceback" in log and "ValueError: an internal bug" in log  # but logged for whoever runs the server


def test_an_empty_seed_means_zero(client):
    assert compare(client, "hello", seed=None)[2] == compare(client, "hello", seed=0)[2]


def test_an_over_long_prompt_is_cut_to_its_end_and_the_page_says_so(served, client):
    positions = served[0].bundle_set.model.config.max_position_embeddings
    assert len(served[0].bundle_set.tokenizer(LONG)["input_ids"]) > positions  # IndexError before the cut existed
    _, assignments, generations, adapters, status = compare(client, LONG, max_new_tokens=8)
    assert [row[1] for row in assignments] == [row[1] for row in generations["data"]] == [LONG]
    assert all(isinstance(text, str) for text in generations["data"][0][2:]) and len(adapters) == 1
    note = f"Prompts cut to fit the model's {positions} positions with 8 new tokens (each keeps its end): prompt 1 to its last"
    assert note in status


def test_every_step_reads_the_same_cut_prompt(served, monkeypatch):
    """Embedding, the three generations and the adapter summary all get the cut prompt (in the template where
    the models read it), so the condition and the continuation describe the same text."""
    monkeypatch.setattr(inference, "MAX_REQUEST_TOKENS", 4096)  # a short and a long prompt; the budget is tested below
    bundle_set = copy.copy(served[0].bundle_set)
    bundle_set.template = "### Instruction:\n{prompt}\n\n### Response:\n"
    seen = {"embed": [], "generate": [], "summary": []}

    def spy(name, function, module):
        def wrapper(*args, **kwargs):
            seen[name].append(args[2] if name == "generate" else args[1])
            return function(*args, **kwargs)
        monkeypatch.setattr(module, function.__name__, wrapper)

    spy("embed", embed_prompts, inference)
    spy("generate", generate_rows, inference)
    spy("summary", adapter_summary, bundle_sets)
    result = bundle_set.compare(Request.parse([SIX_DOMAINS[0], SIX_DOMAINS[1], LONG], max_new_tokens=8))
    first, second, cut = result.fitted.conditions
    assert [first, second] == SIX_DOMAINS[:2] and LONG.endswith(cut) and len(cut) < len(LONG)
    assert seen["embed"] == [[first, second, cut]]
    texts = [bundle_set.template.format(prompt=p) for p in (first, second, cut)]
    # padding the short prompts to the long one would be mostly padding: the long one is generated on its own
    assert result.fitted.texts == texts and seen["generate"] == [texts[:2], texts[2:]] * 3 and seen["summary"] == [texts]
    assert len(bundle_set.tokenizer(texts[2])["input_ids"]) <= bundle_set.model.config.max_position_embeddings - 8
    assert result.fitted.cut == {3: len(bundle_set.tokenizer(cut)["input_ids"])}
    assert [row["prompt"] for row in result.rows()] == [*SIX_DOMAINS[:2], LONG]  # shown as typed


def test_a_request_over_the_token_budget_says_what_to_reduce(client):
    with pytest.raises(AppError, match=re.escape(
        f"This request needs 1,024 tokens: 2 prompt(s) × (504 tokens of the longest prompt, template included, + 8 new "
        f"tokens), as every prompt is padded to the longest. The limit is {MAX_REQUEST_TOKENS} tokens per request: "
        "use fewer or shorter prompts, or fewer new tokens."
    )):
        compare(client, f"{LONG}\nhello", max_new_tokens=8)


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
    jobs = [client.submit("\n".join(batch), "trained", 3, 6, "greedy", 0, api_name="/compare") for batch in batches]
    for batch, job in zip(batches, jobs):
        rows = job.result(timeout=120)[2]["data"]
        expected = bundle_set.compare(Request.parse(batch, max_new_tokens=6)).rows()
        assert [row[1:] for row in rows] == [[e["prompt"], e["base"], e["lora"], e["chameleon"]] for e in expected]


def test_the_answers_stream_in_as_the_models_write_them(served, client, monkeypatch):
    step = inference.AnswerEnd.__call__

    def paced(self, *args, **kwargs):  # a real model's pace (tens of ms a token), so the page sees the pieces
        time.sleep(0.03)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(inference.AnswerEnd, "__call__", paced)
    prompts = SIX_DOMAINS[:2]
    job = client.submit("\n".join(prompts), "trained", 3, 12, "greedy", 0, api_name="/compare")
    final = job.result(timeout=120)
    queued, *outputs = job.outputs()
    assert queued[4].startswith("**Waiting for the models…**")
    assert len(outputs) > len(COMPARED) + 1  # tokens arrive in pieces, not a column at a time
    expected = served[0].bundle_set.compare(Request.parse(prompts, max_new_tokens=12)).rows()
    assert [row[2:] for row in final[2]["data"]] == [[e[regime] for regime in COMPARED] for e in expected]
    for output in outputs[:-1]:  # every cell: not started, the start of its final answer being written, or final
        for row, done in zip(output[2]["data"], final[2]["data"]):
            for cell, answer in zip(row[2:], done[2:]):
                assert cell in (app.PENDING, answer) or (cell.endswith(app.CURSOR) and answer.startswith(cell[:-1]))
    statuses = [output[4].split("…")[0] for output in outputs[:-1]]
    assert statuses == sorted(statuses, key=["**Generating with Base", "**Generating with Static LoRA",
                                             "**Generating with ChameleonLLM", "**Summarising the adapters"].index)
    assert outputs[0][1]["data"] == final[1]["data"]  # the clusters come first, with empty columns
    assert outputs[0][3]["data"] == [] and final[3]["data"]  # the adapters come last
    assert tuple(outputs[-1]) == tuple(final) and final[4].startswith("**Ready.**")


def test_requests_sent_together_share_a_batch(served, client, monkeypatch):
    scheduler = served[0].scheduler
    monkeypatch.setattr(scheduler, "window", 2.0)  # room for all six to arrive through Gradio's queue
    before = sum(scheduler.batch_sizes.values())
    jobs = [client.submit(prompt, "trained", 3, 4, "greedy", 0, api_name="/compare") for prompt in SIX_DOMAINS]
    for prompt, job in zip(SIX_DOMAINS, jobs):
        assert job.result(timeout=120)[2]["data"][0][1] == prompt
    assert sum(scheduler.batch_sizes.values()) - before <= 2  # with two at a time, Gradio would pass at most two on


def test_a_full_queue_says_to_come_back(served, client, monkeypatch):
    monkeypatch.setattr(served[0].scheduler, "max_waiting", 0)
    with pytest.raises(AppError, match=re.escape("The server is busy: 0 prompt(s) from 0 request(s) are waiting, and "
                                                 "at most 0 may wait. Try again in a minute, or send fewer prompts.")):
        compare(client, "hello")


def test_the_serving_measurement_goes_through_the_page(served):
    engine, url = served  # the page serving this bundle set
    result = measure_serving(engine.bundle_set, clients=(2,), requests_per_client=1, max_new_tokens=4, url=url,
                             prompts=SIX_DOMAINS)
    [http] = [run for run in result["runs"] if run["mode"] == "http"]
    assert http["requests"] == http["same_as_alone"] == 2 and http["speedup"] > 0
    assert 0 < http["first_token_p50_s"] < http["latency_p95_s"]  # the first token arrives before the whole answer


def test_compare_is_the_one_named_api_endpoint_and_explains_itself():
    endpoints = app.build_demo(app.Engine(model_name=MODEL)).get_api_info()["named_endpoints"]
    assert list(endpoints) == ["/compare"]  # Stop and the status poll stay off the API page
    endpoint = endpoints["/compare"]
    assert endpoint["description"] == app.API_DESCRIPTION
    names = [p["parameter_name"] for p in endpoint["parameters"]]
    assert names == ["prompts", "cluster_source", "k", "max_new_tokens", "decoding", "seed"]
    types = [p["python_type"]["type"] for p in endpoint["parameters"]]
    assert types == ["str", "Literal['trained', 'prompts']", "float", "float", "Literal['greedy', 'sample']", "int"]
    assert len(endpoint["returns"]) == 5


def test_bundle_set_for_another_model_is_refused(served):
    engine = app.Engine(model_name="random:tiny-llama", bundle=served[0].bundle_set.path).start()
    assert engine.wait(60)
    assert "not a bundle set for random:tiny-llama" in engine.status()
    with pytest.raises(gr.Error, match="not a bundle set for random:tiny-llama"):
        engine.ready()


def test_serving_an_existing_set_never_imports_training(served, tmp_path):
    """Only building a set trains; opening and comparing one needs no trainer (and none of its imports)."""
    loaded = loaded_modules(
        f"from chameleon_core.bundle_set import open_bundle_set\nfrom chameleon_core.inference import Request\n"
        f"open_bundle_set({MODEL!r}, {str(served[0].bundle_set.path)!r}, build=False).compare(Request.parse(['hello'], max_new_tokens=2))",
        CHAMELEON_CACHE=str(tmp_path),
    )
    assert "chameleon_core.bundle_set" in loaded and "chameleon_core.train" not in loaded


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


def test_an_unreadable_projection_cache_is_refitted(tmp_path, monkeypatch):
    from chameleon_core import projection

    points = torch.randn(12, 8, generator=torch.Generator().manual_seed(0))
    first = projection.fit_projection(points, cache_dir=tmp_path)
    [file] = (tmp_path / "projections").glob("*.pkl")
    file.write_bytes(b"\x80\x04not a pickle of this code")
    monkeypatch.setattr(projection, "_PROJECTIONS", {})  # forget the in-memory copy: read the disk
    again = projection.fit_projection(points, cache_dir=tmp_path)
    assert again.method == first.method == "pca"
    assert torch.allclose(torch.as_tensor(again.coords), torch.as_tensor(first.coords))


@pytest.mark.parametrize("values", [0, 1, 5, 7])
def test_a_wrong_number_of_values_says_what_compare_takes(served, values):
    stream = call_raw(served[1], ["hello", "trained", 3, 8, "greedy", 0, "extra"][:values])
    assert "event: error" in stream
    assert f"/compare takes 6 values (prompts, cluster_source, k, max_new_tokens, decoding, seed); got {values}." in stream


def test_the_api_requires_prompts_and_defaults_the_settings_to_the_pages(client):
    with pytest.raises(TypeError, match="prompts"):
        client.predict(api_name="/compare")
    left_out = client.predict("hello", api_name="/compare")
    assert left_out[2] == client.predict("hello", "trained", 3, 32, "greedy", 0, api_name="/compare")[2]


@pytest.mark.parametrize("surrogate", ["\ud800", "\udfff"])
def test_a_lone_surrogate_gets_a_clear_message(served, surrogate):
    stream = call_raw(served[1], [f"Why is the sky blue?{surrogate}", "trained", 3, 8, "greedy", 0])
    assert "event: error" in stream
    assert f"Prompt 1 contains U+{ord(surrogate):04X}, half of a UTF-16 surrogate pair" in stream


@pytest.mark.parametrize(
    "variant, typed",
    [(unicodedata.normalize("NFD", ACCENTED), ACCENTED), (SIX_DOMAINS[0].replace(" ", " \u200d\u200b", 3), SIX_DOMAINS[0])],
    ids=["nfd", "zero-width"],
)
def test_text_that_looks_the_same_gets_the_same_cluster_and_answer(client, variant, typed):
    assert variant != typed
    assert compare(client, variant)[1:3] == compare(client, typed)[1:3]


@pytest.mark.parametrize(
    "field, extra",
    [("dataset", {"lora": {"dataset": "wikitext"}}),  # lora/ on WikiText beside chameleon/ on the synthetic corpus
     ("dataset", {"chameleon": {"dataset": "alpaca"}}),  # and the reverse
     ("prompt format", {"chameleon": {"prompt_template": "### Instruction:\n{prompt}\n\n### Response:\n"}}),
     ("data split seed", {"lora": {"train": {"data_seed": 1}}, "chameleon": {"train": {"data_seed": 0}}}),
     ("held-out rows", {"lora": {"train": {"max_eval_rows": 100}}, "chameleon": {"train": {"max_eval_rows": 200}}})],
    ids=["lora-other-data", "chameleon-other-data", "prompt-format", "split", "held-out-rows"],
)
def test_a_set_of_bundles_trained_on_different_data_is_refused(tmp_path, field, extra):
    path = make_bundle_set(tmp_path / "mixed", extra)
    with pytest.raises(BundleError, match=f"mixes bundles trained on different data: its {field} "):
        bundle_sets.open_bundle_set(MODEL, path, build=False)


def test_training_settings_that_differ_are_shown_per_column(tmp_path):
    train = {"lora": {"rank": 8, "epochs": 2, "max_length": 64}, "chameleon": {"rank": 4, "epochs": 1, "max_length": 32}}
    path = make_bundle_set(tmp_path / "set", {regime: {"train": settings, "rows": {"train": 300 if regime == "lora" else 200}}
                                              for regime, settings in train.items()})
    engine = app.Engine(model_name=MODEL, bundle=path).start()
    assert engine.wait(120) and ("Static LoRA: rank 8, 2 epoch(s) on 300 synthetic rows of up to 64 tokens; ChameleonLLM: rank 4, "
            "1 epoch(s) on 200 synthetic rows of up to 32 tokens, prompts in plain text") in engine.status()
    engine.close()


def test_a_corrupt_set_is_named_to_clients_without_the_servers_path(tmp_path):
    path = make_bundle_set(tmp_path / "appsets" / "trunc")
    adapter = path / "chameleon" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:100])
    engine = app.Engine(model_name=MODEL, bundle=str(path.resolve())).start()
    assert engine.wait(60) and engine.error is not None and str(tmp_path) in engine.error  # the log's message
    with pytest.raises(gr.Error) as raised:
        engine.ready()
    for message in (engine.status(), str(raised.value)):
        assert "adapter.safetensors in bundle trunc/chameleon is corrupt or truncated" in message
        assert str(tmp_path) not in message and "/tmp" not in message and "/pytest-" not in message


def test_an_example_runs_once_then_comes_from_the_cache(served, monkeypatch):
    """An example sets every control to the page's defaults; its first click runs the models, later clicks
    read the same answers back without a new request."""
    engine = served[0]
    submitted = []
    submit = engine.scheduler.submit
    monkeypatch.setattr(engine.scheduler, "submit", lambda *args: submitted.append(args) or submit(*args))
    examples = app.build_demo(engine).examples
    assert [row[1:] for row in examples.examples] == [list(app.SETTINGS.values())] * len(app.EXAMPLES)
    first = examples.load_from_cache(1)
    again = examples.load_from_cache(1)
    assert len(submitted) == 1 and list(submitted[0][0].prompts) == app.EXAMPLES["Science and numbers"].splitlines()
    assert again[2] == first[2] and len(first[2].data) == 4  # the same four answers, from the cache
    assert str(Path(examples.cached_folder)).startswith(os.environ["GRADIO_EXAMPLES_CACHE"])


def test_a_stopped_example_is_not_cached(served, monkeypatch):
    engine = served[0]
    examples = app.build_demo(engine).examples
    submit = engine.scheduler.submit

    def stopped(*args):
        job = submit(*args)
        engine.scheduler.stop(job)
        return job

    monkeypatch.setattr(engine.scheduler, "submit", stopped)
    with pytest.raises(gr.Error, match="Stopped before the example's answers were complete"):
        examples.load_from_cache(0)
    monkeypatch.setattr(engine.scheduler, "submit", submit)
    assert "Stopped" not in examples.load_from_cache(0)[4]  # the next click runs it again, to the end
