"""One conditioning vocabulary, carried by the adapter config from a training run to generation."""

from __future__ import annotations

import json

import re

import pytest
import torch

from chameleon_core import AdapterConfig, apply_regime, hyper_head, load_model, mean_embedding
from chameleon_core.cli import build_parser
from chameleon_core.inference import generate
from chameleon_core.train import TrainConfig, train

# Four prompts of the same token length, so a batch needs no padding and rows are comparable alone.
PROMPTS = ["a b c d", "h g f e", "a b a b", "d c b a"]
CLUSTER_IDS = torch.tensor([0, 1, 0, 1])


def test_every_entry_point_refuses_an_unknown_conditioning_naming_the_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--out", "x", "--conditioning", "cluster"])
    quoted = "'?{}'?".format  # argparse quotes the choices in some Python versions, not in others
    choices = ", ".join(map(quoted, ("batch", "centroid", "example")))
    assert re.search(rf"invalid choice: 'cluster' \(choose from {choices}\)", capsys.readouterr().err)
    for bad in ("cluster", "centroids"):
        with pytest.raises(ValueError, match=rf"unknown conditioning '{bad}'; choose from \('batch', 'centroid', 'example'\)"):
            TrainConfig(conditioning=bad)
        with pytest.raises(ValueError, match=f"unknown conditioning '{bad}'"):
            AdapterConfig(conditioning=bad)


def test_the_training_config_carries_every_adapter_setting():
    config = TrainConfig(regime="chameleon", rank=2, alpha=8.0, init="paper", targets=["c_attn"], hyper_hidden=[16],
                         hyper_dropout=0.1, conditioning="example", hyper_init="lora")
    assert config.adapter == AdapterConfig("chameleon", 2, 8.0, "paper", ("c_attn",), (16,), 0.1, "example",
                                           hyper_init="lora")
    with pytest.raises(ValueError, match="unknown LoRA init 'xavier'"):
        TrainConfig(init="xavier")
    with pytest.raises(ValueError, match=r"hyper_hidden sizes must be >= 1 and 0 <= hyper_dropout < 1, got \(0,\)"):
        TrainConfig(hyper_hidden=(0,))


def test_a_training_run_builds_the_adapter_its_config_names(tmp_path):
    config = TrainConfig(model="random:tiny-gpt2", dataset="synthetic", regime="chameleon", epochs=1, max_length=48,
                         max_train_rows=48, max_eval_rows=16, batch_size=16, hyper_hidden=(16,), hyper_dropout=0.0,
                         conditioning="centroid")
    result = train(config, tmp_path / "run", show_progress=False)
    adapter = json.loads((tmp_path / "run" / "config.json").read_text())["adapter"]
    assert (adapter["hyper_hidden"], adapter["hyper_dropout"], adapter["conditioning"]) == ([16], 0.0, "centroid")
    assert result["adapter"]["k"] == result["k"] > 1


def test_a_run_conditioned_on_hidden_states_embeds_prompts_at_inference_as_it_trained(tmp_path):
    """``condition_source="hidden"``: the run records it, the bundle's embedding settings carry it, and a
    prompt embedded through the trained bundle (layer LoRA and all) gets the frozen model's vector."""
    from chameleon_core.bundle import load_bundle
    from chameleon_core.embeddings import embed_texts
    from chameleon_core.inference import embed_prompts

    config = TrainConfig(model="random:tiny-gpt2", dataset="synthetic", regime="chameleon", epochs=1, max_length=48,
                         max_train_rows=48, max_eval_rows=16, batch_size=16, hyper_hidden=(16,),
                         condition_source="hidden")
    result = train(config, tmp_path / "run", show_progress=False)
    assert result["config"]["condition_source"] == "hidden" and result["embedding"]["source"] == "hidden"
    bundle = load_bundle(tmp_path / "run")
    assert bundle.metadata["embedding"]["source"] == "hidden"
    base, tokenizer = load_model("random:tiny-gpt2")
    frozen = embed_texts(base, tokenizer, PROMPTS, **bundle.metadata["embedding"])
    torch.testing.assert_close(embed_prompts(bundle, PROMPTS), frozen, rtol=0, atol=1e-5)
    assert not torch.allclose(frozen, embed_texts(base, tokenizer, PROMPTS), atol=1e-2)  # not the input embeddings
    with pytest.raises(ValueError, match="unknown condition source 'logits' \\(--condition-source\\); choose from"):
        TrainConfig(condition_source="logits")


@pytest.fixture
def chameleon():
    """A tiny GPT-2 with a ChameleonLLM head whose generated adapter clearly depends on its input."""
    model, tokenizer = load_model("random:tiny-gpt2")
    apply_regime(model, AdapterConfig("chameleon", rank=4))
    with torch.no_grad():
        hyper_head(model).hyper.net[-1].weight.normal_(std=0.5)
    model.eval()
    batch = tokenizer(PROMPTS, return_tensors="pt")
    assert batch["attention_mask"].all()  # equal lengths: no padding anywhere
    return model, tokenizer, mean_embedding(model, batch["input_ids"])


@pytest.mark.parametrize("conditioning", ["batch", "centroid"])
def test_generate_conditions_each_cluster_as_the_bundle_was_trained(chameleon, conditioning):
    model, tokenizer, embeddings = chameleon
    centroids = torch.nn.functional.normalize(torch.randn(2, embeddings.shape[1]), dim=-1)
    settings = dict(max_new_tokens=6, conditioning=conditioning)
    mixed = generate(model, tokenizer, PROMPTS, embeddings, CLUSTER_IDS, centroids, **settings)
    for cluster in (0, 1):
        rows = (CLUSTER_IDS == cluster).nonzero().flatten().tolist()
        # alone, the cluster's rows are one batch: "batch" reads their mean, "centroid" their centroid
        cond = embeddings[rows].mean(0, keepdim=True) if conditioning == "batch" else centroids[cluster : cluster + 1]
        alone = generate(model, tokenizer, [PROMPTS[i] for i in rows], cond.expand(len(rows), -1),
                         torch.zeros(len(rows), dtype=torch.long), None, max_new_tokens=6, conditioning="batch")
        assert [mixed[i] for i in rows] == alone
    other = "centroid" if conditioning == "batch" else "batch"
    assert generate(model, tokenizer, PROMPTS, embeddings, CLUSTER_IDS, centroids, max_new_tokens=6,
                    conditioning=other) != mixed  # the conditioning read really changes what is generated
